"""End to end: generated logs -> `affinity train` -> MLflow run -> registry version and alias.

These tests drive the real CLI entry point against a real MLflow SQLite store in a temporary
folder, the way an ML engineer would, and then check what they would look at: the JSON summary,
the run in the tracking store, the registered version, its aliases and the reloaded artifact.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from affinity.cli import main
from models.artifact import load_artifact
from models.ranking import RankingPipeline
from registry.mlflow_store import load_model_uri
from training import pipeline
from training.generate import generate

MODEL = "affinity"


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("logs")
    generate(out, users=800, items=200, interactions=30_000, seed=3)
    return out


def _download(uri: str) -> str:
    # Into the test's own folder, not the temporary one the tests check for leftovers.
    return mlflow.artifacts.download_artifacts(uri, dst_path=tempfile.mkdtemp(dir=Path.cwd()))


def train(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    assert main(["train", *args, "--json", "--quiet"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_train_logs_registers_and_promotes(
    logs: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = train(
        capsys,
        "--interactions",
        str(logs / "interactions.parquet"),
        "--items",
        str(logs / "items.parquet"),
        "--algorithm",
        "als",
        "--param",
        "factors=16",
        "--param",
        "iterations=6",
    )
    # The --json contract scripts rely on.
    assert set(summary) >= {
        "run_id",
        "model_name",
        "model_version",
        "promoted",
        "metrics",
        "baseline_metrics",
        "rows",
    }
    assert summary["model_name"] == MODEL and summary["model_version"] == "1"
    assert summary["promoted"] is True
    assert summary["rows"] == {"read": 30_000, "accepted": 30_000, "quarantined": 0}
    for name in ("ndcg_at_10", "recall_at_10", "precision_at_10", "map_at_10", "mrr_at_10"):
        assert 0.0 <= summary["metrics"][name] <= 1.0
        assert name in summary["baseline_metrics"]
    # The generated users have real tastes: the model must beat popularity.
    assert summary["metrics"]["ndcg_at_10"] > 1.2 * summary["baseline_metrics"]["ndcg_at_10"]

    client = mlflow.MlflowClient()
    run = client.get_run(summary["run_id"])
    assert run.data.params["algorithm"] == "als"
    assert run.data.params["model.factors"] == "16"
    assert len(run.data.tags["dataset_fingerprint"]) == 64
    for metric in ("ndcg_at_10", "baseline_ndcg_at_10", "data_rows_read", "time_fit_seconds"):
        assert metric in run.data.metrics
    # Beyond accuracy, the model's and the baseline's, measured alike (ALS: its item vectors).
    for metric in ("diversity_at_10", "coverage_at_10", "novelty_at_10"):
        assert metric in run.data.metrics and f"baseline_{metric}" in run.data.metrics
    assert 0.0 < run.data.metrics["diversity_at_10"] <= 2.0
    assert run.data.tags["diversity_basis"] == "item_vectors"
    assert any(m.startswith("cohort_") for m in run.data.metrics)
    loss = client.get_metric_history(summary["run_id"], "training_loss")
    assert [m.step for m in loss] == list(range(1, 7))
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"])}
    assert {"affinity_model", "evaluation", "quarantine"} <= artifacts
    # The report is written last: its stage timings cover registration and the gate too.
    report = mlflow.artifacts.load_dict(f"runs:/{summary['run_id']}/evaluation/report.json")
    timings = report["timings"]
    for stage in ("read", "load", "matrix", "fit", "evaluate", "artifact", "register", "gate"):
        assert 0.0 <= timings[f"{stage}_seconds"] <= timings["total_seconds"]

    version = client.get_model_version_by_alias(MODEL, "champion")
    assert str(version.version) == "1"
    assert version.tags["algorithm"] == "als"
    assert version.tags["dataset_fingerprint"] == run.data.tags["dataset_fingerprint"]

    # The registered artifact reloads to identical recommendations.
    local = load_artifact(_download(f"runs:/{summary['run_id']}/affinity_model"))
    registered = load_model_uri(f"models:/{MODEL}@champion")
    a, b = RankingPipeline.from_bundle(local), RankingPipeline.from_bundle(registered)
    for user in local.users.ids[:25]:
        ra, rb = a.recommend(str(user), 10), b.recommend(str(user), 10)
        assert ra.item_ids == rb.item_ids
        assert np.allclose(ra.scores, rb.scores)


def test_gate_keeps_better_champion_and_force_promote_overrides(
    logs: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--interactions", str(logs / "interactions.parquet")]
    als = ["--algorithm", "als", "--param", "factors=16", "--param", "iterations=6"]
    first = train(capsys, *common, *als)
    assert first["promoted"] is True
    worse = train(capsys, *common, "--algorithm", "popularity")
    assert worse["promoted"] is False
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == "2"
    run = client.get_run(worse["run_id"])
    assert "not better" in run.data.tags["promotion_decision"]
    # Popularity has no item vectors and this run no catalog: diversity is not measured.
    assert run.data.tags["diversity_basis"] == "none"
    assert "diversity_at_10" not in run.data.metrics and "coverage_at_10" in run.data.metrics
    # Both numbers of the decision are recorded, and the champion's was measured on this holdout.
    assert run.data.metrics["champion_ndcg_at_10"] == pytest.approx(
        first["metrics"]["ndcg_at_10"], rel=0.05
    )
    forced = train(capsys, *common, "--algorithm", "popularity", "--force-promote")
    assert forced["promoted"] is True
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "3"


def _with_bad_rows(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    with open(path, "a") as fh:
        fh.write(",i1,view,2024-01-01T00:00:00Z,\n")  # missing user
        fh.write("u1,i1,teleport,2024-01-01T00:00:00Z,\n")  # unknown event
        fh.write("u1,i1,view,yesterday,\n")  # bad timestamp
        fh.write("u1,i1,view,1700000000,-3\n")  # negative value
    return path


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary folder the pipeline works in, empty at the start of the test."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _logged_quarantine(run_id: str) -> dict:
    return json.loads(Path(_download(f"runs:/{run_id}/quarantine/summary.json")).read_text())


def test_quarantined_rows_are_counted_and_logged(
    tmp_path: Path, logs: Path, store: str, private_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frame = pd.read_parquet(logs / "interactions.parquet")
    csv = _with_bad_rows(frame, tmp_path / "log.csv")
    summary = train(capsys, "--interactions", str(csv), "--algorithm", "popularity")
    assert summary["rows"] == {"read": len(frame) + 4, "accepted": len(frame), "quarantined": 4}
    logged = _logged_quarantine(summary["run_id"])
    assert logged["quarantined"] == 4 and sum(logged["reasons"].values()) == 4
    assert logged["quarantine_file"] == "quarantine/quarantine.csv"
    path = _download(f"runs:/{summary['run_id']}/quarantine/quarantine.csv")
    assert len(pd.read_csv(path)) == 4
    # The work folder (default quarantine file, artifact before MLflow copied it) is gone.
    assert list(private_tmp.iterdir()) == []


def test_holdout_quarantine_is_logged_and_an_oversized_one_is_kept(
    tmp_path: Path,
    logs: Path,
    store: str,
    private_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    frame = pd.read_parquet(logs / "interactions.parquet").sort_values("timestamp")
    cut = int(len(frame) * 0.85)
    frame.iloc[:cut].to_parquet(tmp_path / "train.parquet")
    test_csv = _with_bad_rows(frame.iloc[cut:], tmp_path / "test.csv")
    common = ["--interactions", str(tmp_path / "train.parquet"), "--test", str(test_csv)]
    summary = train(capsys, *common, "--algorithm", "popularity")
    logged = _logged_quarantine(summary["run_id"])
    assert logged["test_rows"]["quarantined"] == 4 and sum(logged["test_reasons"].values()) == 4
    assert logged["test_quarantine_file"] == "quarantine/test-quarantine.csv"
    assert logged["quarantine_file"] == ""  # the training log was clean
    assert list(private_tmp.iterdir()) == []

    # Too large to log: moved out of the work folder, named in the summary, nothing lost.
    monkeypatch.setattr(pipeline, "QUARANTINE_LOG_LIMIT", 10)
    summary = train(capsys, *common, "--algorithm", "popularity")
    kept = Path(_logged_quarantine(summary["run_id"])["test_quarantine_file"])
    assert kept.parent == private_tmp and summary["run_id"] in kept.name
    assert len(pd.read_csv(kept)) == 4
    assert list(private_tmp.iterdir()) == [kept]


def test_a_failed_run_leaves_no_work_folder(
    tmp_path: Path, store: str, private_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "bad.csv"
    log.write_text("user_id,item_id,event,timestamp,value\n,i1,view,2024-01-01T00:00:00Z,\n")
    assert main(["train", "--interactions", str(log), "--quiet"]) == 2
    assert "no valid rows" in capsys.readouterr().err
    assert list(private_tmp.iterdir()) == []


def test_tune_runs_nested_trials_on_validation(
    logs: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = train(
        capsys,
        "--interactions",
        str(logs / "interactions.parquet"),
        "--algorithm",
        "itemknn",
        "--tune",
        "3",
    )
    client = mlflow.MlflowClient()
    parent = client.get_run(summary["run_id"])
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{summary['run_id']}'",
    )
    assert len(children) == 3
    assert all("validation_ndcg_at_10" in c.data.metrics for c in children)
    best = max(children, key=lambda c: c.data.metrics["validation_ndcg_at_10"])
    assert parent.data.params["model.K"] == best.data.params["K"]


@pytest.mark.parametrize(("k", "metric"), [(5, "recall"), (20, "ndcg"), (20, "ndcg_at_20")])
def test_tuning_gating_and_json_follow_k(
    k: int, metric: str, logs: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lists of any length can be tuned and gated: the metric is the one measured at --k."""
    name = f"{metric.partition('_at_')[0]}_at_{k}"
    common = ["--interactions", str(logs / "interactions.parquet"), "--algorithm", "itemknn"]
    common += ["--k", str(k), "--metric", metric]
    first = train(capsys, *common, "--tune", "2")
    assert name in first["metrics"] and name in first["baseline_metrics"]
    assert not any(key.endswith("_at_10") for key in first["metrics"])
    assert first["promoted"] and f"{name} new" in first["decision"]
    client = mlflow.MlflowClient()
    parent = client.get_run(first["run_id"])
    assert parent.data.params["primary_metric"] == name
    assert parent.data.metrics[f"validation_best_{name}"] >= 0
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{first['run_id']}'",
    )
    assert len(children) == 2 and all(f"validation_{name}" in c.data.metrics for c in children)
    # A second run is gated against the first on the same metric.
    second = train(capsys, *common, "--param", "K=5")
    run = client.get_run(second["run_id"]).data
    assert run.metrics[f"champion_{name}"] == pytest.approx(first["metrics"][name], abs=1e-6)
    assert second["decision"].startswith(f"version {second['model_version']} -> ")
    assert f"{name} new {second['metrics'][name]:.4f}" in second["decision"]


