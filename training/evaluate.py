"""Evaluate a fitted recommender on a holdout: top-k metrics overall and per user cohort.

Ranks for every user with held-out items, in batches, through the same ranking pipeline that
serves requests (:mod:`models.ranking`: training items excluded, backfill from popular items),
and compares against a popularity baseline fitted on the same training matrix. With ``rules``
(:class:`models.rules.Rules`) every list is ranked under them, as a served list would be; with a
``catalog`` the rules see the items' categories and first appearances.

With ``stages`` (each user's lifecycle stage, :func:`user_stages`: computed from the training
part as of its end with :mod:`models.lifecycle`) every metric is also reported per stage, as
MLflow metrics ``ndcg_at_10.stage_at_risk`` and in the report.

Beside accuracy every evaluation measures intra-list diversity (``diversity_at_k``: over the
model's item vectors where it has them, else over the catalog's categories; see
:func:`diversity_space`), catalog coverage and novelty.

:func:`build_holdout` is the one definition of the holdout that ``affinity train``, tuning, the
promotion gate and ``bench/quality.py`` evaluate on: held-out items the model never saw in
training stay relevant (they count as misses), held-out users it never saw are left out.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from models.artifact import ItemCatalog
from models.base import Recommender
from models.errors import InvalidInputError
from models.lifecycle import STAGES, Activity, SegmentsConfig, assign_stages
from models.popularity import Popularity
from models.ranking import ItemFilter, RankingPipeline
from models.ranking_metrics import (
    METRIC_NAMES,
    ItemSpace,
    UserMetrics,
    active_users,
    mean_metrics,
    per_user_metrics,
    relevance_matrix,
    unrankable_counts,
)
from models.ranking_metrics import item_popularity as user_counts
from models.rules import Rules
from models.scoring import VectorScorer
from models.vocabulary import Vocabulary
from training.confidence import ConfidenceConfig, build_matrix, vocabulary_codes

logger = logging.getLogger(__name__)

EvaluationProgress = Callable[[int, int], None]
"""Called after each batch with ``(batches done, total batches)``."""

COHORTS: tuple[tuple[str, int, float], ...] = (
    ("lt5", 0, 5),
    ("5to20", 5, 21),
    ("gt20", 21, math.inf),
)
"""(name, lowest, highest + 1) training-interaction counts of each user cohort."""


@dataclass(frozen=True)
class CohortMetrics:
    """Averaged metrics of the evaluated users in one cohort."""

    name: str
    users: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one model on one holdout."""

    algorithm: str
    k: int
    users: int
    """Users with at least one held-out item: every average is over them."""
    metrics: dict[str, float]
    cohorts: dict[str, CohortMetrics]
    seconds: float = 0.0
    per_user: UserMetrics | None = field(default=None, repr=False, compare=False)
    diversity_basis: str = ""
    """What ``diversity_at_k`` measured: ``item_vectors``, ``categories`` or ``""`` (not
    measured: no item vectors and no categories)."""
    rules: Rules | None = field(default=None, repr=False, compare=False)
    """The ranking rules every list was made under (None: none)."""
    stages: dict[str, CohortMetrics] = field(default_factory=dict)
    """Averaged metrics of the evaluated users in each lifecycle stage (every stage, in
    :data:`models.lifecycle.STAGES` order; empty when evaluated without stages)."""

    def to_flat_dict(self, prefix: str = "") -> dict[str, float]:
        """Metric name -> value for MLflow: ``ndcg_at_10``, ``cohort_lt5_ndcg_at_10``,
        ``ndcg_at_10.stage_at_risk``, ``eval_users.stage_at_risk``, ...

        NaN values (an empty cohort, novelty without lists) are left out rather than logged.
        """
        flat: dict[str, float] = {f"{prefix}eval_users": float(self.users)}
        flat.update({prefix + name: value for name, value in self.metrics.items()})
        for cohort in self.cohorts.values():
            flat[f"{prefix}cohort_{cohort.name}_users"] = float(cohort.users)
            for name, value in cohort.metrics.items():
                flat[f"{prefix}cohort_{cohort.name}_{name}"] = value
        for stage in self.stages.values():
            flat[f"{prefix}eval_users.stage_{stage.name}"] = float(stage.users)
            for name, value in stage.metrics.items():
                flat[f"{prefix}{name}.stage_{stage.name}"] = value
        return {name: value for name, value in flat.items() if not math.isnan(value)}

    def report_markdown(self, baseline: Evaluation | None = None) -> str:
        """A Markdown report of the overall and per-cohort metrics, next to ``baseline``'s."""
        columns = [(self.algorithm, self)]
        if baseline is not None:
            if baseline.k != self.k:
                raise InvalidInputError("the baseline was evaluated at another k")
            columns.append((f"{baseline.algorithm} (baseline)", baseline))
        return _report(columns, self.k)


