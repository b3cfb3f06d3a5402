"""Hyperparameter search with Optuna on the validation split (never on the test split).

Each trial fits on the training part minus the validation part, is scored on the validation part,
and is recorded as a nested MLflow run. Search spaces are set per algorithm, wide enough to work
across datasets, and every search starts from configurations known to be good on public data
(see ``docs/quality.md`` for the evidence behind them).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlflow
import optuna
import pandas as pd

from training.confidence import ConfidenceConfig, build_matrix
from training.evaluate import evaluate

logger = logging.getLogger(__name__)

SearchSpace = Callable[[optuna.Trial], dict[str, Any]]
"""Draws one configuration from a trial and returns it as model parameters."""


@dataclass(frozen=True)
class Search:
    """How one algorithm is tuned: the space and the trials every search starts with.

    ``seeds`` are Optuna parameter dicts (the names ``space`` suggests, which may differ from the
    model's parameter names) enqueued before the sampler takes over, so a search of a handful of
    trials already covers the configurations that work across public data sets.
    """

    space: SearchSpace
    seeds: tuple[dict[str, Any], ...] = field(default_factory=tuple)


def _als(trial: optuna.Trial) -> dict[str, Any]:
    # Implicit's loss sums over every item per user (and every user per item), so good
    # regularization grows with the data and sits between 1 and 100 on public sets; a log scale
    # from 0.1 to 300 covers small and large catalogs. Moderate confidence scaling wins once the
    # model is regularized enough (Rendle et al. 2022, "Revisiting the Performance of iALS").
    return {
        "factors": trial.suggest_categorical("factors", [64, 128, 256]),
        "regularization": trial.suggest_float("regularization", 0.1, 300.0, log=True),
        "alpha": trial.suggest_float("alpha", 0.25, 50.0, log=True),
        "iterations": trial.suggest_int("iterations", 10, 25, step=5),
    }


def _ease(trial: optuna.Trial) -> dict[str, Any]:
    # One dimension: a quantized log grid lets repeated proposals reuse a fit (see tune()).
    exponent = trial.suggest_float("log10_l2", 0.0, 4.0, step=0.125)
    return {"l2": float(round(10.0**exponent, 3))}


def _bpr(trial: optuna.Trial) -> dict[str, Any]:
    return {
        "factors": trial.suggest_categorical("factors", [64, 128, 256]),
        "learning_rate": trial.suggest_float("learning_rate", 3e-3, 0.3, log=True),
        "regularization": trial.suggest_float("regularization", 1e-4, 0.1, log=True),
        "iterations": trial.suggest_int("iterations", 100, 400, step=100),
    }


def _lmf(trial: optuna.Trial) -> dict[str, Any]:
    return {
        "factors": trial.suggest_categorical("factors", [16, 32, 64, 128]),
        "learning_rate": trial.suggest_float("learning_rate", 0.1, 3.0, log=True),
        "regularization": trial.suggest_float("regularization", 0.1, 10.0, log=True),
        "iterations": trial.suggest_int("iterations", 10, 60, step=10),
    }


def _knn(trial: optuna.Trial) -> dict[str, Any]:
    return {"K": trial.suggest_int("K", 10, 1000, log=True)}


def _bm25(trial: optuna.Trial) -> dict[str, Any]:
    return {
        "K": trial.suggest_int("K", 10, 1000, log=True),
        "K1": trial.suggest_float("K1", 0.3, 3.0),
        "B": trial.suggest_float("B", 0.0, 1.0),
    }


SEARCHES: dict[str, Search] = {
    "als": Search(
        _als,
        (
            {"factors": 256, "regularization": 20.0, "alpha": 2.0, "iterations": 15},
            {"factors": 128, "regularization": 5.0, "alpha": 1.0, "iterations": 15},
        ),
    ),
    "ease": Search(_ease, ({"log10_l2": 2.5}, {"log10_l2": 1.5}, {"log10_l2": 3.5})),
    "bpr": Search(
        _bpr,
        (
            {"factors": 128, "learning_rate": 0.05, "regularization": 0.001, "iterations": 200},
            {"factors": 64, "learning_rate": 0.01, "regularization": 0.01, "iterations": 100},
        ),
    ),
    "lmf": Search(
        _lmf,
        ({"factors": 32, "learning_rate": 1.0, "regularization": 0.6, "iterations": 30},),
    ),
    "itemknn": Search(_knn, ({"K": 100},)),
    "bm25": Search(_bm25, ({"K": 100, "K1": 1.2, "B": 0.75},)),
}
"""Algorithm -> search; algorithms without an entry have nothing to tune."""

SEARCH_SPACES: dict[str, SearchSpace] = {name: search.space for name, search in SEARCHES.items()}
"""Algorithm -> search space (the ``space`` of :data:`SEARCHES`)."""


def _sampler(seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        # multivariate TPE is flagged experimental, and warnings are errors in the test suite.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed,
            # Short searches still get a model-guided phase after a few random draws.
            n_startup_trials=max(3, min(10, n_trials // 3)),
            # Regularization and confidence scaling interact; model them jointly.
            multivariate=True,
        )


def _key(params: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((name, repr(value)) for name, value in params.items()))


def tune(
    algorithm: str,
    fit_frame: pd.DataFrame,
    validation_frame: pd.DataFrame,
    *,
    confidence: ConfidenceConfig,
    n_trials: int,
    k: int = 10,
    base_params: dict[str, Any] | None = None,
    seed: int = 42,
    metric: str = "ndcg_at_10",
    progress: Callable[[str], None] | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Search up to ``n_trials`` configurations; returns best params, best value and all trials.

    The first trials are the algorithm's seeds (:class:`Search`), then TPE proposes. A
    configuration proposed again is not refitted: its earlier score is reused. ``timeout``
    (seconds) stops the search after the trial running when it expires. Parameters in
    ``base_params`` are fixed unless the search space sets them.
    """
    from training.pipeline import fit_model  # local: pipeline imports this module

    search = SEARCHES.get(algorithm)
    if search is None:
        logger.info("%s has no hyperparameters to tune; skipping", algorithm)
        return {"best_params": {}, "best_value": None, "trials": []}
    train = build_matrix(fit_frame, confidence)
    valid = build_matrix(validation_frame, ConfidenceConfig(), users=train.users, items=train.items)
    fixed = dict(base_params or {})
    trials: list[dict[str, Any]] = []
    scores: dict[tuple[tuple[str, str], ...], float] = {}

    def objective(trial: optuna.Trial) -> float:
        params = {**fixed, **search.space(trial)}
        trial.set_user_attr("params", params)
        key = _key(params)
        cached = key in scores
        start = time.perf_counter()
        if cached:
            value = scores[key]
        else:
            with mlflow.start_run(nested=True, run_name=f"trial-{trial.number}"):
                model = fit_model(algorithm, params, train.matrix)
                fit_seconds = time.perf_counter() - start
                result = evaluate(model, train.matrix, valid.matrix, k=k)
                value = float(result.metrics[metric])
                if math.isnan(value):
                    value = 0.0
                mlflow.log_params(params)
                mlflow.log_metrics(
                    {
                        f"validation_{metric}": value,
                        "fit_seconds": fit_seconds,
                        "trial_seconds": time.perf_counter() - start,
                    }
                )
            scores[key] = value
        trials.append({"number": trial.number, "params": params, "value": value, "reused": cached})
        if progress is not None:
            note = " (reused)" if cached else f" in {time.perf_counter() - start:.1f}s"
            progress(f"trial {trial.number + 1}/{n_trials}: {metric}={value:.4f}{note} {params}")
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=_sampler(seed, n_trials))
    for seed_params in search.seeds[:n_trials]:
        study.enqueue_trial(seed_params)
    study.optimize(objective, n_trials=n_trials, timeout=timeout)
    best = {**fixed, **study.best_trial.user_attrs["params"]}
    mlflow.log_metric(f"validation_best_{metric}", study.best_value)
    logger.info(
        "tuned %s: best validation %s %.4f with %s (%d trials, %d fits)",
        algorithm,
        metric,
        study.best_value,
        best,
        len(trials),
        len(scores),
    )
    return {"best_params": best, "best_value": study.best_value, "trials": trials}
