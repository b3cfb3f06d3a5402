"""Fitting one model: the call a training run, each tuning trial and the benchmarks share.

An :class:`Engine` says where the fit runs: ``local`` (implicit and numpy in this process, every
algorithm) or ``spark`` (``pyspark.ml``'s implicit ALS on a Spark master; :mod:`training.spark`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from threadpoolctl import threadpool_limits

from models.algorithms import get_algorithm
from models.base import Recommender
from models.errors import InvalidInputError

SPARK_ALGORITHMS = ("als",)
"""What ``--engine spark`` fits."""


@dataclass(frozen=True)
class Engine:
    """Where models are fitted: ``local``, or ``spark`` on ``master``."""

    name: Literal["local", "spark"] = "local"
    master: str = "local[*]"

    @property
    def is_local(self) -> bool:
        return self.name == "local"

    def check(self, algorithm: str) -> None:
        """Refuse an algorithm this engine cannot fit, naming the ones it can."""
        if not self.is_local and algorithm not in SPARK_ALGORITHMS:
            raise InvalidInputError(
                f"--engine spark fits {', '.join(SPARK_ALGORITHMS)}, not {algorithm!r}",
                field="algorithm",
            )

    def params(self, algorithm: str, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` completed with this engine's defaults (Spark's ALS has its own)."""
        if self.is_local:
            return dict(params)
        from training.spark import SPARK_ALS_DEFAULTS

        return {**SPARK_ALS_DEFAULTS, **params, "formulation": "spark"}

    def describe(self) -> dict[str, str]:
        """What an MLflow run records about the engine."""
        if self.is_local:
            return {"engine": "local"}
        from training.spark import spark_version

        return {"engine": "spark", "spark_master": self.master, "spark_version": spark_version()}


LOCAL = Engine()


def fit_model(
    algorithm: str,
    params: dict[str, Any],
    matrix: Any,
    on_iteration: Callable[[int, float | None], None] | None = None,
    engine: Engine = LOCAL,
) -> Recommender:
    """Instantiate and fit ``algorithm``; BLAS pinned to one thread as implicit recommends."""
    if not engine.is_local:
        engine.check(algorithm)
        from training.spark import fit_spark_als

        return fit_spark_als(matrix, params, master=engine.master, on_iteration=on_iteration)
    model = get_algorithm(algorithm)(**params)
    with threadpool_limits(1, "blas"):
        model.fit(matrix, progress=on_iteration)
    return model
