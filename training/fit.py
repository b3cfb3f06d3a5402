"""Fitting one model: the call a training run, each tuning trial and the benchmarks share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from threadpoolctl import threadpool_limits

from models.algorithms import get_algorithm
from models.base import Recommender


def fit_model(
    algorithm: str,
    params: dict[str, Any],
    matrix: Any,
    on_iteration: Callable[[int, float | None], None] | None = None,
) -> Recommender:
    """Instantiate and fit ``algorithm``; BLAS pinned to one thread as implicit recommends."""
    model = get_algorithm(algorithm)(**params)
    with threadpool_limits(1, "blas"):
        model.fit(matrix, progress=on_iteration)
    return model
