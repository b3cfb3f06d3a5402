"""`affinity train` ships an approximate index with a factor model over a large catalog.

The threshold (``--ann-min-items``) is lowered to the generated catalog's 200 items: the run
builds the index, records how (kind, effort, build seconds, size, recall) in the manifest and in
MLflow, and the registered model serves with it. Below the threshold nothing changes. Skips
without faiss, fails in CI (``CI`` set) where it must be installed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import mlflow
import pytest

from affinity.cli import main
from models import ann
from models.artifact import load_artifact
from models.errors import InvalidInputError
from models.ranking import RankingPipeline
from training.generate import generate
from training.pipeline import TrainOptions, validate_options


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("logs")
    generate(out, users=600, items=200, interactions=15_000, seed=4)
    return out


def _train(capsys: pytest.CaptureFixture[str], logs: Path, *args: str) -> dict:
    capsys.readouterr()
    command = ["train", "--interactions", str(logs / "interactions.parquet"), "--json"]
    assert main([*command, "--quiet", "--algorithm", "als", "--param", "factors=8", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _artifact(run_id: str) -> Path:
    local = mlflow.artifacts.download_artifacts(
        f"runs:/{run_id}/affinity_model", dst_path=tempfile.mkdtemp(dir=Path.cwd())
    )
    return Path(local)


def test_a_large_catalog_ships_an_index(
    logs: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if not ann.faiss_available():
        if os.environ.get("CI"):
            pytest.fail("faiss is not installed in CI: .ci/run must install the ann extra")
        pytest.skip("faiss is not installed (pip install 'affinity-recommender[ann]')")
    summary = _train(capsys, logs, "--ann-min-items", "100")
    run = mlflow.MlflowClient().get_run(summary["run_id"])
    assert run.data.params["ann_min_items"] == "100"
    assert run.data.params["ann.kind"] == ann.DEFAULT_KIND
    assert int(run.data.params["ann.effort"]) > 0
    for metric in ("ann_build_seconds", "ann_tune_seconds", "ann_index_bytes"):
        assert run.data.metrics[metric] >= 0
    assert 0.0 <= run.data.metrics["ann_recall_at_10"] <= 1.0

    root = _artifact(summary["run_id"])
    manifest = json.loads((root / "manifest.json").read_text())
    assert ann.ANN_FILE in manifest["files"]
    info = manifest["info"]["ann"]
    assert info["kind"] == ann.DEFAULT_KIND and info["items"] == manifest["shapes"]["items"]
    assert info["index_bytes"] > 0 and info["build_seconds"] >= 0
    bundle = load_artifact(root)
    pipeline = RankingPipeline.from_bundle(bundle)
    assert pipeline._ann is not None
    user = str(bundle.users.ids[0])
    assert len(pipeline.recommend(user, 10)) == 10


def test_below_the_threshold_there_is_no_index(
    logs: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = _train(capsys, logs)  # the default threshold, a million items
    root = _artifact(summary["run_id"])
    manifest = json.loads((root / "manifest.json").read_text())
    assert ann.ANN_FILE not in manifest["files"] and "ann" not in manifest["info"]
    run = mlflow.MlflowClient().get_run(summary["run_id"])
    assert run.data.params["ann_min_items"] == str(ann.MIN_ITEMS)
    assert "ann.kind" not in run.data.params


def test_a_negative_threshold_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="--ann-min-items"):
        validate_options(TrainOptions(interactions=Path("log.csv"), ann_min_items=-1))