@dataclass(frozen=True)
class BaselineComparison:
    """A model's evaluation next to a popularity baseline's on the same split."""

    model: Evaluation
    baseline: Evaluation

    def lift(self, metric: str) -> float:
        """Model value minus baseline value of one averaged metric (e.g. ``ndcg_at_10``)."""
        return self.model.metrics[metric] - self.baseline.metrics[metric]

    def to_flat_dict(self) -> dict[str, float]:
        """The model's metrics unprefixed, the baseline's under ``baseline_``."""
        flat = self.model.to_flat_dict()
        flat.update(self.baseline.to_flat_dict(prefix="baseline_"))
        return flat

    def report_markdown(self) -> str:
        """The model's report with the baseline's numbers in a second column."""
        return self.model.report_markdown(baseline=self.baseline)

    def __iter__(self) -> Iterator[Evaluation]:
        """Unpacks as ``model_evaluation, baseline_evaluation``."""
        return iter((self.model, self.baseline))


# ----------------------------------------------------------------- holdout
@dataclass(frozen=True, eq=False)
class Holdout:
    """Held-out interactions as a model sees them: what it can rank, and what it cannot.

    A held-out item the model never saw in training is still an item the user wanted; no model
    can recommend it, so it counts as a miss: in ``|R|`` for recall, MAP and NDCG's ideal DCG,
    never as a hit. Leaving it out would make every metric look better than the service is.
    A held-out user the model never saw is served by the cold-start fallback, not the model,
    and is left out (counted in :attr:`users_unknown`).
    """

    matrix: sp.csr_matrix
    """Users x items on the model's indices; a positive entry is a relevant held-out item."""
    unrankable: np.ndarray
    """Per user (int64): relevant held-out items outside the model's catalog, counted as misses."""
    items_unknown: int = 0
    """Distinct items among the :attr:`unrankable` pairs (of the whole holdout: a
    :meth:`restrict`-ed copy keeps the count)."""
    users_unknown: int = 0
    """Distinct held-out users outside the model's users: not evaluated (same note)."""

    def __post_init__(self) -> None:
        unrankable_counts(self.unrankable, self.matrix.shape[0])

    @property
    def pairs_unknown_item(self) -> int:
        """Relevant held-out pairs whose item the model does not know (the misses it must take)."""
        return int(self.unrankable.sum())

    @property
    def n_pairs(self) -> int:
        """Relevant held-out pairs of known users, rankable or not."""
        return int(relevance_matrix(self.matrix).nnz) + self.pairs_unknown_item

    @property
    def users(self) -> np.ndarray:
        """Indices of the users with at least one relevant held-out item: those evaluated."""
        return _holdout_users(relevance_matrix(self.matrix), self.unrankable)

    def restrict(self, keep: np.ndarray) -> Holdout:
        """The same holdout with only the users where the boolean ``keep`` is true."""
        keep = np.asarray(keep, dtype=bool)
        matrix = sp.csr_matrix(sp.diags(keep.astype(np.float32)) @ self.matrix, dtype=np.float32)
        matrix.eliminate_zeros()
        return Holdout(
            matrix=matrix,
            unrankable=np.where(keep, self.unrankable, 0),
            items_unknown=self.items_unknown,
            users_unknown=self.users_unknown,
        )


def _holdout_users(relevant: sp.csr_matrix, unrankable: np.ndarray) -> np.ndarray:
    return np.flatnonzero((np.diff(relevant.indptr) + unrankable) > 0)


