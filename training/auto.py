"""``affinity train --algorithm auto``: compare a few algorithms' defaults on the validation split.

Which algorithm is best depends on the data: ALS leads on MovieLens-100k, EASE on the sparser
ml-latest-small and retail logs, BM25 item-kNN on some temporal splits (``docs/quality.md``,
"Which algorithm when"). A user whose log looks unlike those should not have to know that, so
:func:`choose_algorithm` fits each of :data:`AUTO_CANDIDATES` with its default hyperparameters on
the fit part of the tuning split (the one ``--tune`` searches on; never the test part), scores
each on the validation part with the run's primary metric at ``k`` (the evaluation a tuning
trial makes, :func:`training.tune.validation_value`) and keeps the best. The run then goes on as
if the user had named that algorithm, ``--tune`` included.

A candidate that cannot fit the data is skipped with its reason rather than failing the run:
before fitting when its own memory estimate is over its default budget (or EASE's catalog over
:data:`AUTO_EASE_MAX_ITEMS`), or when its fit raises. Only when every candidate is skipped does
the choice fail, with every reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from models import ease, gfcf
from models.errors import InvalidInputError
from models.ranking_metrics import metric_key
from training.confidence import ConfidenceConfig, build_matrix
from training.evaluate import build_holdout, sample_users
from training.fit import fit_model
from training.tune import validation_value

logger = logging.getLogger(__name__)

AUTO = "auto"
"""The ``--algorithm`` value that chooses among :data:`AUTO_CANDIDATES`."""

AUTO_CANDIDATES: tuple[str, ...] = ("als", "ease", "gfcf", "bm25")
"""What ``--algorithm auto`` compares, in this order; a tie goes to the earlier one.

ALS first: the default before ``auto``, the best on the denser MovieLens-100k, memory linear in
the catalog. EASE: the most accurate on the sparser ml-latest-small and retail logs, for catalogs
it can hold. GF-CF: training-free, made for sparse logs, and factored for catalogs too large for
EASE. BM25 item-kNN: fits in seconds and led on the retail temporal split. BPR, LMF and plain
item-kNN trail these with their defaults on every data set measured, and popularity is the
baseline every run is compared with anyway (``docs/quality.md``)."""

AUTO_EASE_MAX_ITEMS = 20_000
"""``auto`` skips EASE above this many items, even where its memory estimate fits the budget.

Its fit inverts a dense items x items matrix, cubic in the catalog: a minute or more at 9k items
on a busy 2-core machine, so about ten times that at 20k; the bound is the one
``docs/quality.md`` recommends EASE up to. Name ``--algorithm ease`` to fit it beyond."""

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DataSize:
    """The size of the matrix a candidate will be fitted on: what its memory estimate needs."""

    users: int
    items: int
    interactions: int

    def cover(self, other: DataSize | None) -> DataSize:
        """The larger of the two in every dimension (the fit part and the refit's whole part)."""
        if other is None:
            return self
        return DataSize(
            max(self.users, other.users),
            max(self.items, other.items),
            max(self.interactions, other.interactions),
        )


@dataclass(frozen=True)
class Candidate:
    """How one candidate did on the validation split."""

    algorithm: str
    value: float | None = None
    """Its primary metric on the validation part; ``None`` when skipped."""
    seconds: float | None = None
    """Seconds its fit took; ``None`` when it was skipped before fitting."""
    skipped: str | None = None
    """Why it was not compared (too large, or its fit failed); ``None`` when it was."""

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "seconds": self.seconds, "skipped": self.skipped}


@dataclass(frozen=True)
class AutoChoice:
    """What :func:`choose_algorithm` decided, and each candidate's result in order."""

    chosen: str
    metric: str
    """The primary metric at ``k`` the candidates were compared on, e.g. ``ndcg_at_10``."""
    candidates: tuple[Candidate, ...]

    def to_json(self) -> dict[str, Any]:
        """The ``auto`` object of ``affinity train --json``."""
        return {
            "chosen": self.chosen,
            "metric": self.metric,
            "candidates": {c.algorithm: c.to_json() for c in self.candidates},
        }

    def summary(self) -> str:
        """One line: each candidate's value or ``skipped``, in order."""
        return ", ".join(
            f"{c.algorithm} {'skipped' if c.value is None else f'{c.value:.4f}'}"
            for c in self.candidates
        )


