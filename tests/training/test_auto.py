"""``affinity train --algorithm auto`` (the default): the best candidate on the validation split.

The choice itself is checked against validation values computed here independently; the run is
driven through the real CLI against a real MLflow SQLite store in a temporary folder, as in
``test_pipeline.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest

from affinity.cli import build_parser, main
from models import gfcf
from models.algorithms import get_algorithm
from models.errors import ModelTooLargeError
from training import auto
from training.auto import (
    AUTO_CANDIDATES,
    AUTO_EASE_MAX_ITEMS,
    DataSize,
    choose_algorithm,
    too_large,
)
from training.confidence import ConfidenceConfig, build_matrix
from training.evaluate import build_holdout, evaluate
from training.fit import fit_model
from training.generate import generate
from training.pipeline import TrainOptions
from training.split import split

MODEL = "affinity"


def _frame(users: int = 150, items: int = 60, per_user: int = 12, seed: int = 0) -> pd.DataFrame:
    """Users who each like a block of neighbouring items: personal tastes, no popular items."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(users):
        start = rng.integers(0, items - per_user)
        for offset, item in enumerate(range(start, start + per_user)):
            rows.append((f"u{user}", f"i{item}", user * 100 + offset))
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    frame["event"] = "click"
    frame["value"] = 1.0
    frame["weight"] = 1.0
    return frame


@pytest.fixture(scope="module")
def parts() -> tuple[pd.DataFrame, pd.DataFrame]:
    """A fit part and a validation part, as the tuning split makes them."""
    cut = split(_frame(), "random", fraction=0.25, seed=1)
    return cut.train, cut.test


def _validation_ndcg(algorithm: str, fit: pd.DataFrame, validation: pd.DataFrame) -> float:
    """NDCG@10 on ``validation`` of ``algorithm``'s defaults fitted on ``fit``, computed here."""
    train = build_matrix(fit, ConfidenceConfig())
    holdout = build_holdout(validation, train.users, train.items)
    model = fit_model(algorithm, {}, train.matrix)
    result = evaluate(model, train.matrix, holdout.matrix, k=10, unrankable=holdout.unrankable)
    return float(result.metrics["ndcg_at_10"])


