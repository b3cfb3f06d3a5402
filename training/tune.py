"""Hyperparameter search with Optuna on the validation split (never on the test split).

Each trial fits on the training part minus the validation part, is scored on the validation part,
and is recorded as a nested MLflow run. Search spaces are set per algorithm, wide enough to work
across datasets (see ``docs/quality.md`` for the evidence behind them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import mlflow
import optuna
import pandas as pd

from training.confidence import ConfidenceConfig, build_matrix
from training.evaluate import evaluate

logger = logging.getLogger(__name__)

SearchSpace = Callable[[optuna.Trial], dict[str, Any]]


def _als(trial: optuna.Trial) -> dict[str, Any]:
    return {
        "factors": trial.suggest_categorical("factors", [32, 64, 128, 192]),
        "regularization": trial.suggest_float("regularization", 1e-3, 50.0, log=True),
        "alpha": trial.suggest_float("alpha", 0.1, 50.0, log=True),
        "iterations": trial.suggest_int("iterations", 8, 25),
    }


def _bpr(trial: optuna.Trial) -> dict[str, Any]:
    return {
        "factors": trial.suggest_categorical("factors", [32, 64, 128]),
        "learning_rate": trial.suggest_float("learning_rate", 1e-3, 0.2, log=True),
        "regularization": trial.suggest_float("regularization", 1e-5, 0.1, log=True),
        "iterations": trial.suggest_int("iterations", 50, 300, step=50),
    }


def _lmf(trial: optuna.Trial) -> dict[str, Any]:
    return {
        "factors": trial.suggest_categorical("factors", [16, 32, 64]),
        "learning_rate": trial.suggest_float("learning_rate", 0.1, 2.0, log=True),
        "regularization": trial.suggest_float("regularization", 0.1, 5.0, log=True),
        "iterations": trial.suggest_int("iterations", 10, 50, step=10),
    }


def _knn(trial: optuna.Trial) -> dict[str, Any]:
    return {"K": trial.suggest_int("K", 10, 500, log=True)}


def _bm25(trial: optuna.Trial) -> dict[str, Any]:
    return {
        "K": trial.suggest_int("K", 10, 500, log=True),
        "K1": trial.suggest_float("K1", 0.3, 3.0),
        "B": trial.suggest_float("B", 0.0, 1.0),
    }


def _ease(trial: optuna.Trial) -> dict[str, Any]:
    return {"l2": trial.suggest_float("l2", 1.0, 5000.0, log=True)}


SEARCH_SPACES: dict[str, SearchSpace] = {
    "als": _als,
    "bpr": _bpr,
    "lmf": _lmf,
    "itemknn": _knn,
    "bm25": _bm25,
    "ease": _ease,
}


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
) -> dict[str, Any]:
    """Search ``n_trials`` configurations; returns best params, best value and all trials."""
    from training.pipeline import fit_model  # local: pipeline imports this module

    space = SEARCH_SPACES.get(algorithm)
    if space is None:
        logger.info("%s has no hyperparameters to tune; skipping", algorithm)
        return {"best_params": {}, "best_value": None, "trials": []}
    train = build_matrix(fit_frame, confidence)
    valid = build_matrix(validation_frame, ConfidenceConfig(), users=train.users, items=train.items)
    fixed = dict(base_params or {})
    trials: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        params = {**fixed, **space(trial)}
        start = time.perf_counter()
        with mlflow.start_run(nested=True, run_name=f"trial-{trial.number}"):
            model = fit_model(algorithm, params, train.matrix)
            result = evaluate(model, train.matrix, valid.matrix, k=k)
            value = float(result.metrics[metric])
            mlflow.log_params(params)
            mlflow.log_metrics(
                {f"validation_{metric}": value, "fit_seconds": time.perf_counter() - start}
            )
        trials.append({"number": trial.number, "params": params, "value": value})
        if progress is not None:
            progress(f"trial {trial.number + 1}/{n_trials}: {metric}={value:.4f} {params}")
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=n_trials)
    best = {**fixed, **study.best_trial.params}
    mlflow.log_metric(f"validation_best_{metric}", study.best_value)
    return {"best_params": best, "best_value": study.best_value, "trials": trials}
