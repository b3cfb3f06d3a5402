"""The hyperparameter search: diverged trials fail cleanly; only a real gain replaces defaults."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest

from models.algorithms import get_algorithm
from training.confidence import ConfidenceConfig, build_matrix
from training.evaluate import build_holdout, evaluate
from training.fit import Engine, fit_model
from training.split import split
from training.tune import MIN_GAIN_Z, SEARCHES, Search, paired_gain, tune


@pytest.fixture
def tracking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _empty_tracking_db: Path
) -> Iterator[mlflow.MlflowClient]:
    """A fresh tracking store in tmp_path, restored afterwards."""
    shutil.copyfile(_empty_tracking_db, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("tune-test")
    yield mlflow.MlflowClient()
    mlflow.set_tracking_uri(previous)


def _frame(users: int = 120, items: int = 60, per_user: int = 12, seed: int = 0) -> pd.DataFrame:
    """Users who each like a block of neighbouring items: learnable, so models beat chance."""
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


def _parts() -> tuple[pd.DataFrame, pd.DataFrame]:
    parts = split(_frame(), "random", fraction=0.25, seed=1)
    return parts.train, parts.test


def test_a_diverging_trial_is_recorded_as_failed_and_the_search_goes_on(
    tracking: mlflow.MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def space(trial: optuna.Trial) -> dict[str, Any]:
        return {
            "factors": 8,
            "iterations": 20,
            "learning_rate": trial.suggest_categorical("learning_rate", [0.05, 1e4]),
        }

    # A learning rate of 10^4 makes implicit's BPR stop with NaN factors (a real fit, not a mock).
    monkeypatch.setitem(
        SEARCHES, "bpr", Search(space, ({"learning_rate": 0.05}, {"learning_rate": 1e4}))
    )
    fit, validation = _parts()
    messages: list[str] = []
    with mlflow.start_run() as parent:
        summary = tune(
            "bpr",
            fit,
            validation,
            confidence=ConfidenceConfig(),
            n_trials=4,
            progress=messages.append,
        )

    failed = [t for t in summary["trials"] if t.get("failed")]
    assert failed and all("NaN" in t["failed"] for t in failed)
    assert len(summary["trials"]) == 4  # the search went on after the failure
    assert summary["best_params"]["learning_rate"] == 0.05
    assert any("failed (ModelFitError: NaN" in m for m in messages)
    children = tracking.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    states = {c.data.params["learning_rate"]: c for c in children}
    assert states["10000.0"].info.status == "FAILED"
    assert "NaN" in states["10000.0"].data.tags["failure_reason"]
    assert states["0.05"].info.status == "FINISHED"
    assert "validation_ndcg_at_10" in states["0.05"].data.metrics


def test_when_every_trial_fails_the_defaults_are_kept(
    tracking: mlflow.MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def space(trial: optuna.Trial) -> dict[str, Any]:
        rate = trial.suggest_float("learning_rate", 1e4, 1e5, log=True)
        return {"factors": 8, "iterations": 20, "learning_rate": rate}

    monkeypatch.setitem(SEARCHES, "bpr", Search(space))
    fit, validation = _parts()
    with mlflow.start_run():
        summary = tune(
            "bpr", fit, validation, confidence=ConfidenceConfig(), n_trials=2, base_params={}
        )
    assert summary["best_params"] == {}
    assert summary["best_value"] is None
    assert "every trial failed" in summary["decision"]


def test_a_gain_within_noise_keeps_the_default_configuration(
    tracking: mlflow.MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Item-kNN with K=59 and K=60 on 60 items rank almost identically: whichever scores higher
    # on validation, the difference is noise and the first seed (the reference) must be kept.
    def space(trial: optuna.Trial) -> dict[str, Any]:
        return {"K": trial.suggest_categorical("K", [59, 60])}

    monkeypatch.setitem(SEARCHES, "itemknn", Search(space, ({"K": 60}, {"K": 59})))
    fit, validation = _parts()
    with mlflow.start_run():
        summary = tune("itemknn", fit, validation, confidence=ConfidenceConfig(), n_trials=2)
    assert summary["best_params"] == {"K": 60}
    assert "defaults" in summary["decision"]


def test_a_clear_gain_replaces_the_defaults(
    tracking: mlflow.MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An absurd L2 makes EASE recommend by popularity alone; a sane one is far better.
    def space(trial: optuna.Trial) -> dict[str, Any]:
        return {"l2": trial.suggest_categorical("l2", [1e7, 10.0])}

    monkeypatch.setitem(SEARCHES, "ease", Search(space, ({"l2": 1e7}, {"l2": 10.0})))
    fit, validation = _parts()
    with mlflow.start_run():
        summary = tune("ease", fit, validation, confidence=ConfidenceConfig(), n_trials=2)
    assert summary["best_params"] == {"l2": 10.0}
    assert summary["best_value"] > summary["default_value"]
    assert "tuned parameters kept" in summary["decision"]


def test_paired_gain_is_the_mean_difference_and_its_standard_error() -> None:
    reference = np.array([0.1, 0.2, 0.3, np.nan, 0.5])
    gain, stderr = paired_gain(reference + 0.1, reference)
    assert gain == pytest.approx(0.1) and stderr == pytest.approx(0.0, abs=1e-12)
    noisy = reference + np.array([0.2, -0.2, 0.2, 0.0, -0.2])
    gain, stderr = paired_gain(noisy, reference)
    assert gain < MIN_GAIN_Z * stderr
    assert paired_gain(np.array([1.0]), np.array([0.0]))[1] == np.inf


@pytest.mark.parametrize("algorithm", sorted(SEARCHES))
def test_the_first_seed_of_every_search_is_the_default_configuration(algorithm: str) -> None:
    search = SEARCHES[algorithm]
    study = optuna.create_study()
    study.enqueue_trial(search.seeds[0])
    params = search.space(study.ask())
    name, _, engine = algorithm.partition("@")
    cls = get_algorithm(name)
    if engine:  # an engine's own search starts from that engine's defaults
        params = Engine(engine).params(name, params)  # type: ignore[arg-type]
    defaults = cls.Config(**Engine(engine or "local").params(name, {})).model_dump()  # type: ignore[arg-type]
    assert cls.Config(**params).model_dump() == {
        name: pytest.approx(value) if isinstance(value, float) else value
        for name, value in defaults.items()
    }


def test_validation_counts_items_unseen_in_training_as_misses(
    tracking: mlflow.MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every user also has an item of their own: in the validation part it is a relevant item
    # no configuration can rank, and the score the search compares must say so.
    frame = _frame()
    own = frame.drop_duplicates("user_id").assign(item_id=lambda f: "own-" + f["user_id"])
    parts = split(pd.concat([frame, own], ignore_index=True), "random", fraction=0.25, seed=1)
    assert parts.stats.cold_item_pairs > 0
    monkeypatch.setitem(SEARCHES, "itemknn", Search(lambda t: {"K": 20}, ({"K": 20},)))
    with mlflow.start_run():
        summary = tune(
            "itemknn", parts.train, parts.test, confidence=ConfidenceConfig(), n_trials=1
        )
    train = build_matrix(parts.train, ConfidenceConfig())
    holdout = build_holdout(parts.test, train.users, train.items)
    model = fit_model("itemknn", {"K": 20}, train.matrix)
    expected = evaluate(model, train.matrix, holdout.matrix, unrankable=holdout.unrankable)
    forgetful = evaluate(model, train.matrix, holdout.matrix)
    assert summary["best_value"] == pytest.approx(expected.metrics["ndcg_at_10"])
    assert summary["best_value"] < forgetful.metrics["ndcg_at_10"]
