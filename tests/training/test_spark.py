"""Training on Spark: ``affinity train --engine spark`` fits pyspark.ml's implicit ALS (local mode).

The engine must be indistinguishable to the server: the same artifact, MLflow run and registry
version, and a fold-in that solves Spark's own problem exactly (its confidence is ``1 + alpha·r``
and its penalty is scaled by each user's count), so a new user folded in gets what Spark would
have given them. These tests run Spark for real (local mode, two cores). Without pyspark they
skip with the reason, except in CI (``CI`` set), where a skipped Spark test would hide a missing
install: there they fail.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from affinity.cli import main
from models.errors import InvalidInputError
from models.factorization import ALS
from models.ranking import RankingPipeline
from registry.mlflow_store import load_model_uri
from training.fit import Engine, fit_model
from training.generate import generate

MASTER = "local[2]"


def _need_pyspark() -> None:
    try:
        import pyspark  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("pyspark is not installed in CI: .ci/run must install the spark extra")
        pytest.skip("pyspark is not installed (pip install 'affinity[spark]')")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        if os.environ.get("CI"):
            pytest.fail("no Java runtime in CI: .ci/run must install openjdk-17-jre-headless")
        pytest.skip("no Java runtime for Spark")


@pytest.fixture(scope="module")
def matrix() -> sp.csr_matrix:
    """60 users x 40 items in three taste groups, with repeat counts as confidence values."""
    rng = np.random.default_rng(7)
    rows, cols, vals = [], [], []
    for user in range(60):
        group = user % 3
        items = rng.choice(np.arange(group * 13, group * 13 + 14), size=7, replace=False)
        items = np.concatenate([items, rng.choice(40, size=2, replace=False)])
        for item in np.unique(items):
            rows.append(user)
            cols.append(int(item))
            vals.append(float(rng.integers(1, 4)))
    return sp.csr_matrix((vals, (rows, cols)), shape=(60, 40), dtype=np.float32)


@pytest.fixture(scope="module")
def spark_model(matrix: sp.csr_matrix) -> ALS:
    _need_pyspark()
    params = {"factors": 8, "iterations": 10, "regularization": 0.05, "alpha": 3.0}
    model = fit_model("als", params, matrix, engine=Engine("spark", MASTER))
    assert isinstance(model, ALS)
    return model


def test_spark_factors_come_back_to_the_matrix_indices(
    spark_model: ALS, matrix: sp.csr_matrix
) -> None:
    assert spark_model.config.formulation == "spark"
    assert (spark_model.n_users, spark_model.n_items) == matrix.shape
    assert spark_model.user_factors.shape == (60, 8)
    assert spark_model.item_factors.shape == (40, 8)
    # Every user and item had interactions: none was left at zero by a lost id.
    assert np.linalg.norm(spark_model.user_factors, axis=1).min() > 0
    assert np.linalg.norm(spark_model.item_factors, axis=1).min() > 0
    # The factors rank each user's own taste group first, so they are Spark's fit, not noise.
    scores = spark_model.user_factors @ spark_model.item_factors.T
    groups = np.arange(40) // 13
    hits = [np.mean(groups[np.argsort(-scores[u])[:5]] == u % 3) for u in range(60)]
    assert np.mean(hits) > 0.8


def test_fold_in_solves_sparks_problem_exactly(spark_model: ALS, matrix: sp.csr_matrix) -> None:
    # Spark's last half-sweep solves every user against the final item factors, so folding in a
    # trained user's own row must give back Spark's factors for that user.
    folded = spark_model.fold_in(matrix)
    np.testing.assert_allclose(folded, spark_model.user_factors, rtol=2e-3, atol=2e-4)
    row = matrix[5]
    one = spark_model.fold_in_items(row.indices, row.data)
    np.testing.assert_allclose(one, spark_model.user_factors[5], rtol=2e-3, atol=2e-4)
    # With implicit's formulation (C = alpha·r, a fixed penalty) the same factors fold in to
    # something else: the mapping is what makes fold-in exact.
    as_implicit = ALS.from_arrays(
        {**spark_model.config.model_dump(mode="json"), "formulation": "implicit"},
        spark_model.to_arrays(),
    )
    gap = np.abs(as_implicit.fold_in(matrix) - spark_model.user_factors).max()
    assert gap > 1e-2


def test_many_iterations_do_not_overflow_sparks_stack(matrix: sp.csr_matrix) -> None:
    # Every iteration lengthens the lineage Spark serializes with each task; without checkpoints
    # 20 iterations ended in a StackOverflowError on ml-latest-small.
    _need_pyspark()
    model = fit_model(
        "als", {"factors": 4, "iterations": 30}, matrix, engine=Engine("spark", MASTER)
    )
    assert np.isfinite(model.user_factors).all() and model.config.iterations == 30


def test_implicit_does_not_fit_the_spark_formulation(matrix: sp.csr_matrix) -> None:
    with pytest.raises(InvalidInputError, match="--engine spark") as caught:
        ALS(formulation="spark", factors=4).fit(matrix)
    assert caught.value.field == "formulation"


def test_the_spark_engine_refuses_algorithms_it_cannot_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id\nu1,i1\n")
    code = main(["train", "--interactions", str(log), "--engine", "spark", "--algorithm", "ease"])
    assert code == 2
    assert "--engine spark fits als, not 'ease'" in capsys.readouterr().err


def test_train_on_spark_registers_a_model_the_server_cannot_tell_apart(
    tmp_path: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _need_pyspark()
    logs = tmp_path / "logs"
    generate(logs, users=300, items=80, interactions=6_000, seed=5)
    frame = pd.read_parquet(logs / "interactions.parquet")
    # Ids far beyond Spark's 32-bit id columns: the engine maps them, it does not lose them.
    big = 2**40
    frame["user_id"] = (frame["user_id"].astype(str).str[1:].astype(np.int64) + big).astype(str)
    frame["item_id"] = (frame["item_id"].astype(str).str[1:].astype(np.int64) + 3 * big).astype(str)
    frame.to_csv(tmp_path / "log.csv", index=False)

    capsys.readouterr()
    args = ["train", "--interactions", str(tmp_path / "log.csv"), "--engine", "spark"]
    args += ["--spark-master", MASTER, "--param", "factors=8", "--param", "iterations=8"]
    assert main([*args, "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["algorithm"] == "als"  # auto means ALS on Spark
    assert summary["model_version"] == "1"

    run = mlflow.get_run(summary["run_id"])
    assert run.data.params["engine"] == "spark"
    assert run.data.params["spark_master"] == MASTER
    assert run.data.params["model.formulation"] == "spark"
    assert run.data.params["model.factors"] == "8"
    # As good as the local engine's ALS of the same size on the same split (this small generated
    # log favours popularity; what matters is that Spark's factors rank like implicit's).
    local = [a for a in args if a not in ("--engine", "spark", "--spark-master", MASTER)]
    assert main([*local, "--algorithm", "als", "--json", "--quiet"]) == 0
    reference = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert mlflow.get_run(reference["run_id"]).data.params["engine"] == "local"
    spark_ndcg = run.data.metrics["ndcg_at_10"]
    assert spark_ndcg >= 0.8 * reference["metrics"]["ndcg_at_10"]

    bundle = load_model_uri("models:/affinity/1")  # the Spark run (the local one came after)
    assert isinstance(bundle.model, ALS)
    assert bundle.model.config.formulation == "spark"
    users = set(frame["user_id"])
    assert set(bundle.users.ids) <= users and len(bundle.users) > 250
    pipeline = RankingPipeline.from_bundle(bundle)
    user = str(big + 7)
    listed = pipeline.recommend(user, 5)
    assert len(listed) == 5
    seen = set(frame.loc[frame["user_id"] == user, "item_id"])
    assert not seen & set(listed.item_ids)
    # A user the model never saw is folded in with Spark's formulation from recent items.
    recent = sorted(seen)[:3]
    cold = pipeline.recommend("someone-new", 5, recent_item_ids=recent)
    assert len(cold) == 5 and not set(recent) & set(cold.item_ids)