def too_large(algorithm: str, size: DataSize) -> str | None:
    """Why ``algorithm`` with its defaults should not be fitted on data of ``size``, or ``None``.

    EASE and GF-CF keep item x item (or, factored, interaction-sized) state and refuse budgets
    they exceed, with their own estimates; asking the estimates first skips them without
    building anything. ALS and BM25 are linear in the data and always tried.
    """
    if algorithm == "ease":
        if size.items > AUTO_EASE_MAX_ITEMS:
            return (
                f"{size.items:,} items, over the {AUTO_EASE_MAX_ITEMS:,} auto fits EASE on "
                "(its fit is cubic in the catalog; name --algorithm ease to fit it anyway)"
            )
        needed, budget = ease.estimate_memory_gb(size.items), ease.EASEConfig().max_memory_gb
    elif algorithm == "gfcf":
        config = gfcf.GFCFConfig.model_validate({})  # its defaults
        if size.items <= config.dense_max_items:
            needed = gfcf.estimate_memory_gb(size.items)
        else:
            needed = gfcf.estimate_factored_memory_gb(
                size.users, size.items, size.interactions, config.factors
            )
        budget = config.max_memory_gb
    else:
        return None
    if needed > budget:
        return f"needs about {needed:.2f} GB, over its default max_memory_gb={budget:g}"
    return None


def choose_algorithm(
    fit_frame: pd.DataFrame,
    validation_frame: pd.DataFrame,
    *,
    confidence: ConfidenceConfig,
    k: int = 10,
    metric: str = "ndcg",
    eval_users: int = 0,
    seed: int = 42,
    refit_size: DataSize | None = None,
    candidates: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> AutoChoice:
    """Fit each of ``candidates`` (default :data:`AUTO_CANDIDATES`) with its defaults on
    ``fit_frame``, score it on ``validation_frame`` and return the best (the earliest among equal
    values).

    ``metric`` is a name of :data:`models.ranking_metrics.TARGET_METRICS`, measured at ``k``, as
    in :func:`training.tune.tune`. At most ``eval_users`` validation users are scored (a seeded
    sample, as the test evaluation samples; 0: all). ``refit_size`` is the size of the data the
    chosen algorithm will be refitted on (the whole training part): the memory checks of
    :func:`too_large` use the larger of it and the fit part. Raises
    :class:`~models.errors.InvalidInputError` with every reason when no candidate could be
    compared.
    """
    metric = metric_key(metric, k)
    candidates = AUTO_CANDIDATES if candidates is None else tuple(candidates)

    def say(message: str) -> None:
        if progress is not None:
            progress(message)

    say(
        f"choosing the algorithm: {', '.join(candidates)} with their defaults, scored on the "
        f"validation split ({metric})"
    )
    train = build_matrix(fit_frame, confidence)
    valid = sample_users(
        build_holdout(validation_frame, train.users, train.items), eval_users, seed
    )
    n_users, n_items = train.matrix.shape
    size = DataSize(n_users, n_items, int(train.matrix.nnz)).cover(refit_size)
    results: list[Candidate] = []
    for algorithm in candidates:
        reason = too_large(algorithm, size)
        if reason is not None:
            results.append(Candidate(algorithm, skipped=reason))
            say(f"  {algorithm}: skipped ({reason})")
            continue
        started = time.perf_counter()
        try:
            model = fit_model(algorithm, {}, train.matrix)
            seconds = time.perf_counter() - started
            value, _ = validation_value(model, train.matrix, valid, k=k, metric=metric)
        except Exception as exc:  # too large, diverged...: not the end of a run others can finish
            logger.debug("auto: %s failed", algorithm, exc_info=True)
            reason = f"{type(exc).__name__}: {exc}"
            results.append(
                Candidate(algorithm, seconds=time.perf_counter() - started, skipped=reason)
            )
            say(f"  {algorithm}: skipped ({reason})")
            continue
        results.append(Candidate(algorithm, value=value, seconds=seconds))
        say(f"  {algorithm}: {metric} {value:.4f} (fit {seconds:.1f}s)")
    scored = [c for c in results if c.value is not None]
    if not scored:
        reasons = "; ".join(f"{c.algorithm}: {c.skipped}" for c in results)
        raise InvalidInputError(
            f"--algorithm auto could not fit any candidate ({reasons})", field="algorithm"
        )
    best = max(scored, key=lambda c: c.value or 0.0)  # max keeps the earliest among equals
    choice = AutoChoice(chosen=best.algorithm, metric=metric, candidates=tuple(results))
    say(f"chose {best.algorithm}: best validation {metric} ({choice.summary()})")
    logger.info("auto chose %s on validation %s: %s", best.algorithm, metric, choice.summary())
    return choice
