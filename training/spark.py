"""Fit implicit-feedback ALS on Apache Spark (``affinity train --engine spark``).

For logs too large for one machine, the factorization runs on ``pyspark.ml.recommendation.ALS``
(``implicitPrefs=True``) on a Spark cluster, or in local mode (``--spark-master local[*]``, the
default). Everything around the fit is the local engine's: the same validated input, confidence
matrix, split, evaluation, MLflow run and artifact. The result is a
:class:`models.factorization.ALS` with ``formulation="spark"``, so the server folds new users
in by solving Spark's problem exactly (confidence ``1 + alpha·|r|``, penalty ``λ`` times the
user's positive entries) and cannot otherwise tell the engines apart.

Ids reach Spark as the training matrix's row and column indices (contiguous ``int32``, whatever
the external ids are: strings, or integers beyond Spark's 32-bit id columns), and the factors
come back to the same indices. The interactions travel as a Parquet file in a temporary folder
and the factors come back the same way, which is how a cluster would read them from shared
storage and avoids pandas conversions in the driver.

pyspark is an optional extra (``pip install 'affinity[spark]'``) and needs a Java runtime (17
or newer).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from models.errors import InvalidInputError
from models.factorization import ALS, ALSConfig

logger = logging.getLogger(__name__)

DEFAULT_MASTER = "local[*]"

SPARK_ALS_DEFAULTS: dict[str, Any] = {
    "factors": 128,
    "regularization": 0.75,
    "alpha": 8.0,
    "iterations": 15,
}
"""Spark's own defaults for ``--engine spark``, chosen on the validation splits of the shared data
sets (``docs/quality.md``, "Training on Spark"): Spark scales the penalty by each row's count and
adds 1 to every confidence, so implicit's values (λ 20, alpha 2) do not carry over."""

_lock = threading.Lock()
_sessions: dict[str, Any] = {}


class SparkUnavailableError(InvalidInputError):
    """pyspark (or the Java runtime it needs) is not installed."""


def require_pyspark() -> None:
    """Raise :class:`SparkUnavailableError` with what to install when pyspark is missing."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise SparkUnavailableError(
            "--engine spark needs pyspark: pip install 'affinity[spark]' (and a Java 17+ runtime)",
            field="engine",
        ) from None


def session(master: str = DEFAULT_MASTER) -> Any:
    """The process's Spark session for ``master``, started on first use and kept.

    Local mode is configured for a recommender's job on one machine: no web UI or progress
    bars, few shuffle partitions, and a driver memory from ``AFFINITY_SPARK_DRIVER_MEMORY``
    (default ``2g``).
    """
    require_pyspark()
    from pyspark.sql import SparkSession

    with _lock:
        existing = _sessions.get(master)
        if existing is not None and not existing.sparkContext._jsc.sc().isStopped():
            return existing
        started = time.perf_counter()
        builder = (
            SparkSession.builder.master(master)
            .appName("affinity-train")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.shuffle.partitions", "8")
            .config("spark.driver.memory", os.environ.get("AFFINITY_SPARK_DRIVER_MEMORY", "2g"))
        )
        try:
            spark = builder.getOrCreate()
        except Exception as exc:  # the JVM did not start: name the cause once, plainly
            raise SparkUnavailableError(
                f"could not start Spark ({master}): {exc}; is a Java 17+ runtime installed?",
                field="spark_master",
            ) from exc
        spark.sparkContext.setLogLevel("ERROR")
        logger.info(
            "Spark %s session on %s in %.1fs", spark.version, master, time.perf_counter() - started
        )
        _sessions[master] = spark
        return spark


def spark_version() -> str:
    """The installed pyspark's version ("" when it is missing)."""
    try:
        import pyspark
    except ImportError:
        return ""
    return str(pyspark.__version__)


def _write_triples(matrix: sp.csr_matrix, path: Path) -> None:
    coo = matrix.tocoo()
    table = pa.table(
        {
            "user": pa.array(coo.row.astype(np.int32)),
            "item": pa.array(coo.col.astype(np.int32)),
            "value": pa.array(coo.data.astype(np.float32)),
        }
    )
    pq.write_table(table, path)


def _read_factors(folder: Path, n_rows: int, rank: int) -> np.ndarray:
    """Spark's ``(id, features)`` factor table, written as Parquet, as rows ``0..n_rows-1``.

    A row Spark never saw (no interaction) gets zeros, as implicit leaves an empty row's factors
    near zero.
    """
    table = pq.read_table(folder)
    ids = table.column("id").to_numpy()
    features = table.column("features").combine_chunks()
    values = features.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    factors = np.zeros((n_rows, rank), dtype=np.float32)
    factors[ids] = values.reshape(len(ids), rank)
    return factors


def fit_spark_als(
    matrix: sp.csr_matrix,
    params: dict[str, Any] | None = None,
    *,
    master: str = DEFAULT_MASTER,
    on_iteration: Callable[[int, float | None], None] | None = None,
) -> ALS:
    """Fit ``pyspark.ml``'s implicit ALS on ``matrix`` (users x items confidence values).

    ``params`` are :class:`ALSConfig` fields (``factors`` -> ``rank``, ``regularization`` ->
    ``regParam``, ``alpha``, ``iterations`` -> ``maxIter``, ``random_state`` -> ``seed``) over
    :data:`SPARK_ALS_DEFAULTS`; the model's ``formulation`` is ``spark``.
    """
    merged = {**SPARK_ALS_DEFAULTS, **(params or {}), "formulation": "spark"}
    config = ALSConfig(**merged)
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    if matrix.nnz == 0:
        raise InvalidInputError("cannot fit on an empty interaction matrix")
    if max(matrix.shape) >= 2**31:
        raise InvalidInputError(f"{matrix.shape} is beyond Spark's 32-bit row and column ids")
    spark = session(master)
    from pyspark.ml.recommendation import ALS as SparkALS

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="affinity-spark-") as tmp:
        folder = Path(tmp)
        _write_triples(matrix, folder / "interactions.parquet")
        # Each ALS iteration extends the RDD lineage; without checkpoints (every
        # checkpointInterval iterations, once a checkpoint folder is set) 20 iterations
        # overflow the JVM's stack while deserializing the tasks.
        spark.sparkContext.setCheckpointDir(str(folder / "checkpoints"))
        frame = spark.read.parquet(str(folder / "interactions.parquet"))
        estimator = SparkALS(
            rank=config.factors,
            maxIter=config.iterations,
            regParam=config.regularization,
            alpha=config.alpha,
            implicitPrefs=True,
            userCol="user",
            itemCol="item",
            ratingCol="value",
            seed=config.random_state if config.random_state is not None else 0,
            nonnegative=False,
            coldStartStrategy="nan",
            checkpointInterval=5,
        )
        fitted = estimator.fit(frame)
        fitted.userFactors.write.parquet(str(folder / "users"))
        fitted.itemFactors.write.parquet(str(folder / "items"))
        users = _read_factors(folder / "users", matrix.shape[0], config.factors)
        items = _read_factors(folder / "items", matrix.shape[1], config.factors)
    logger.info(
        "Spark ALS: %d x %d, rank %d, %d iterations in %.1fs",
        *matrix.shape,
        config.factors,
        config.iterations,
        time.perf_counter() - started,
    )
    if on_iteration is not None:  # Spark reports no per-iteration loss: one tick at the end
        on_iteration(config.iterations, None)
    shape = np.array(matrix.shape, dtype=np.int64)
    return ALS.from_arrays(
        config.model_dump(mode="json"),
        {"user_factors": users, "item_factors": items, "_shape": shape},
    )
