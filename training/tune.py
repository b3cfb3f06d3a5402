"""Hyperparameter search with Optuna on the validation split (never on the test split).

Each trial fits on the training part minus the validation part, is scored on the validation part,
and is recorded as a nested MLflow run. Search spaces are set per algorithm, wide enough to work
across datasets, and every search starts from the algorithm's default configuration, then from
configurations known to be good on public data (see ``docs/quality.md`` for the evidence).

Two rules keep the search from making a model worse out of sample:

- **A candidate must beat the defaults by more than noise.** The validation split is a sample;
  among twenty configurations the best one usually wins by luck as much as by merit. The winner
  replaces the default configuration only when its per-user gain over the defaults, paired user
  by user on the same validation split, exceeds :data:`MIN_GAIN_Z` standard errors.
- **A diverged fit is a failed trial, not a failed search.** An SGD learning rate too high for the
  data makes implicit stop with NaN factors; the trial is recorded as failed with the reason (in
  MLflow and the progress output) and the search goes on.
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
import numpy as np
import optuna
import pandas as pd
import scipy.sparse as sp
from implicit.recommender_base import ModelFitError

from models.base import Recommender
from models.ranking_metrics import metric_key
from training.confidence import ConfidenceConfig, build_matrix
from training.evaluate import Evaluation, Holdout, build_holdout, evaluate
from training.fit import LOCAL, Engine, fit_model

logger = logging.getLogger(__name__)

SearchSpace = Callable[[optuna.Trial], dict[str, Any]]
"""Draws one configuration from a trial and returns it as model parameters."""

MIN_GAIN_Z = 2.0
"""How many standard errors of the paired per-user difference a candidate must gain over the
default configuration on validation before it replaces the defaults."""

DIVERGENCE_ERRORS: tuple[type[BaseException], ...] = (
    ModelFitError,
    FloatingPointError,
    np.linalg.LinAlgError,
)
"""Errors a fit raises when a configuration diverges (NaN factors, a singular system)."""

_PER_USER = {
    "ndcg": "ndcg",
    "precision": "precision",
    "recall": "recall",
    "map": "average_precision",
    "mrr": "reciprocal_rank",
    "hit_rate": "hit",
}
"""Metric name (before ``_at_k``) -> its per-user array in
:class:`models.ranking_metrics.UserMetrics`."""


@dataclass(frozen=True)
class Search:
    """How one algorithm is tuned: the space and the trials every search starts with.

    ``seeds`` are Optuna parameter dicts (the names ``space`` suggests, which may differ from the
    model's parameter names) enqueued before the sampler takes over; the first one is the
    algorithm's default configuration, the reference every candidate must beat by more than
    noise.
    """

    space: SearchSpace
    seeds: tuple[dict[str, Any], ...] = field(default_factory=tuple)


def _als(trial: optuna.Trial) -> dict[str, Any]:
    # Implicit's loss divided by alpha is Rendle et al.'s iALS loss (RecSys 2022, "Revisiting the
    # Performance of iALS on Item Recommendation Benchmarks") with unobserved weight 1/alpha and
    # L2 regularization/alpha, so the search draws alpha and the ratio regularization/alpha, the
    # two axes along which good configurations move independently. On the public sets the
    # ratio's optimum sits between 5 and 10 and is sharp (half or twice it scores clearly lower),
    # while alpha above 16 wins validation splits by noise and loses on the test split
    # (docs/quality.md, "What makes ALS competitive, and what tuning can add").
    alpha = trial.suggest_float("alpha", 1.0, 16.0, log=True)
    per_alpha = trial.suggest_float("regularization_per_alpha", 2.5, 20.0, log=True)
    return {
        "factors": trial.suggest_categorical("factors", [128, 256]),
        "regularization": alpha * per_alpha,
        "alpha": alpha,
        "iterations": trial.suggest_int("iterations", 10, 20, step=5),
    }


def _spark_als(trial: optuna.Trial) -> dict[str, Any]:
    # Spark's implicit ALS adds 1 to every confidence and multiplies the penalty by each row's
    # number of interactions (ALS-WR), so its good penalties are a hundred times smaller than
    # implicit's and alpha ranges wider (docs/quality.md, "Training on Spark").
    return {
        "factors": trial.suggest_categorical("factors", [64, 128]),
        "regularization": trial.suggest_float("regularization", 0.03, 3.0, log=True),
        "alpha": trial.suggest_float("alpha", 0.5, 40.0, log=True),
        "iterations": trial.suggest_int("iterations", 10, 20, step=5),
    }


def _ease(trial: optuna.Trial) -> dict[str, Any]:
    # One dimension on an octave grid around the default L2 (200), from 25 to 1600: the optimum
    # lay between 100 and 400 on every public set and protocol, and validation NDCG is flat
    # within an octave there. Seven points keep a full search of a 10k-item catalog (one dense
    # inverse per point) within minutes; repeated proposals reuse a fit (see tune()).
    steps = trial.suggest_int("l2_octaves", -3, 3)
    return {"l2": float(200.0 * 2.0**steps)}


def _bpr(trial: optuna.Trial) -> dict[str, Any]:
    # implicit's BPR over-fits with large steps: at a learning rate of 0.01 the validation score
    # peaks early and falls after more epochs, and rates above about 0.2 diverge. Small steps over
    # many epochs do best (ML-100k validation NDCG@10 by epochs and step size: docs/quality.md,
    # "Known shortfalls").
    return {
        "factors": trial.suggest_categorical("factors", [64, 128]),
        "learning_rate": trial.suggest_float("learning_rate", 1e-3, 0.03, log=True),
        "regularization": trial.suggest_float("regularization", 3e-3, 0.1, log=True),
        "iterations": trial.suggest_int("iterations", 50, 300, step=50),
    }


def _lmf(trial: optuna.Trial) -> dict[str, Any]:
    return {
        "factors": trial.suggest_categorical("factors", [16, 30, 64, 128]),
        "learning_rate": trial.suggest_float("learning_rate", 0.1, 3.0, log=True),
        "regularization": trial.suggest_float("regularization", 0.1, 10.0, log=True),
        "iterations": trial.suggest_int("iterations", 20, 200, step=20),
    }


def _gfcf(trial: optuna.Trial) -> dict[str, Any]:
    # The ideal low-pass weight includes 0 (the linear filter alone); the normalization exponent
    # moves the popularity penalty; the kept spectrum scales with the data's rank.
    # Sharpening damps the leading spectrum (BSPM's sharpening step), on or off.
    use_ideal = trial.suggest_categorical("ideal", [True, False])
    use_sharpening = trial.suggest_categorical("sharpened", [True, False])
    return {
        "alpha": trial.suggest_float("alpha", 0.05, 2.0, log=True) if use_ideal else 0.0,
        "beta": trial.suggest_float("beta", 0.2, 0.6),
        "factors": trial.suggest_int("factors", 32, 1024, log=True),
        "sharpen": trial.suggest_float("sharpen", 0.5, 4.0) if use_sharpening else 0.0,
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
            {"factors": 256, "alpha": 2.0, "regularization_per_alpha": 10.0, "iterations": 15},
            {"factors": 256, "alpha": 8.0, "regularization_per_alpha": 5.0, "iterations": 15},
        ),
    ),
    "ease": Search(_ease, ({"l2_octaves": 0}, {"l2_octaves": 1}, {"l2_octaves": -1})),
    # --engine spark: the first seed is training.spark.SPARK_ALS_DEFAULTS.
    "als@spark": Search(
        _spark_als,
        (
            {"factors": 128, "regularization": 0.75, "alpha": 8.0, "iterations": 15},
            {"factors": 128, "regularization": 1.5, "alpha": 12.0, "iterations": 15},
        ),
    ),
    "bpr": Search(
        _bpr,
        (
            {"factors": 64, "learning_rate": 0.002, "regularization": 0.01, "iterations": 300},
            {"factors": 64, "learning_rate": 0.01, "regularization": 0.01, "iterations": 60},
        ),
    ),
    "lmf": Search(
        _lmf,
        ({"factors": 30, "learning_rate": 1.0, "regularization": 3.0, "iterations": 100},),
    ),
    "gfcf": Search(
        _gfcf,
        (
            {"ideal": True, "alpha": 0.3, "beta": 0.4, "factors": 256, "sharpened": False},
            {"ideal": True, "alpha": 0.3, "beta": 0.4, "factors": 128, "sharpened": False},
            {"ideal": True, "alpha": 0.3, "beta": 0.5, "factors": 256, "sharpened": False},
            {
                "ideal": True,
                "alpha": 0.3,
                "beta": 0.5,
                "factors": 448,
                "sharpened": True,
                "sharpen": 2.5,
            },
        ),
    ),
    "itemknn": Search(_knn, ({"K": 20}, {"K": 100})),
    "bm25": Search(_bm25, ({"K": 20, "K1": 1.2, "B": 0.75}, {"K": 100, "K1": 1.2, "B": 0.75})),
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


class _TrialFailed(Exception):
    """A trial whose fit diverged; Optuna records it as failed and the search goes on."""


def paired_gain(candidate: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean per-user difference ``candidate - reference`` and its standard error.

    Users where either value is undefined (NaN) are skipped; with fewer than two users the
    standard error is infinite, so no candidate can prove a gain.
    """
    diff = np.asarray(candidate, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    diff = diff[np.isfinite(diff)]
    if diff.size < 2:
        return (float(diff.mean()) if diff.size else 0.0), math.inf
    return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(diff.size))


def validation_value(
    model: Recommender, train: sp.csr_matrix, valid: Holdout, *, k: int, metric: str
) -> tuple[float, Evaluation]:
    """``metric`` (a logged name such as ``ndcg_at_10``) of ``model`` fitted on ``train``,
    measured on the validation holdout, and the whole evaluation; an undefined value (no
    validation user) counts as 0. How a tuning trial and ``--algorithm auto`` score a fit."""
    result = evaluate(model, train, valid.matrix, k=k, unrankable=valid.unrankable)
    value = float(result.metrics[metric])
    return (0.0 if math.isnan(value) else value), result


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
    metric: str = "ndcg",
    progress: Callable[[str], None] | None = None,
    timeout: float | None = None,
    engine: Engine = LOCAL,
) -> dict[str, Any]:
    """Search up to ``n_trials`` configurations; returns the parameters to refit with and more.

    ``engine`` fits each trial where the final model is fitted; an engine with its own
    formulation (Spark's ALS) has its own search (``SEARCHES["als@spark"]``).

    The first trials are the algorithm's seeds (:class:`Search`), then TPE proposes. A
    configuration proposed again is not refitted: its earlier score is reused. ``metric`` is a
    name of :data:`models.ranking_metrics.TARGET_METRICS`, measured at ``k``. ``timeout``
    (seconds) stops the search after the trial running when it expires. Parameters in
    ``base_params`` are fixed unless the search space sets them.

    The validation winner replaces the default configuration (the first seed) only when it beats
    it by more than :data:`MIN_GAIN_Z` paired standard errors. The chosen parameters are used
    as they are for the refit on the whole training part: scaling L2 penalties by the larger
    refit (a natural idea, since the losses sum over interactions) did not match where the test
    optimum lay on the public data sets (``docs/quality.md``).

    Returns ``best_params`` (for the refit), ``best_value`` (its validation score),
    ``default_value`` (the first seed's), ``decision`` (a sentence) and ``trials`` (one dict per
    trial: ``number``, ``params``, ``value``, ``reused``, and ``failed`` with the reason for a
    diverged fit).
    """
    metric = metric_key(metric, k)  # "ndcg" or "ndcg_at_<k>": the name evaluation logs at k
    search = SEARCHES.get(algorithm if engine.is_local else f"{algorithm}@{engine.name}")
    if search is None:
        logger.info("%s has no hyperparameters to tune; skipping", algorithm)
        return {"best_params": {}, "best_value": None, "trials": []}
    train = build_matrix(fit_frame, confidence)
    # The same holdout definition as the test part: items unseen in training count as misses.
    valid = build_holdout(validation_frame, train.users, train.items)
    fixed = dict(base_params or {})
    per_user_name = _PER_USER.get(metric.rsplit("_at_", 1)[0])
    trials: list[dict[str, Any]] = []
    scores: dict[tuple[tuple[str, str], ...], float] = {}
    failures: dict[tuple[tuple[str, str], ...], str] = {}
    per_user: dict[tuple[tuple[str, str], ...], np.ndarray] = {}

    def say(message: str) -> None:
        if progress is not None:
            progress(message)

    def objective(trial: optuna.Trial) -> float:
        params = {**fixed, **search.space(trial)}
        trial.set_user_attr("params", params)
        key = _key(params)
        cached = key in scores or key in failures
        start = time.perf_counter()
        label = f"trial {trial.number + 1}/{n_trials}"
        if key in failures or (not cached and not _fit_trial(trial, params, key)):
            reason = failures[key]
            trial.set_user_attr("failed", reason)
            trials.append(
                {
                    "number": trial.number,
                    "params": params,
                    "value": None,
                    "reused": cached,
                    "failed": reason,
                }
            )
            say(f"{label}: failed ({reason}){' (reused)' if cached else ''} {params}")
            raise _TrialFailed(reason)
        value = scores[key]
        trials.append({"number": trial.number, "params": params, "value": value, "reused": cached})
        note = " (reused)" if cached else f" in {time.perf_counter() - start:.1f}s"
        say(f"{label}: {metric}={value:.4f}{note} {params}")
        return value

    def _fit_trial(
        trial: optuna.Trial, params: dict[str, Any], key: tuple[tuple[str, str], ...]
    ) -> bool:
        """Fit and score one configuration (into ``scores``); False if it diverged."""
        start = time.perf_counter()
        try:
            with mlflow.start_run(nested=True, run_name=f"trial-{trial.number}"):
                mlflow.log_params(params)
                try:
                    model = fit_model(algorithm, params, train.matrix, engine=engine)
                except DIVERGENCE_ERRORS as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                    mlflow.set_tags({"trial_state": "failed", "failure_reason": reason})
                    mlflow.log_metric("trial_seconds", time.perf_counter() - start)
                    # Leaving the run with an exception marks it FAILED in MLflow.
                    raise _TrialFailed(reason) from exc
                fit_seconds = time.perf_counter() - start
                value, result = validation_value(model, train.matrix, valid, k=k, metric=metric)
                if per_user_name is not None and result.per_user is not None:
                    per_user[key] = np.asarray(getattr(result.per_user, per_user_name))
                mlflow.set_tag("trial_state", "complete")
                mlflow.log_metrics(
                    {
                        f"validation_{metric}": value,
                        "fit_seconds": fit_seconds,
                        "trial_seconds": time.perf_counter() - start,
                    }
                )
        except _TrialFailed as exc:
            failures[key] = str(exc)
            logger.warning("trial %d of %s failed: %s", trial.number, algorithm, exc)
            return False
        scores[key] = value
        return True

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize", sampler=_sampler(seed, n_trials))
    for seed_params in search.seeds[:n_trials]:
        study.enqueue_trial(seed_params)
    study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=(_TrialFailed,))
    completed = [t for t in trials if t.get("failed") is None]
    if not completed:
        decision = "every trial failed; keeping the default configuration"
        say(decision)
        logger.warning("tuning %s: %s", algorithm, decision)
        return {
            "best_params": dict(fixed),
            "best_value": None,
            "default_value": None,
            "decision": decision,
            "trials": trials,
        }
    winner = max(completed, key=lambda t: t["value"])  # the earliest among equal scores
    reference = trials[0] if trials and trials[0]["number"] == 0 else None
    chosen, decision = _choose(winner, reference, per_user, metric)
    best = dict(chosen["params"])
    say(f"tuning {algorithm}: {decision}")
    mlflow.log_metric(f"validation_best_{metric}", chosen["value"])
    mlflow.set_tag("tuning_decision", decision)
    logger.info(
        "tuned %s: %s; refit with %s (%d trials, %d fits, %d failed)",
        algorithm,
        decision,
        best,
        len(trials),
        len(scores),
        len(failures),
    )
    return {
        "best_params": best,
        "best_value": chosen["value"],
        "default_value": None if reference is None else reference.get("value"),
        "decision": decision,
        "trials": trials,
    }


def _choose(
    winner: dict[str, Any],
    reference: dict[str, Any] | None,
    per_user: dict[tuple[tuple[str, str], ...], np.ndarray],
    metric: str,
) -> tuple[dict[str, Any], str]:
    """The trial to keep (the validation winner or the reference) and why, in a sentence."""
    name = f"{metric} {winner['value']:.4f}"
    if reference is None or reference.get("failed") is not None:
        return winner, f"no default to compare with; best validation {name}"
    if _key(winner["params"]) == _key(reference["params"]):
        return reference, f"the defaults scored best on validation ({name})"
    ours, theirs = per_user.get(_key(winner["params"])), per_user.get(_key(reference["params"]))
    if ours is None or theirs is None:
        return winner, f"best validation {name} (no per-user values to test the gain)"
    gain, stderr = paired_gain(ours, theirs)
    text = f"gain {gain:+.4f} over the defaults, {MIN_GAIN_Z:g} standard errors = "
    text += f"{MIN_GAIN_Z * stderr:.4f}"
    if gain > MIN_GAIN_Z * stderr:
        return winner, f"best validation {name}, {text}: tuned parameters kept"
    return reference, f"best validation {name}, {text}: within noise, defaults kept"