def test_the_choice_is_the_candidate_with_the_best_validation_value(
    parts: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    fit, validation = parts
    lines: list[str] = []
    choice = choose_algorithm(fit, validation, confidence=ConfidenceConfig(), progress=lines.append)
    assert [c.algorithm for c in choice.candidates] == list(AUTO_CANDIDATES)
    assert choice.metric == "ndcg_at_10"
    expected = {alg: _validation_ndcg(alg, fit, validation) for alg in AUTO_CANDIDATES}
    for candidate in choice.candidates:
        assert candidate.skipped is None
        assert candidate.value == pytest.approx(expected[candidate.algorithm], abs=1e-6)
        assert candidate.seconds is not None and candidate.seconds > 0
    assert choice.chosen == max(expected, key=lambda alg: expected[alg])
    # One progress line announcing the comparison, one per candidate, one for the choice.
    assert len(lines) == len(AUTO_CANDIDATES) + 2
    assert lines[-1].startswith(f"chose {choice.chosen}: best validation ndcg_at_10")

    # Where the answer is known: on personal tastes any item-item model beats popularity,
    # whose list is the same for everyone; and the order of the candidates does not matter.
    for candidates in (("popularity", "bm25"), ("bm25", "popularity")):
        known = choose_algorithm(
            fit, validation, confidence=ConfidenceConfig(), candidates=candidates
        )
        values = {c.algorithm: c.value for c in known.candidates}
        assert known.chosen == "bm25" and values["bm25"] > 2 * values["popularity"]


def test_a_tie_goes_to_the_earlier_candidate(parts: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    fit, validation = parts
    choice = choose_algorithm(
        fit, validation, confidence=ConfidenceConfig(), candidates=("trending", "popularity")
    )
    values = [c.value for c in choice.candidates]
    assert values[0] == values[1]  # no timestamps decay here: the same list for everyone
    assert choice.chosen == "trending"


def test_candidates_that_cannot_fit_are_skipped_with_their_reasons(
    parts: tuple[pd.DataFrame, pd.DataFrame], monkeypatch: pytest.MonkeyPatch
) -> None:
    fit, validation = parts
    monkeypatch.setattr(auto, "AUTO_EASE_MAX_ITEMS", 10)  # the catalog has 60 items
    monkeypatch.setattr(gfcf, "estimate_memory_gb", lambda n_items: 1e6)  # the dense form's

    def fit_or_refuse(algorithm: str, params: dict[str, Any], matrix: Any) -> Any:
        if algorithm == "bm25":
            raise ModelTooLargeError("bm25 refused for the test")
        return fit_model(algorithm, params, matrix)

    monkeypatch.setattr(auto, "fit_model", fit_or_refuse)
    choice = choose_algorithm(fit, validation, confidence=ConfidenceConfig())
    by_name = {c.algorithm: c for c in choice.candidates}
    assert choice.chosen == "als"
    assert by_name["als"].skipped is None and by_name["als"].value is not None
    ease = by_name["ease"]
    assert ease.value is None and ease.seconds is None  # skipped before fitting
    assert ease.skipped is not None and "over the 10 auto fits EASE on" in ease.skipped
    assert by_name["gfcf"].value is None
    assert by_name["gfcf"].skipped == "needs about 1000000.00 GB, over its default max_memory_gb=8"
    bm25 = by_name["bm25"]
    assert bm25.value is None and bm25.seconds is not None  # it was tried
    assert bm25.skipped == "ModelTooLargeError: bm25 refused for the test"
    assert choice.to_json()["candidates"]["bm25"] == {
        "value": None,
        "seconds": bm25.seconds,
        "skipped": "ModelTooLargeError: bm25 refused for the test",
    }


def test_the_memory_checks_use_each_models_own_estimate() -> None:
    small = DataSize(users=1_000, items=5_000, interactions=50_000)
    assert [too_large(alg, small) for alg in AUTO_CANDIDATES] == [None] * len(AUTO_CANDIDATES)
    # EASE: cut by catalog size below what its memory budget would allow (4.8 GB at 20k).
    assert too_large("ease", DataSize(1_000, AUTO_EASE_MAX_ITEMS, 50_000)) is None
    over = too_large("ease", DataSize(1_000, AUTO_EASE_MAX_ITEMS + 1, 50_000))
    assert over is not None and "20,001 items" in over
    # GF-CF: dense up to its dense_max_items, factored (linear in the data) above.
    dense_max = gfcf.GFCFConfig().dense_max_items
    assert too_large("gfcf", DataSize(1_000, dense_max, 50_000)) is None
    huge = DataSize(users=5_000_000, items=dense_max + 1, interactions=100_000_000)
    needed = gfcf.estimate_factored_memory_gb(huge.users, huge.items, huge.interactions, 256)
    assert needed > gfcf.GFCFConfig().max_memory_gb
    assert (
        too_large("gfcf", huge) == f"needs about {needed:.2f} GB, over its default max_memory_gb=8"
    )
    assert too_large("als", huge) is None and too_large("bm25", huge) is None
    # The larger of the fit part and the refit's data decides.
    assert DataSize(10, 20, 30).cover(DataSize(5, 40, 10)) == DataSize(10, 40, 30)


def test_auto_is_the_default() -> None:
    assert TrainOptions(interactions=Path("log.csv")).algorithm == "auto"
    args = build_parser().parse_args(["train", "--interactions", "log.csv"])
    assert args.algorithm == "auto"


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("logs")
    generate(out, users=300, items=80, interactions=9_000, seed=11)
    return out


def test_train_chooses_records_the_choice_and_fits_the_chosen_algorithm(
    logs: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    # No --algorithm: auto is the default. Progress on stderr, the summary on stdout.
    assert main(["train", "--interactions", str(logs / "interactions.parquet"), "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    chosen = summary["auto"]["chosen"]
    assert summary["algorithm"] == chosen
    assert summary["auto"]["metric"] == "ndcg_at_10"
    candidates = summary["auto"]["candidates"]
    assert list(candidates) == list(AUTO_CANDIDATES)
    for result in candidates.values():
        assert result["skipped"] is None
        assert 0.0 < result["value"] <= 1.0 and result["seconds"] > 0
    assert chosen == max(candidates, key=lambda alg: candidates[alg]["value"])
    # The run went on as --algorithm <chosen>: its parameters are the chosen model's defaults.
    config = get_algorithm(chosen).Config()
    assert summary["params"] == config.model_dump(mode="json")

    lines = [line.split("] ", 1)[-1] for line in captured.err.splitlines()]
    for alg in AUTO_CANDIDATES:
        value = candidates[alg]["value"]
        assert sum(line.startswith(f"  {alg}: ndcg_at_10 {value:.4f}") for line in lines) == 1
    assert sum(line.startswith(f"chose {chosen}: best validation") for line in lines) == 1
    assert any(line.startswith(f"fitting {chosen} on") for line in lines)

    client = mlflow.MlflowClient()
    run = client.get_run(summary["run_id"]).data
    assert run.params["auto.candidates"] == ",".join(AUTO_CANDIDATES)
    assert run.params["algorithm"] == chosen
    assert run.tags["algorithm_choice"] == "auto" and run.tags["algorithm"] == chosen
    for alg in AUTO_CANDIDATES:
        assert run.metrics[f"auto_validation.{alg}"] == pytest.approx(candidates[alg]["value"])
        assert run.metrics[f"auto_fit_seconds.{alg}"] == pytest.approx(candidates[alg]["seconds"])
    assert run.metrics["time_auto_seconds"] > 0
    report = mlflow.artifacts.load_dict(f"runs:/{summary['run_id']}/evaluation/report.json")
    assert report["auto"] == summary["auto"]
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.tags["algorithm"] == chosen


def test_tune_after_auto_tunes_the_chosen_algorithm(
    logs: Path, store: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two quick candidates whose order is known (personal tastes: bm25 beats popularity), and a
    # skipped one: the reason reaches the JSON and the run's tags.
    monkeypatch.setattr(auto, "AUTO_CANDIDATES", ("popularity", "ease", "bm25"))
    monkeypatch.setattr(auto, "AUTO_EASE_MAX_ITEMS", 10)
    capsys.readouterr()
    argv = ["train", "--interactions", str(logs / "interactions.parquet"), "--algorithm", "auto"]
    assert main([*argv, "--tune", "2", "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["auto"]["chosen"] == summary["algorithm"] == "bm25"
    ease = summary["auto"]["candidates"]["ease"]
    assert ease["value"] is None and "auto fits EASE on" in ease["skipped"]

    client = mlflow.MlflowClient()
    parent = client.get_run(summary["run_id"])
    assert parent.data.params["algorithm"] == "bm25"
    assert parent.data.params["auto.candidates"] == "popularity,ease,bm25"
    assert "auto fits EASE on" in parent.data.tags["auto_skipped.ease"]
    assert "auto_validation.ease" not in parent.data.metrics
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{summary['run_id']}'",
    )
    # The trials searched BM25's space, and the refit took the chosen trial's parameters.
    assert len(children) == 2
    for child in children:
        assert set(child.data.params) == {"K", "K1", "B"}
        assert "validation_ndcg_at_10" in child.data.metrics
    assert "tuning_decision" in parent.data.tags
    assert parent.data.params["model.K"] in {c.data.params["K"] for c in children}


def test_every_candidate_failing_exits_2_with_the_reasons(
    logs: Path, store: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(algorithm: str, params: dict[str, Any], matrix: Any) -> Any:
        raise ModelTooLargeError(f"no room for {algorithm}")

    monkeypatch.setattr(auto, "fit_model", refuse)
    capsys.readouterr()
    assert main(["train", "--interactions", str(logs / "interactions.parquet"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("affinity train: error: --algorithm auto could not fit any")
    for alg in AUTO_CANDIDATES:
        assert f"{alg}: ModelTooLargeError: no room for {alg}" in err[-1]
    assert mlflow.search_registered_models() == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--algorithm", "nope"], "argument --algorithm: invalid choice: 'nope'"),
        (["--param", "factors=64"], "--param factors: hyperparameters belong to one algorithm"),
    ],
)
def test_a_bad_algorithm_or_params_with_auto_exit_2_with_one_line(
    args: list[str], message: str, logs: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--interactions", str(logs / "interactions.parquet"), *args, "--quiet"]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse rejects an unknown choice itself
        code = int(exc.code or 0)
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    reason = err.splitlines()[-1]
    assert reason.startswith("affinity train: error:") and message in reason