def build_holdout(frame: pd.DataFrame, users: Vocabulary, items: Vocabulary) -> Holdout:
    """The holdout of ``frame`` (events, as :func:`training.data.load_interactions` gives) for a
    model over ``users`` x ``items``.

    A (user, item) pair is relevant when its summed event weight is positive, as in
    :func:`training.confidence.build_matrix` without decay. Pairs of known users whose item is
    not in ``items`` (unseen in training, or dropped by a minimum-count filter) become per-user
    :attr:`Holdout.unrankable` counts; rows of unknown users are dropped and counted.
    """
    known = build_matrix(frame, ConfidenceConfig(), users=users, items=items)
    unrankable = np.zeros(len(users), dtype=np.int64)
    items_unknown = users_unknown = 0
    dropped_users = known.dropped["rows_unknown_user"]
    if dropped_users or known.dropped["rows_unknown_item"]:
        user_idx = vocabulary_codes(frame["user_id"], users)
        if dropped_users:
            users_unknown = int(frame["user_id"][user_idx < 0].nunique())
        outside = user_idx >= 0
        outside &= vocabulary_codes(frame["item_id"], items) < 0
        if outside.any():
            codes, uniques = pd.factorize(frame["item_id"][outside])
            valid = codes >= 0
            n_unknown = max(len(uniques), 1)
            keys = user_idx[outside][valid] * n_unknown + codes[valid]
            pair_keys, pair_of_row = np.unique(keys, return_inverse=True)
            weight = frame["weight"].to_numpy(dtype=np.float64)[outside][valid]
            relevant_keys = pair_keys[np.bincount(pair_of_row, weights=weight) > 0]
            counts = np.bincount(relevant_keys // n_unknown, minlength=len(users))
            unrankable = counts.astype(np.int64)
            items_unknown = int(np.unique(relevant_keys % n_unknown).size)
    holdout = Holdout(
        matrix=known.matrix,
        unrankable=unrankable,
        items_unknown=items_unknown,
        users_unknown=users_unknown,
    )
    if holdout.pairs_unknown_item or users_unknown:
        logger.info(
            "holdout: %d pairs of %d items unseen in training count as misses; "
            "%d users unseen in training are not evaluated",
            holdout.pairs_unknown_item,
            items_unknown,
            users_unknown,
        )
    return holdout


def sample_users(holdout: Holdout, limit: int, seed: int) -> Holdout:
    """Keep the held-out items of at most ``limit`` users (seeded sample); others become empty.

    Scoring every user of a million-user log costs more than the fit itself, and a sample of
    some thousands of users measures the averages closely enough to compare models evaluated on
    the same sample. A user whose held-out items are all unseen in training is part of the
    draw: it is evaluated, with nothing it could hit. ``limit`` 0 keeps every user.
    """
    users = holdout.users
    if limit <= 0 or len(users) <= limit:
        return holdout
    keep = np.zeros(holdout.matrix.shape[0], dtype=bool)
    keep[np.random.default_rng(seed).choice(users, size=limit, replace=False)] = True
    return holdout.restrict(keep)


# --------------------------------------------------------------- evaluation
def _aligned(
    model: Recommender,
    train_matrix: sp.spmatrix | sp.sparray,
    test_matrix: sp.spmatrix | sp.sparray,
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    train = sp.csr_matrix(train_matrix)
    test = relevance_matrix(test_matrix)
    if train.shape != test.shape:
        raise InvalidInputError(
            f"train matrix {train.shape} and test matrix {test.shape} must share users and items"
        )
    if (model.n_users, model.n_items) != train.shape:
        raise InvalidInputError(
            f"model was fitted on {model.n_users} users x {model.n_items} items, "
            f"the evaluation matrices have {train.shape[0]} x {train.shape[1]}"
        )
    return train, test


_SCORE_CELLS = 16_000_000


def diversity_space(model: object, catalog: ItemCatalog | None = None) -> ItemSpace | None:
    """What intra-list diversity is measured with for ``model``'s lists: the cosine distance of
    its item vectors where it has them (ALS, BPR, LMF: what MMR measures similarity with),
    else whether two items are in different categories of ``catalog`` (EASE, item-kNN,
    popularity); None when neither exists."""
    if isinstance(model, VectorScorer):
        return ItemSpace.of_unit_vectors(model.item_unit_vectors())
    if catalog is not None and (np.asarray(catalog.category) != "").any():
        return ItemSpace.of_categories(np.asarray(catalog.category))
    return None


def _evaluation_catalog(catalog: ItemCatalog | None, n_items: int) -> ItemCatalog | None:
    """``catalog`` with every item available: an evaluation measures the model against what
    users took, whatever is on sale today (as without a catalog)."""
    if catalog is None:
        return None
    if len(catalog) != n_items:
        raise InvalidInputError(
            f"the catalog has {len(catalog)} items, the model {n_items}", field="catalog"
        )
    return ItemCatalog(
        item_type=catalog.item_type,
        category=catalog.category,
        title=catalog.title,
        available=np.ones(n_items, dtype=bool),
        first_seen=catalog.first_seen,
    )


@dataclass(frozen=True)
class _Prepared:
    """What every evaluation on one (train, test) pair shares, computed once."""

    train: sp.csr_matrix
    test: sp.csr_matrix
    train_counts: np.ndarray
    """Distinct positive training items per user (the cohort key)."""
    popularity: np.ndarray
    n_active: int
    unrankable: np.ndarray
    """Relevant held-out items per user outside the catalog (misses; see :class:`Holdout`)."""


def _prepare(
    model: Recommender,
    train_matrix: sp.spmatrix | sp.sparray,
    test_matrix: sp.spmatrix | sp.sparray,
    item_popularity: np.ndarray | None,
    unrankable: np.ndarray | None = None,
) -> _Prepared:
    train, test = _aligned(model, train_matrix, test_matrix)
    extra = unrankable_counts(unrankable, test.shape[0])
    train_positive = relevance_matrix(train)
    n_active = active_users(train_positive)
    if item_popularity is None:
        popularity = user_counts(train_positive)
    else:
        popularity = np.asarray(item_popularity)
        if popularity.shape != (train.shape[1],):
            raise InvalidInputError(
                f"item_popularity needs one user count per item ({train.shape[1]})",
                field="item_popularity",
            )
    overlap = train_positive.multiply(test).nnz
    if overlap:
        logger.warning(
            "%d held-out (user, item) pairs are also in the train matrix; they are filtered "
            "from the recommendations and can never be hits",
            overlap,
        )
    return _Prepared(
        train=train,
        test=test,
        train_counts=np.diff(train_positive.indptr),
        popularity=popularity,
        n_active=n_active,
        unrankable=extra,
    )


def evaluate(
    model: Recommender,
    train_matrix: sp.spmatrix | sp.sparray,
    test_matrix: sp.spmatrix | sp.sparray,
    *,
    k: int = 10,
    batch_size: int = 1000,
    item_popularity: np.ndarray | None = None,
    unrankable: np.ndarray | None = None,
    progress: EvaluationProgress | None = None,
    rules: Rules | None = None,
    catalog: ItemCatalog | None = None,
    item_space: ItemSpace | None = None,
    stages: np.ndarray | None = None,
) -> Evaluation:
    """Top-``k`` metrics of ``model`` for every user with held-out items in ``test_matrix``.

    Both matrices are users x items on the same indices (the model's); a test user absent from
    training has an empty train row. Training items are excluded from the recommendations, and
    positive test entries are the relevant items. ``unrankable`` (one count per user, e.g.
    :attr:`Holdout.unrankable`) adds relevant items outside the catalog: they count as misses in
    recall, MAP and NDCG, and a user with only such items is evaluated (and scores 0).
    ``item_popularity`` (distinct training users per item, out of the users with a training
    interaction) feeds novelty; by default it is counted from ``train_matrix``. Users are
    cohorted by their number of distinct training items: ``lt5`` (<5), ``5to20`` (5..20) and
    ``gt20`` (>20).

    ``rules`` rank every list under those ranking rules (an exploration should carry ``now``,
    the end of the training data: otherwise the clock decides which items are new);
    ``catalog`` (aligned with the model's items) gives the rules the items' categories and
    first appearances; every item counts as available. ``item_space`` sets what intra-list
    diversity is measured with (default: :func:`diversity_space` of the model and catalog).
    ``stages`` (one lifecycle stage name per user, :func:`user_stages`) adds every metric per
    stage (:attr:`Evaluation.stages`).
    """
    _check_args(k, batch_size)
    prepared = _prepare(model, train_matrix, test_matrix, item_popularity, unrankable)
    space = item_space if item_space is not None else diversity_space(model, catalog)
    return _evaluate(
        model,
        prepared,
        k=k,
        batch_size=batch_size,
        progress=progress,
        rules=rules,
        catalog=_evaluation_catalog(catalog, prepared.train.shape[1]),
        item_space=space,
        stages=_checked_stages(stages, prepared.train.shape[0]),
    )


def _checked_stages(stages: np.ndarray | None, n_users: int) -> np.ndarray | None:
    if stages is None:
        return None
    stages = np.asarray(stages, dtype=object)
    if stages.shape != (n_users,):
        raise InvalidInputError(
            f"stages needs one stage per user ({n_users}), got {stages.shape}", field="stages"
        )
    unknown = set(stages.tolist()) - {"", *STAGES}
    if unknown:
        raise InvalidInputError(
            f"stages holds unknown stage(s) {', '.join(sorted(map(str, unknown)))}",
            field="stages",
        )
    return stages


def _check_args(k: int, batch_size: int) -> None:
    if k <= 0:
        raise InvalidInputError("k must be positive", field="k")
    if batch_size <= 0:
        raise InvalidInputError("batch_size must be positive", field="batch_size")


def _evaluate(
    model: Recommender,
    prepared: _Prepared,
    *,
    k: int,
    batch_size: int,
    progress: EvaluationProgress | None,
    rules: Rules | None = None,
    catalog: ItemCatalog | None = None,
    item_space: ItemSpace | None = None,
    stages: np.ndarray | None = None,
) -> Evaluation:
    train, test, popularity = prepared.train, prepared.test, prepared.popularity
    users = _holdout_users(test, prepared.unrankable)
    if rules is None or catalog is None:
        pipeline = RankingPipeline.for_training(model, train, popularity=popularity)
    else:  # the catalog matters only to rules (categories, first appearances)
        pipeline = RankingPipeline(model, seen=train, popularity=popularity, catalog=catalog)
    if rules is not None:
        rules = rules.settled()  # one clock for every batch
    # Each batch holds a dense (batch x items) score matrix: keep it near 64 MB so large
    # catalogs stay in cache-friendly, memory-safe chunks.
    batch_size = min(batch_size, max(16, _SCORE_CELLS // max(1, train.shape[1])))
    started = time.perf_counter()
    n_batches = math.ceil(len(users) / batch_size)
    parts: list[UserMetrics] = []
    for batch, start in enumerate(range(0, len(users), batch_size), start=1):
        batch_users = users[start : start + batch_size]
        # Training items are the users' seen items.
        ids = pipeline.rank_users(batch_users, k, rules=rules)
        parts.append(
            per_user_metrics(
                ids,
                test[batch_users],
                unrankable=prepared.unrankable[batch_users],
                item_popularity=popularity,
                n_users=prepared.n_active or None,
                item_space=item_space,
            )
        )
        if progress is not None:
            progress(batch, n_batches)
    seconds = time.perf_counter() - started

    if parts:
        per_user = UserMetrics.concat(parts)
    else:
        logger.warning("the test matrix holds no relevant item; every metric is NaN")
        per_user = per_user_metrics(np.empty((0, k), np.int64), test[:0])
    train_counts = prepared.train_counts[users]
    cohorts = {}
    for name, low, high in COHORTS:
        mask = (train_counts >= low) & (train_counts < high)
        cohorts[name] = CohortMetrics(
            name=name, users=int(mask.sum()), metrics=mean_metrics(per_user.select(mask))
        )
    by_stage = {}
    if stages is not None:
        user_stage = stages[users]
        for stage in STAGES:
            mask = user_stage == stage
            by_stage[stage] = CohortMetrics(
                name=stage, users=int(mask.sum()), metrics=mean_metrics(per_user.select(mask))
            )
    result = Evaluation(
        algorithm=model.algorithm,
        k=k,
        users=len(users),
        metrics=mean_metrics(per_user),
        cohorts=cohorts,
        seconds=seconds,
        per_user=per_user,
        diversity_basis=item_space.basis if item_space is not None else "",
        rules=rules,
        stages=by_stage,
    )
    logger.info(
        "evaluated %s on %d users in %.1fs: ndcg@%d=%.4f",
        model.algorithm,
        len(users),
        seconds,
        k,
        result.metrics[f"ndcg_at_{k}"],
    )
    return result


def evaluate_with_baseline(
    model: Recommender,
    train_matrix: sp.spmatrix | sp.sparray,
    test_matrix: sp.spmatrix | sp.sparray,
    *,
    k: int = 10,
    batch_size: int = 1000,
    item_popularity: np.ndarray | None = None,
    unrankable: np.ndarray | None = None,
    progress: EvaluationProgress | None = None,
    rules: Rules | None = None,
    catalog: ItemCatalog | None = None,
    stages: np.ndarray | None = None,
) -> BaselineComparison:
    """:func:`evaluate` ``model`` and a :class:`Popularity` fitted on ``train_matrix``.

    The matrices, item popularity and cohorts are prepared once for both evaluations; both rank
    under the same ``rules`` and measure diversity alike (the model's :func:`diversity_space`,
    so the two diversities compare). ``progress`` counts the batches of both evaluations
    together. ``stages``: as for :func:`evaluate`, for both.
    """
    _check_args(k, batch_size)
    prepared = _prepare(model, train_matrix, test_matrix, item_popularity, unrankable)
    stages = _checked_stages(stages, prepared.train.shape[0])
    catalog = _evaluation_catalog(catalog, prepared.train.shape[1])
    space = diversity_space(model, catalog)
    if rules is not None:
        rules = rules.settled()  # the model and the baseline on one clock
    baseline = Popularity().fit(prepared.train)
    model_progress = baseline_progress = None
    if progress is not None:
        report = progress

        def model_progress(done: int, total: int) -> None:
            report(done, 2 * total)

        def baseline_progress(done: int, total: int) -> None:
            report(total + done, 2 * total)

    return BaselineComparison(
        model=_evaluate(
            model,
            prepared,
            k=k,
            batch_size=batch_size,
            progress=model_progress,
            rules=rules,
            catalog=catalog,
            item_space=space,
            stages=stages,
        ),
        baseline=_evaluate(
            baseline,
            prepared,
            k=k,
            batch_size=batch_size,
            progress=baseline_progress,
            rules=rules,
            catalog=catalog,
            item_space=space,
            stages=stages,
        ),
    )


# ----------------------------------------------------------------- report
def _filter_text(flt: ItemFilter) -> str:
    parts = [f"type {t}" for t in flt.item_types] + [f"category {c}" for c in flt.categories]
    return " or ".join(parts)


def describe_rules(rules: Rules | None) -> str:
    """A short human description of ``rules`` (``"none"`` when they change nothing)."""
    if rules is None or rules.empty:
        return "none"
    parts = []
    diversity = rules.diversity
    if diversity is not None and diversity.max_per_category:
        parts.append(f"at most {diversity.max_per_category} per category")
    if diversity is not None and diversity.mmr:
        parts.append(f"MMR {diversity.mmr:g}")
    for boost in rules.boosts:
        parts.append(f"boost {_filter_text(boost.item_filter)} x{boost.factor:g}")
    if rules.promotion is not None:
        promotion = rules.promotion
        parts.append(f"promote {_filter_text(promotion.item_filter)} {promotion.share:.0%}")
    if rules.exploration is not None:
        exploration = rules.exploration
        parts.append(
            f"explore {exploration.share:.0%} of items newer than "
            f"{exploration.max_age_days:g} days (seed {exploration.seed})"
        )
    if rules.rotation is not None and len(rules.rotation.shown_items):
        parts.append(f"rotation rate {rules.rotation.rate:g}")
    return ", ".join(parts)


def _stage_report(columns: list[tuple[str, Evaluation]], k: int) -> list[str]:
    """The report's per-stage tables: every metric of each column's evaluation per stage."""
    lines = [
        "",
        "## By lifecycle stage",
        "",
        "Each user's stage as of the end of the training data (models/lifecycle.py, the default "
        "windows; see docs/segments.md).",
    ]
    keys = [f"{name}_at_{k}" for name in METRIC_NAMES]
    for name, evaluation in columns:
        lines += [
            "",
            f"### {name}",
            "",
            "| stage | users | " + " | ".join(keys) + " |",
            "|---|---:|" + "---:|" * len(keys),
        ]
        for stage in evaluation.stages.values():
            cells = [stage.name, str(stage.users)]
            cells += [_fmt(stage.metrics[key]) for key in keys]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def user_stages(
    frame: pd.DataFrame,
    users: Vocabulary,
    *,
    as_of: float | None = None,
    config: SegmentsConfig | None = None,
) -> np.ndarray:
    """Each of ``users``' lifecycle stage (an object array of names) from their events in
    ``frame`` (a training part: ``user_id``, ``event``, ``timestamp`` in unix seconds) as of
    ``as_of`` (default: its newest event), by the rules of :mod:`models.lifecycle` with
    ``config``'s events and windows. There is no previous computation, so nobody is
    ``reactivated``; a user without an event that counts (only impressions, or none) has ``""``.
    """
    config = config if config is not None else SegmentsConfig()
    stages = np.full(len(users), "", dtype=object)
    if not len(frame) or not len(users):
        return stages
    events = frame["event"].astype(str).str.lower().to_numpy()
    counted = ~np.isin(events, list(config.ignored_events))
    codes = vocabulary_codes(frame["user_id"], users)
    keep = counted & (codes >= 0)
    seconds = frame["timestamp"].to_numpy(dtype=np.float64)
    if as_of is None:
        as_of = float(seconds[keep].max()) if keep.any() else float(seconds.max())
    keep &= seconds <= as_of
    code, when = codes[keep], seconds[keep]
    first = np.full(len(users), np.inf)
    last = np.full(len(users), -np.inf)
    np.minimum.at(first, code, when)
    np.maximum.at(last, code, when)
    activation = np.full(len(users), np.inf)
    activating = np.isin(events[keep], list(config.activation_events))
    np.minimum.at(activation, code[activating], when[activating])
    seen = np.isfinite(first)
    result = assign_stages(
        Activity.of(
            first[seen], last[seen], np.where(np.isfinite(activation), activation, np.nan)[seen]
        ),
        float(as_of),
        config.windows,
    )
    stages[seen] = result.stage
    return stages


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def _report(columns: list[tuple[str, Evaluation]], k: int) -> str:
    first = columns[0][1]
    header = "| metric | " + " | ".join(name for name, _ in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    lines = [
        f"# Offline evaluation at k={k}",
        "",
        f"{first.users} users with held-out items; their training items are never recommended. "
        "Averages skip users without held-out items; see docs/metrics.md for the formulas.",
        "",
        "## Overall",
        "",
        header,
        rule,
    ]
    for name in METRIC_NAMES:
        key = f"{name}_at_{k}"
        lines.append(f"| {key} | " + " | ".join(_fmt(e.metrics[key]) for _, e in columns) + " |")
    lines += [
        "",
        "## By number of training interactions",
        "",
        "Cohorts: `lt5` fewer than 5 training items, `5to20` 5 to 20, `gt20` more than 20.",
        "",
        "| cohort | users | "
        + " | ".join(f"ndcg@{k} {n}" for n, _ in columns)
        + " | "
        + " | ".join(f"recall@{k} {n}" for n, _ in columns)
        + " |",
        "|---|---:|" + "---:|" * (2 * len(columns)),
    ]
    for cohort in first.cohorts:
        cells = [cohort, str(first.cohorts[cohort].users)]
        cells += [_fmt(e.cohorts[cohort].metrics[f"ndcg_at_{k}"]) for _, e in columns]
        cells += [_fmt(e.cohorts[cohort].metrics[f"recall_at_{k}"]) for _, e in columns]
        lines.append("| " + " | ".join(cells) + " |")
    if first.stages:
        lines += _stage_report(columns, k)
    basis = {
        "item_vectors": "the cosine distance of the model's item vectors",
        "categories": "the share of pairs in different categories",
    }.get(first.diversity_basis)
    if basis:
        lines += ["", f"`diversity_at_{k}` is the mean over each list's pairs of {basis}."]
    if first.rules is not None and not first.rules.empty:
        lines += ["", f"Lists ranked under the rules: {describe_rules(first.rules)}."]
    lines += ["", "Evaluation time: " + ", ".join(f"{n} {e.seconds:.1f}s" for n, e in columns)]
    return "\n".join(lines) + "\n"