def test_evaluation_can_be_limited_to_a_seeded_user_sample(
    logs: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--interactions", str(logs / "interactions.parquet"), "--algorithm", "popularity"]
    first = train(capsys, *common, "--eval-users", "100")
    again = train(capsys, *common, "--eval-users", "100")
    client = mlflow.MlflowClient()
    metrics = client.get_run(first["run_id"]).data.metrics
    assert metrics["data_n_eval_users"] == 100
    assert metrics["data_n_test_users"] > 100
    # Same seed, same sample: the two runs are comparable number for number.
    assert first["metrics"] == again["metrics"]


def test_given_holdout_file_is_used_instead_of_a_split(
    tmp_path: Path, logs: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    frame = pd.read_parquet(logs / "interactions.parquet").sort_values("timestamp")
    frame = frame.astype({"user_id": str, "item_id": str, "event": str})
    cut = int(len(frame) * 0.85)
    train_part, test_part = frame.iloc[:cut], frame.iloc[cut:].copy()
    # A user nobody trained on (not evaluated) and a known user's item nobody trained on (a miss).
    test_part.iloc[0, test_part.columns.get_loc("user_id")] = "someone-new"
    test_part.iloc[1, test_part.columns.get_loc("item_id")] = "something-new"
    train_part.to_parquet(tmp_path / "train.parquet")
    test_part.to_parquet(tmp_path / "test.parquet")
    summary = train(
        capsys,
        "--interactions",
        str(tmp_path / "train.parquet"),
        "--test",
        str(tmp_path / "test.parquet"),
        "--algorithm",
        "popularity",
    )
    assert summary["rows"]["accepted"] == cut
    run = mlflow.MlflowClient().get_run(summary["run_id"])
    assert run.data.tags["split"] == "given"
    held = test_part.drop_duplicates(["user_id", "item_id"])
    known_user = held["user_id"].isin(set(train_part["user_id"]))
    unseen_item = ~held["item_id"].isin(set(train_part["item_id"]))
    metrics = run.data.metrics
    assert metrics["data_n_test_pairs"] == known_user.sum()
    assert metrics["data_n_test_pairs_unknown_item"] == (known_user & unseen_item).sum() >= 1
    assert metrics["data_n_test_users_unknown"] == held.loc[~known_user, "user_id"].nunique() >= 1
    assert not any(name.startswith("split_") for name in metrics)  # no split was made


def test_items_unseen_in_training_stay_in_the_holdout_as_misses(
    tmp_path: Path, logs: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    frame = pd.read_parquet(logs / "interactions.parquet")
    frame = frame.astype({"user_id": str, "item_id": str, "event": str})
    # Thirty users each find, last of all, an item of their own: the split holds it out.
    heavy = frame.groupby("user_id")["item_id"].nunique().nlargest(30).index
    late = frame[frame["user_id"].isin(heavy)].drop_duplicates("user_id").copy()
    late["item_id"] = "new-" + late["user_id"]
    late["timestamp"] = frame["timestamp"].max() + pd.Timedelta(days=1)
    pd.concat([frame, late], ignore_index=True).to_parquet(tmp_path / "log.parquet")
    summary = train(
        capsys, "--interactions", str(tmp_path / "log.parquet"), "--algorithm", "popularity"
    )
    metrics = mlflow.MlflowClient().get_run(summary["run_id"]).data.metrics
    assert metrics["split_cold_item_pairs"] >= 30
    assert metrics["split_cold_items"] >= 30
    assert metrics["split_cold_user_pairs"] == 0
    assert metrics["data_n_test_pairs_unknown_item"] == metrics["split_cold_item_pairs"]
    assert metrics["data_n_test_items_unknown"] == metrics["split_cold_items"]
    assert metrics["data_n_test_pairs"] == metrics["split_test_pairs"]
    assert metrics["data_n_eval_users"] == metrics["split_test_users"]


def test_batch_recommend_and_pyfunc_read_the_registered_model(
    tmp_path: Path, logs: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    log = str(logs / "interactions.parquet")
    train(capsys, "--interactions", log, "--algorithm", "als", "--param", "factors=8")
    users = tmp_path / "users.txt"
    frame = pd.read_parquet(logs / "interactions.parquet")
    known = sorted(frame["user_id"].unique())[:5]
    users.write_text("\n".join([*known, "someone-new"]) + "\n")
    out = tmp_path / "recs.csv"
    code = main(
        ["batch-recommend", "--model", f"models:/{MODEL}@champion", "--users", str(users),
         "--k", "7", "--out", str(out), "--quiet"]
    )  # fmt: skip
    assert code == 0
    recs = pd.read_csv(out, dtype={"user_id": str, "item_id": str})
    assert list(recs.columns[:4]) == ["user_id", "rank", "item_id", "score"]
    assert recs.groupby("user_id").size().to_dict() == {u: 7 for u in [*known, "someone-new"]}
    assert (recs[recs.user_id == "someone-new"]["source"] == "popular").all()
    seen = frame.groupby("user_id")["item_id"].apply(set)
    for user in known:
        assert not set(recs[recs.user_id == user]["item_id"]) & seen[user]

    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    result = pyfunc.predict(pd.DataFrame({"user_id": known}), params={"k": 7})
    for user in known:
        assert (
            result[result.user_id == user]["item_id"].tolist()
            == recs[recs.user_id == user]["item_id"].tolist()
        )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--interactions", "nowhere.parquet"], "does not exist"),
        (
            [
                "--interactions",
                "{logs}/interactions.parquet",
                "--algorithm",
                "als",
                "--param",
                "factors=-2",
            ],
            "factors",
        ),
        (["--interactions", "{logs}/interactions.parquet", "--param", "nope"], "KEY=VALUE"),
        (["--interactions", "{logs}/interactions.parquet", "--k", "0"], "--k"),
        (["--interactions", "{logs}/interactions.parquet", "--metric", "auc"], "unknown metric"),
        (
            [
                "--interactions",
                "{logs}/interactions.parquet",
                "--k",
                "20",
                "--tune",
                "2",
                "--metric",
                "ndcg_at_10",
            ],
            "measured at k=10 but lists have k=20",
        ),
    ],
)
def test_user_mistakes_give_one_line_and_exit_2(
    args: list[str], message: str, logs: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", *[a.replace("{logs}", str(logs)) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    reason = err.splitlines()[-1]
    assert reason.startswith("affinity train: error:") and message in reason


DATASETS = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets"


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["als", "ease"])
def test_movielens_models_beat_popularity_by_a_wide_margin(
    algorithm: str, tmp_path: Path, store: str
) -> None:
    ratings = DATASETS / "ml-latest-small" / "ratings.csv"
    if not ratings.exists():
        pytest.skip("../shared/datasets not present")
    frame = pd.read_csv(ratings)
    log = pd.DataFrame(
        {
            "user_id": frame["userId"].astype(str),
            "item_id": frame["movieId"].astype(str),
            "event": "view",
            "timestamp": frame["timestamp"],
        }
    )
    log.to_parquet(tmp_path / "ratings.parquet")
    from training.pipeline import TrainOptions, run_training

    result = run_training(
        TrainOptions(
            interactions=tmp_path / "ratings.parquet",
            algorithm=algorithm,
            split="random",
            test_fraction=0.25,
            register=False,
        )
    )
    assert result.rows["quarantined"] == 0
    model, baseline = result.metrics["ndcg_at_10"], result.baseline_metrics["ndcg_at_10"]
    assert model > 1.4 * baseline, (algorithm, model, baseline)
    assert result.metrics["recall_at_10"] > 1.4 * result.baseline_metrics["recall_at_10"]
