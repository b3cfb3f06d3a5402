"""Ranking rules: diversity, rotation, boosts, promotions and exploration, per request.

A request carries its rules as one :class:`Rules` value (``ListRequest.rules``, or the ``rules``
argument of :meth:`RankingPipeline.rank_users`, ``recommend``, ``similar_items`` and
``popular``). Each rule is a re-ranking stage (step 3) of the one ranking pipeline, so a served
list, ``batch-recommend``, the pyfunc and offline evaluation apply it alike. A stage runs, and
asks for its extra candidates, only for requests whose rules ask for it: a request without
rules gets the same ids and scores as a pipeline without rules, from the same candidates.

The rules, in the order they act on a list:

1. **gather** (promotions, exploration): the items the slots may need are added to the
   candidates, with the scores the model gives them for this request, so the stages after
   (dislikes, boosts, rotation) treat them like any other candidate.
2. **boosts** (:class:`Boost`): a candidate matching the filters of boosts whose factors
   multiply to ``f`` scores ``s * f`` if ``s >= 0`` and ``s / f`` if ``s < 0`` (that is,
   ``s * f ** sign(s)``). The formula keeps the order of the boosted items among themselves
   and raises every score for ``f > 1`` (lowers it for ``f < 1``) whatever the sign of the
   model's scores; a score of 0 stays 0. Several boosts on one item multiply.
3. **rotation** (:class:`Rotation`): an item shown to this user ``age`` seconds ago (its
   latest showing) loses ``rate * 2 ** (-age / half_life_seconds) * spread`` where ``spread``
   is the range (max - min) of the candidates' scores, as :class:`~models.ranking.DislikeStage`
   measures it: at rate 1 an item shown a moment ago falls from the top to the bottom.
4. **arrange** (diversity, promotion and exploration slots): the list is laid out place by
   place. Promotion slots (``share * k`` rounded, at least one, evenly spaced: see
   :func:`slot_count`, :func:`slot_positions`) take the best candidates matching the
   promotion's filter; exploration slots take the explorable candidates in the order of a
   seeded draw (:class:`Exploration`), at the same spacing (moved to the next free place on
   a clash with a promotion); a slot left without an item goes to the others. Every other
   place takes the next candidate by score, or with ``mmr > 0`` the one with the best maximal
   marginal relevance ``(1 - mmr) * relevance - mmr * max_similarity_to_the_items_above``,
   relevance being the score scaled to [0, 1] over the candidates and similarity that of
   :meth:`RankingPipeline.pairwise_similarity` (cosine of item vectors). No category (named;
   items without one are never capped) gets more than ``max_per_category`` items, promoted
   and explored ones included. When the candidates run out (under the cap, or because the
   filters left few), the next ones are fetched in the categories still open: the model's
   next best, then the backfill's popular items, after all the candidates (in MMR their
   relevance is 0). When none are left the list is shorter than ``k``: a cap is a hard rule,
   like a filter.

Scores: every item keeps the score the stages above gave it: the model's score for this
request (popularity for a popular list), changed only by dislikes, boosts and rotation (which
act on the candidates: the best ``k * candidates_per_slot`` and the gathered items; items the
arrangement fetches beyond them keep the score they came with). The
arrangement does not change scores, so with diversity, promotions or exploration a list is no
longer sorted by score. A promoted or explored item's score is the model's score for it, the
same way. ``Ranked.reasons`` says why each item is there (:class:`~models.ranking.Reason`):
``PROMOTED`` / ``EXPLORED`` for items in those slots, ``BOOSTED`` for items a boost raised,
``MODEL`` otherwise.

Nothing a rule adds escapes the request's filters: a promoted or explored item is never an
excluded, disliked, seen (unless ``include_seen``), filtered-out or unavailable item, because
the rules draw only from the request's own candidates (:meth:`RankingPipeline.candidates`).
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np
from numba import njit

from .errors import InvalidInputError
from .kernels import SHORT_SORT, _before
from .ranking import ItemFilter, ItemMask, ListRequest, RankingPipeline, Reason
from .vocabulary import MISSING, Vocabulary

DAY_SECONDS = 86_400.0
DIVERSITY_CANDIDATES_PER_SLOT = 4
"""Candidates a diversity rule chooses from per place (MMR and caps need choice)."""
RESCORE_CANDIDATES_PER_SLOT = 3
"""Candidates per place for boosts and rotation: a demoted item's place goes to a later one."""
SLOT_CANDIDATES_PER_SLOT = 1
"""Candidates per place for promotions and exploration without diversity: their slots' items are
gathered beyond the candidates, and every other place takes the next candidate, so one each is
enough (two gave the same lists, ids and reasons, with a twice as deep search)."""
GATHERED_PER_SLOT = 2
"""Items gathered per promotion or exploration slot (spares for caps and dislikes)."""
DEEPER_ROUNDS = 3
"""Fetches of items beyond the candidates one arrangement may make (see ``_Layout``)."""
OPEN_CATEGORY_MASKS = 256
"""Masks of the categories still open kept per pipeline (see :meth:`RuleStages.open_categories`)."""
BOOST_TABLES = 64
"""Per-item boost factors kept per pipeline, one per set of boosts (see
:meth:`RuleStages.boost_factors`)."""
RULE_PLANS = 256
"""Plans kept per pipeline, one per ``Rules`` object (see :meth:`RuleStages.plan`)."""
PROMOTED = int(Reason.PROMOTED)
"""The promotion's reason code, as the compiled arrangement writes it."""


# --------------------------------------------------------------------------------- the rules
def _fail(message: str, name: str) -> InvalidInputError:
    return InvalidInputError(f"{name}: {message}", field=name)


def _real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise _fail(f"must be a number, got {value!r}", name)
    number = float(value)
    if not math.isfinite(number):
        raise _fail(f"must be finite, got {value!r}", name)
    return number


def _whole(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise _fail(f"must be an integer, got {value!r}", name)
    return int(value)


def _filter(value: Any, name: str) -> ItemFilter:
    if not isinstance(value, ItemFilter):
        raise _fail(f"must be an ItemFilter, got {type(value).__name__}", name)
    if not value.item_types and not value.categories:
        raise _fail("must name at least one item type or category", name)
    return value


def _share(value: Any, name: str) -> float:
    share = _real(value, name)
    if not 0.0 < share <= 1.0:
        raise _fail(f"must be in (0, 1], got {share}", name)
    return share


@dataclass(frozen=True)
class Diversity:
    """Diversity of one list: a cap per category and maximal marginal relevance."""

    max_per_category: int = 0
    """At most this many items of any one (named) category; 0: no cap."""
    mmr: float = 0.0
    """Relevance / diversity trade-off in [0, 1]: 0 ranks by score (off), 1 picks each item
    as unlike the items above it as possible (ties by score)."""

    def __post_init__(self) -> None:
        cap = _whole(self.max_per_category, "rules.diversity.max_per_category")
        if cap < 0:
            raise _fail(f"must be >= 0, got {cap}", "rules.diversity.max_per_category")
        mmr = _real(self.mmr, "rules.diversity.mmr")
        if not 0.0 <= mmr <= 1.0:
            raise _fail(f"must be in [0, 1], got {mmr}", "rules.diversity.mmr")
        object.__setattr__(self, "max_per_category", cap)
        object.__setattr__(self, "mmr", mmr)

    @property
    def active(self) -> bool:
        return self.max_per_category > 0 or self.mmr > 0


NO_DIVERSITY = Diversity()
"""No cap and no MMR: the diversity of a list whose rules have none (built once, not per list)."""

MIN_BOOST, MAX_BOOST = 1e-6, 1e6
"""The range of a boost's factor."""


@dataclass(frozen=True)
class Boost:
    """Multiply the scores of the items matching ``item_filter`` by ``factor`` (sign-safe:
    ``s * factor`` for ``s >= 0``, ``s / factor`` for ``s < 0``); a factor below 1 demotes."""

    item_filter: ItemFilter
    factor: float

    def __post_init__(self) -> None:
        _filter(self.item_filter, "rules.boosts.item_filter")
        factor = _real(self.factor, "rules.boosts.factor")
        if not MIN_BOOST <= factor <= MAX_BOOST:
            # Past these, float32 scores overflow to infinity or collapse to zero.
            raise _fail(
                f"must be between {MIN_BOOST:g} and {MAX_BOOST:g}, got {factor}",
                "rules.boosts.factor",
            )
        object.__setattr__(self, "factor", factor)


@dataclass(frozen=True)
class Promotion:
    """Fill a ``share`` of the ``k`` places with the best items for this request that match
    ``item_filter``, at evenly spaced places (:func:`slot_positions`); when the filter has too
    few eligible items, the regular candidates take the places left."""

    item_filter: ItemFilter
    share: float

    def __post_init__(self) -> None:
        _filter(self.item_filter, "rules.promotion.item_filter")
        object.__setattr__(self, "share", _share(self.share, "rules.promotion.share"))


@dataclass(frozen=True)
class Exploration:
    """Give a ``share`` of the places to items the model knows little about.

    Explorable: items that first appeared (``ItemCatalog.first_seen``) at most
    ``max_age_days`` before ``now`` and, with ``max_interactions``, have at most that many
    users in the training data (the popularity of the popular list). Among the explorable
    items the request may get, the places go to those drawn first by a hash of ``(seed,
    user key, day of now, item)``: reproducible (record ``seed``, the user and ``now``; each
    item's :class:`~models.ranking.Reason` says which were explored), different per user and
    per day. ``now`` is read from the clock when the request is made unless given (offline
    evaluation gives the end of its training data); ``user_key`` is set by
    :meth:`RankingPipeline.recommend` from the external user id, otherwise the pipeline
    derives it from the user (:meth:`RankingPipeline.user_key`).
    """

    share: float
    max_age_days: float
    seed: int = 0
    max_interactions: int | None = None
    now: float | None = None
    user_key: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "share", _share(self.share, "rules.exploration.share"))
        age = _real(self.max_age_days, "rules.exploration.max_age_days")
        if age <= 0:
            raise _fail(f"must be > 0, got {age}", "rules.exploration.max_age_days")
        object.__setattr__(self, "max_age_days", age)
        object.__setattr__(self, "seed", _whole(self.seed, "rules.exploration.seed"))
        if self.max_interactions is not None:
            limit = _whole(self.max_interactions, "rules.exploration.max_interactions")
            if limit < 0:
                raise _fail(f"must be >= 0, got {limit}", "rules.exploration.max_interactions")
            object.__setattr__(self, "max_interactions", limit)
        if self.now is not None:
            object.__setattr__(self, "now", _real(self.now, "rules.exploration.now"))
        if self.user_key is not None:
            object.__setattr__(
                self, "user_key", _whole(self.user_key, "rules.exploration.user_key")
            )

    @property
    def day(self) -> int:
        """The day (UTC, days since the epoch) of :attr:`now` that the draw depends on."""
        return int((time.time() if self.now is None else self.now) // DAY_SECONDS)


@dataclass(frozen=True, eq=False)
class Rotation:
    """Demote items recently shown to this user: an item shown ``age`` seconds ago (latest
    showing) loses ``rate * 2 ** (-age / half_life_seconds)`` times the spread of the
    candidates' scores. ``shown_items`` are model indices (:meth:`from_ids` maps external
    ids), ``shown_ages_seconds`` their ages."""

    shown_items: np.ndarray
    shown_ages_seconds: np.ndarray
    rate: float = 0.5
    half_life_seconds: float = DAY_SECONDS
    _items: np.ndarray = field(init=False, repr=False)
    _weights: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        items = np.asarray(self.shown_items)
        if items.ndim != 1 or (len(items) and items.dtype.kind not in "iu"):
            raise _fail("must be a 1-d array of item indices", "rules.rotation.shown_items")
        ages = np.asarray(self.shown_ages_seconds)
        if ages.shape != items.shape or (len(ages) and ages.dtype.kind not in "iuf"):
            raise _fail(
                "must hold one age (seconds) per shown item", "rules.rotation.shown_ages_seconds"
            )
        ages = ages.astype(np.float64)
        if len(ages) and not (np.isfinite(ages).all() and ages.min() >= 0):
            raise _fail("must be finite and >= 0", "rules.rotation.shown_ages_seconds")
        rate = _real(self.rate, "rules.rotation.rate")
        if not 0.0 <= rate <= 1.0:
            raise _fail(f"must be in [0, 1], got {rate}", "rules.rotation.rate")
        half_life = _real(self.half_life_seconds, "rules.rotation.half_life_seconds")
        if half_life <= 0:
            raise _fail(f"must be > 0, got {half_life}", "rules.rotation.half_life_seconds")
        items = items.astype(np.int64)
        # Each item's latest showing: sort by item, then age, and keep the first of each item.
        order = np.lexsort((ages, items))
        first = np.ones(len(order), dtype=bool)
        first[1:] = items[order][1:] != items[order][:-1]
        kept = order[first]
        for name, value in (
            ("shown_items", items),
            ("shown_ages_seconds", ages),
            ("rate", rate),
            ("half_life_seconds", half_life),
            ("_items", items[kept]),
            ("_weights", np.exp2(-ages[kept] / half_life)),
        ):
            if isinstance(value, np.ndarray):
                value.setflags(write=False)
            object.__setattr__(self, name, value)

    @classmethod
    def from_ids(
        cls,
        items: Vocabulary,
        shown_item_ids: Sequence[str],
        shown_ages_seconds: Sequence[float] | np.ndarray,
        *,
        rate: float = 0.5,
        half_life_seconds: float = DAY_SECONDS,
    ) -> Rotation:
        """The rotation of items shown by external id (``items``: the model's item ids, e.g.
        ``pipeline.vocabularies()[1]``); ids the model does not know are left out."""
        ages = np.asarray(shown_ages_seconds, dtype=np.float64)
        if ages.shape != (len(shown_item_ids),):
            raise _fail(
                "must hold one age (seconds) per shown item", "rules.rotation.shown_ages_seconds"
            )
        index = items.lookup(list(shown_item_ids))
        known = index != MISSING
        return cls(index[known], ages[known], rate, half_life_seconds)

    def penalties(self, ids: np.ndarray) -> np.ndarray:
        """``rate * 2 ** (-age / half_life)`` of each of ``ids`` (0 for items not shown)."""
        out = np.zeros(len(ids), dtype=np.float64)
        if not len(self._items) or not len(ids):
            return out
        at = np.minimum(np.searchsorted(self._items, ids), len(self._items) - 1)
        shown = self._items[at] == ids
        out[shown] = self.rate * self._weights[at[shown]]
        return out


@dataclass(frozen=True)
class Rules:
    """The ranking rules of one list; every part is optional (see the module docstring)."""

    diversity: Diversity | None = None
    boosts: tuple[Boost, ...] = ()
    promotion: Promotion | None = None
    exploration: Exploration | None = None
    rotation: Rotation | None = None

    def __post_init__(self) -> None:
        for name, kind in (
            ("diversity", Diversity),
            ("promotion", Promotion),
            ("exploration", Exploration),
            ("rotation", Rotation),
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise _fail(
                    f"must be a {kind.__name__}, got {type(value).__name__}", f"rules.{name}"
                )
        boosts = self.boosts
        if isinstance(boosts, Boost) or not isinstance(boosts, tuple | list):
            raise _fail("must be a sequence of Boost", "rules.boosts")
        for boost in boosts:
            if not isinstance(boost, Boost):
                raise _fail(f"must hold Boost values, got {type(boost).__name__}", "rules.boosts")
        object.__setattr__(self, "boosts", tuple(boosts))
        if self.promotion is not None and self.exploration is not None:
            total = self.promotion.share + self.exploration.share
            if total > 1.0 + 1e-9:
                raise _fail(
                    f"promotion and exploration shares add up to {total:g}, more than 1",
                    "rules.exploration.share",
                )

    @property
    def empty(self) -> bool:
        """Whether no rule would change a list."""
        return not (
            (self.diversity is not None and self.diversity.active)
            or self.boosts
            or self.promotion is not None
            or self.exploration is not None
            or (
                self.rotation is not None
                and self.rotation.rate > 0
                and len(self.rotation.shown_items) > 0
            )
        )

    def settled(self, now: float | None = None) -> Rules:
        """These rules with the exploration's clock read (``now``, default the time now), so
        that every stage of one list sees the same day; the same object when nothing to do."""
        exploration = self.exploration
        if exploration is None or exploration.now is not None:
            return self
        at = time.time() if now is None else now
        return replace(self, exploration=replace(exploration, now=at))

    def for_user(self, key: int) -> Rules:
        """These rules with the exploration drawing for user ``key`` (unless it names one)."""
        exploration = self.exploration
        if exploration is None or exploration.user_key is not None:
            return self
        return replace(self, exploration=replace(exploration, user_key=key))


# ------------------------------------------------------------------------ helpers
def slot_count(k: int, share: float) -> int:
    """Places of ``k`` a rule of ``share`` gets: ``share * k`` rounded half up, at least 1."""
    return min(k, max(1, math.floor(share * k + 0.5)))


def slot_positions(k: int, count: int) -> list[int]:
    """``count`` evenly spaced places (0-based) of ``k``: ``floor((i + 1/2) * k / count)``,
    the middle of each of ``count`` equal stretches (one slot of 10: place 5; two: 2 and 7)."""
    return [math.floor((i + 0.5) * k / count) for i in range(count)]


def _free_positions(wanted: list[int], taken: set[int], k: int) -> list[int]:
    """Each wanted place, or the nearest free one after it (then before it)."""
    out = []
    for place in wanted:
        for candidate in [*range(place, k), *range(place - 1, -1, -1)]:
            if candidate not in taken:
                taken.add(candidate)
                out.append(candidate)
                break
    return out


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer over uint64 (wrapping arithmetic): a well spread hash."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def draw_keys(seed: int, user_key: int, day: int, items: np.ndarray) -> np.ndarray:
    """The exploration draw: a uint64 key per item; items are drawn in increasing key order."""

    def word(value: int) -> np.ndarray:
        return np.array([value & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)

    base = _mix(word(seed) ^ _mix(word(user_key) ^ _mix(word(day))))
    return _mix(np.asarray(items, dtype=np.int64).astype(np.uint64) ^ base)


def _spread(scores: np.ndarray) -> float:
    """The range of the candidates' scores (as :class:`DislikeStage` measures it); candidates'
    scores are finite."""
    high = float(scores.max())
    spread = (high - float(scores.min())) or abs(high) or 1.0
    return spread if math.isfinite(spread) else 1.0


# ------------------------------------------------------------------------ the stages
@dataclass(frozen=True, eq=False)
class RulePlan:
    """What one :class:`Rules` value asks of one pipeline, checked and worked out once
    (:meth:`RuleStages.plan`), so that a list pays only for its rules' own work."""

    before: tuple[Any, ...]
    """The rules' stages that run ahead of the pipeline's own stages (gathering candidates)."""
    after: tuple[Any, ...]
    """Those that run behind them (boosts, rotation, the arrangement)."""
    boost_factors: np.ndarray | None
    """Per item, the product of the factors of the boosts that match it (None: no boosts)."""
    promoted: np.ndarray | None
    """Per item, whether the promotion's filter matches it (None: no promotion)."""
    composed: tuple[Any, ...] = ()
    """The one :class:`ComposedStage` that does the work of ``before + after`` in one call,
    where the rules are of its kind (empty otherwise)."""
    stages: tuple[Any, ...] = field(init=False)
    """What runs when the pipeline has no stage of its own to run: ``composed``, else
    ``before + after``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", self.composed or self.before + self.after)


class RuleStages:
    """The stages of the rules for one pipeline, and the catalog facts they share.

    ``before`` run ahead of the pipeline's own stages (gathering candidates), ``after`` behind
    them (boosts, rotation, the arrangement). The pipeline is held weakly: it holds this.
    """

    def __init__(self, pipeline: RankingPipeline) -> None:
        warm_up()
        self._pipeline = weakref.ref(pipeline)
        self._codes: np.ndarray | None = None
        self._open: dict[bytes, ItemMask] = {}
        self._boosts: dict[tuple[Boost, ...], np.ndarray] = {}
        self._plans: dict[int, tuple[Rules, RulePlan]] = {}
        self._newest: tuple[np.ndarray, np.ndarray] | None = None
        self.before: tuple[Any, ...] = (GatherStage(self),)
        self.after: tuple[Any, ...] = (
            BoostStage(self),
            RotationStage(self),
            ArrangeStage(self, diversity=True),
            ArrangeStage(self, diversity=False),
        )
        self.composed = {
            (diverse, boosts): ComposedStage(self, diversity=diverse, boosts=boosts)
            for diverse in (False, True)
            for boosts in (False, True)
        }

    @property
    def pipeline(self) -> RankingPipeline:
        pipeline = self._pipeline()
        if pipeline is None:  # pragma: no cover - the pipeline is gone, nobody can call us
            raise ReferenceError("ranking pipeline was garbage collected")
        return pipeline

    def plan(self, rules: Rules) -> RulePlan:
        """The plan of ``rules`` (checked, see :meth:`check`), kept for the next list with the
        same ``Rules`` object: a server's default rules, or every row of a batch."""
        kept = self._plans.get(id(rules))
        if kept is not None and kept[0] is rules:  # the entry holds rules: its id is not reused
            return kept[1]
        self.check(rules)
        pipeline = self.pipeline
        promotion = rules.promotion
        diverse = rules.diversity is not None and rules.diversity.active
        mmr = diverse and rules.diversity is not None and rules.diversity.mmr > 0
        composed: tuple[Any, ...] = ()
        if ComposedStage.fits(rules) and (not mmr or pipeline.similarity_table() is not None):
            composed = (self.composed[diverse, bool(rules.boosts)],)
        plan = RulePlan(
            before=tuple(s for s in self.before if s.wanted(rules)),
            after=tuple(s for s in self.after if s.wanted(rules)),
            boost_factors=self.boost_factors(rules.boosts) if rules.boosts else None,
            promoted=(
                None if promotion is None else pipeline.candidate_mask(promotion.item_filter)
            ),
            composed=composed,
        )
        if len(self._plans) >= RULE_PLANS:
            self._plans.clear()  # a bound on memory; a plan is rebuilt in microseconds
        self._plans[id(rules)] = (rules, plan)
        return plan

    def check(self, rules: Rules) -> None:
        """What only the pipeline can check: filters of known item types, shown items in range."""
        pipeline = self.pipeline
        named = [("rules.boosts.item_filter", b.item_filter) for b in rules.boosts]
        if rules.promotion is not None:
            named.append(("rules.promotion.item_filter", rules.promotion.item_filter))
        for name, flt in named:
            try:
                pipeline.candidate_mask(flt)
            except InvalidInputError as exc:
                raise InvalidInputError(f"{name}: {exc}", field=name) from None
        shown = rules.rotation.shown_items if rules.rotation is not None else None
        if (
            shown is not None
            and len(shown)
            and (shown.min() < 0 or shown.max() >= pipeline.n_items)
        ):
            raise _fail(
                f"holds item indices outside [0, {pipeline.n_items})", "rules.rotation.shown_items"
            )

    def category_codes(self) -> np.ndarray:
        """Each item's category as a number, ``-1`` for items without one."""
        if self._codes is None:
            names, codes = np.unique(self.pipeline.catalog.category, return_inverse=True)
            codes = codes.astype(np.int64)
            blank = np.flatnonzero(names == "")
            if len(blank):
                codes[codes == blank[0]] = -1
            codes.setflags(write=False)
            self._codes = codes
        return self._codes

    def open_categories(self, full: np.ndarray) -> ItemMask:
        """The items outside the categories numbered ``full`` (sorted, unique; items without a
        category are always inside it), kept for the next list that fills the same categories:
        a table lookup per item instead of a set membership test, and one mask object per set,
        so the pipeline's caches (the mask in its search index's order) serve it again."""
        key = full.tobytes()
        kept = self._open.get(key)
        if kept is None:
            codes = self.category_codes()
            # One entry per category and a last one, never closed, that code -1 indexes.
            table = np.ones(int(codes.max(initial=-1)) + 2, dtype=np.bool_)
            table[full] = False
            mask = table[codes]
            mask.setflags(write=False)
            if len(self._open) >= OPEN_CATEGORY_MASKS:
                self._open.clear()  # a bound on memory; any set is rebuilt in microseconds
            kept = self._open[key] = ItemMask(mask)
        return kept

    def boost_factors(self, boosts: tuple[Boost, ...]) -> np.ndarray:
        """Per item, the product of the factors of ``boosts`` that match it, multiplied in the
        order of the boosts (float64, as :class:`BoostStage` applies them), kept per set of
        boosts."""
        factors = self._boosts.get(boosts)
        if factors is None:
            pipeline = self.pipeline
            factors = np.ones(pipeline.n_items, dtype=np.float64)
            for boost in boosts:
                factors[pipeline.candidate_mask(boost.item_filter)] *= boost.factor
            factors.setflags(write=False)
            if len(self._boosts) >= BOOST_TABLES:
                self._boosts.clear()
            self._boosts[boosts] = factors
        return factors

    def _by_age(self) -> tuple[np.ndarray, np.ndarray]:
        """Items with a known first appearance, oldest first, and those times."""
        if self._newest is None:
            first_seen = np.asarray(self.pipeline.catalog.first_seen, dtype=np.float64)
            known = np.flatnonzero(np.isfinite(first_seen))
            order = known[np.argsort(first_seen[known], kind="stable")]
            self._newest = (order, first_seen[order])
        return self._newest

    def _user_key(self, exploration: Exploration, request: ListRequest) -> int:
        if exploration.user_key is not None:
            return exploration.user_key
        return self.pipeline.user_key(request.user) if request.user != MISSING else MISSING

    def explorable(self, exploration: Exploration, ids: np.ndarray) -> np.ndarray:
        """Which of ``ids`` are new and little known (a mask)."""
        pipeline = self.pipeline
        now = time.time() if exploration.now is None else exploration.now
        first_seen = np.asarray(pipeline.catalog.first_seen, dtype=np.float64)[ids]
        with np.errstate(invalid="ignore"):
            new = first_seen >= now - exploration.max_age_days * DAY_SECONDS
        if exploration.max_interactions is not None:
            new &= pipeline.popularity[ids] <= exploration.max_interactions
        return new

    def draw_order(
        self, exploration: Exploration, request: ListRequest, ids: np.ndarray
    ) -> np.ndarray:
        """The positions of ``ids`` in the order the exploration draws them for this request."""
        keys = draw_keys(
            exploration.seed, self._user_key(exploration, request), exploration.day, ids
        )
        return np.argsort(keys, kind="stable")

    def exploration_picks(self, request: ListRequest, count: int) -> np.ndarray:
        """The first ``count`` explorable items the request may get, in draw order."""
        exploration = request.rules.exploration if request.rules is not None else None
        if exploration is None or count <= 0:
            return np.empty(0, dtype=np.int64)
        pipeline = self.pipeline
        order, times = self._by_age()
        now = time.time() if exploration.now is None else exploration.now
        start = np.searchsorted(times, now - exploration.max_age_days * DAY_SECONDS, "left")
        items = order[start:]
        if exploration.max_interactions is not None:
            items = items[pipeline.popularity[items] <= exploration.max_interactions]
        items = items[pipeline.candidate_mask(request.item_filter)[items]]
        blocked = pipeline._blocked(request)
        if len(blocked) and len(items):
            items = items[~np.isin(items, blocked)]
        return items[self.draw_order(exploration, request, items)][:count].astype(np.int64)


def _promotion_beyond(request: ListRequest) -> tuple[ItemFilter, int] | None:
    """The promotion's filter and how many of its items a list gathers beyond its candidates
    (None: no promotion)."""
    promotion = request.rules.promotion if request.rules is not None else None
    if promotion is None:
        return None
    return promotion.item_filter, GATHERED_PER_SLOT * slot_count(request.k, promotion.share)


def _rotates(rules: Rules) -> bool:
    """Whether ``rules`` demote anything for rotation."""
    rotation = rules.rotation
    return rotation is not None and rotation.rate > 0 and len(rotation.shown_items) > 0


class _RuleStage:
    """A rule's stage: a :class:`~models.ranking.ConditionalStage` of a :class:`RuleStages`,
    which runs for the requests whose rules it is :meth:`wanted` by."""

    candidates_per_slot = 1
    orders = False

    def __init__(self, rules: RuleStages) -> None:
        self.rules = rules

    def wanted(self, rules: Rules) -> bool:  # pragma: no cover - every stage says
        raise NotImplementedError

    def applies(self, request: ListRequest) -> bool:
        return request.rules is not None and self.wanted(request.rules)


class GatherStage(_RuleStage):
    """Adds the items promotions and exploration may place to the candidates, with their
    scores for this request, best first (step 1 of the module docstring)."""

    def wanted(self, rules: Rules) -> bool:
        return rules.promotion is not None or rules.exploration is not None

    def beyond(self, request: ListRequest) -> tuple[ItemFilter, int] | None:
        """The promotion's items this stage asks for beyond the candidates, so that step 1 may
        find them in the same search (see :class:`~models.ranking.RerankStage`)."""
        return _promotion_beyond(request)

    def __call__(
        self, ids: np.ndarray, scores: np.ndarray, request: ListRequest
    ) -> tuple[np.ndarray, np.ndarray]:
        rules = request.rules
        assert rules is not None
        pipeline = self.rules.pipeline
        ids = np.asarray(ids, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        more_ids, more_scores = [ids], [scores]
        wanted = self.beyond(request)
        if wanted is not None:
            within, count = wanted
            got, got_scores = pipeline.candidates(
                request, count, within=within, skip=ids, backfill=False
            )
            got_scores = np.asarray(got_scores, dtype=np.float32)
            if rules.exploration is None:
                # Both runs are best first already: merge them, no sort.
                return _merged(ids, scores, np.asarray(got, dtype=np.int64), got_scores)
            more_ids.append(got)
            more_scores.append(got_scores)
        if rules.exploration is not None:
            count = GATHERED_PER_SLOT * slot_count(request.k, rules.exploration.share)
            picks = self.rules.exploration_picks(request, count)
            picks = picks[~np.isin(picks, np.concatenate(more_ids))]
            more_ids.append(picks)
            more_scores.append(pipeline.item_scores(request, picks))
        if sum(len(x) for x in more_ids[1:]) == 0:
            return ids, scores
        all_ids = np.concatenate(more_ids)
        all_scores = np.concatenate(more_scores).astype(np.float32)
        order = np.lexsort((all_ids, -all_scores))
        return all_ids[order], all_scores[order]


class BoostStage(_RuleStage):
    """Multiplies the scores of the items the request's boosts match (sign-safe, see
    :class:`Boost`) and claims :attr:`Reason.BOOSTED` for those raised."""

    candidates_per_slot = RESCORE_CANDIDATES_PER_SLOT

    def wanted(self, rules: Rules) -> bool:
        return bool(rules.boosts)

    def __call__(
        self, ids: np.ndarray, scores: np.ndarray, request: ListRequest
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        assert request.rules is not None
        factors = self.rules.plan(request.rules).boost_factors
        assert factors is not None
        boosted, raised = _boosted(np.asarray(scores, dtype=np.float64), factors[ids])
        return ids, boosted, raised


class RotationStage(_RuleStage):
    """Demotes the items recently shown to the user (see :class:`Rotation`)."""

    candidates_per_slot = RESCORE_CANDIDATES_PER_SLOT

    def wanted(self, rules: Rules) -> bool:
        return _rotates(rules)

    def __call__(
        self, ids: np.ndarray, scores: np.ndarray, request: ListRequest
    ) -> tuple[np.ndarray, np.ndarray]:
        assert request.rules is not None and request.rules.rotation is not None
        scores = np.asarray(scores, dtype=np.float32)
        if not len(ids):
            return ids, scores
        penalty = request.rules.rotation.penalties(np.asarray(ids, dtype=np.int64))
        return ids, (scores - _spread(scores) * penalty).astype(np.float32)


class ArrangeStage(_RuleStage):
    """Lays the list out place by place: promotion and exploration slots, then diversity
    (category cap, maximal marginal relevance) for the other places (see the module docstring).

    Two instances serve a pipeline: one for requests with a diversity rule (more candidates
    per place), one for those with only promotions or exploration.
    """

    orders = True

    def __init__(self, rules: RuleStages, *, diversity: bool) -> None:
        super().__init__(rules)
        self.diversity = diversity
        self.candidates_per_slot = (
            DIVERSITY_CANDIDATES_PER_SLOT if diversity else SLOT_CANDIDATES_PER_SLOT
        )

    def wanted(self, rules: Rules) -> bool:
        diverse = rules.diversity is not None and rules.diversity.active
        if self.diversity:
            return diverse
        return not diverse and (rules.promotion is not None or rules.exploration is not None)

    def __call__(
        self, ids: np.ndarray, scores: np.ndarray, request: ListRequest
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
        rules = request.rules
        assert rules is not None
        return _Layout(self.rules, self.rules.plan(rules), request, rules, ids, scores).run()


class ComposedStage(_RuleStage):
    """Gather (a promotion's items), boosts and the arrangement of one list in one compiled call
    (:func:`_compose`), for the rules most lists carry: diversity, boosts and a promotion,
    without rotation or exploration, and no stage of the pipeline's own between them. The
    list, its scores and its reasons are those the three stages give one after the other
    (``tests/models/test_rules_cost.py`` holds them to it); only the Python between them is
    gone. Where the candidates run out before ``k`` places, the list goes on as
    :class:`ArrangeStage`'s does (:meth:`_Layout.fill`).

    One instance per shape of plan, for the candidates it asks for: with or without diversity,
    with or without boosts.
    """

    orders = True

    def __init__(self, rules: RuleStages, *, diversity: bool, boosts: bool) -> None:
        super().__init__(rules)
        self.candidates_per_slot = (
            DIVERSITY_CANDIDATES_PER_SLOT
            if diversity
            else RESCORE_CANDIDATES_PER_SLOT
            if boosts
            else SLOT_CANDIDATES_PER_SLOT
        )

    @staticmethod
    def fits(rules: Rules) -> bool:
        """Whether ``rules`` are of the kind this stage composes."""
        if rules.exploration is not None or _rotates(rules):
            return False
        diverse = rules.diversity is not None and rules.diversity.active
        return diverse or rules.promotion is not None

    def wanted(self, rules: Rules) -> bool:  # pragma: no cover - chosen by RuleStages.plan
        return self.fits(rules)

    def beyond(self, request: ListRequest) -> tuple[ItemFilter, int] | None:
        return _promotion_beyond(request)

    def search_cap(self, request: ListRequest) -> tuple[np.ndarray, int] | None:
        """For a list whose only rule is a category cap, the items' category numbers and the
        cap: the pipeline then finds the list with one capped search of its index
        (:meth:`RankingPipeline._capped_list`), the same list this stage lays out by score
        under the cap, without the candidates or a deeper fetch. None for other rules."""
        rules = request.rules
        if rules is None or rules.promotion is not None or rules.boosts:
            return None
        diversity = rules.diversity
        if diversity is None or diversity.mmr > 0 or diversity.max_per_category <= 0:
            return None
        return self.rules.category_codes(), diversity.max_per_category

    def __call__(
        self, ids: np.ndarray, scores: np.ndarray, request: ListRequest
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rules = request.rules
        assert rules is not None
        context = self.rules
        pipeline = context.pipeline
        plan = context.plan(rules)
        ids = np.asarray(ids, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        k = request.k
        more_ids, more_scores = _NO_IDS, _NO_SCORES
        promote, places, promoted = 0, _NO_IDS, _NO_PROMOTED
        promotion = rules.promotion
        if promotion is not None:
            within, count = _promotion_beyond(request)  # type: ignore[misc]
            got, got_scores = pipeline.candidates(
                request, count, within=within, skip=ids, backfill=False
            )
            more_ids = np.asarray(got, dtype=np.int64)
            more_scores = np.asarray(got_scores, dtype=np.float32)
            promote = slot_count(k, promotion.share)
            places = _slot_places(k, promote)
            assert plan.promoted is not None
            promoted = plan.promoted
        diversity = rules.diversity if rules.diversity is not None else NO_DIVERSITY
        table, where = _NO_SIMS, _NO_IDS
        if diversity.mmr > 0:
            found = pipeline.similarity_table()
            assert found is not None  # RuleStages.plan composes MMR only with unit vectors
            table, where = found
        factors = plan.boost_factors if plan.boost_factors is not None else _NO_FACTORS
        args = (
            ids,
            scores,
            more_ids,
            more_scores,
            factors,
            context.category_codes(),
            promoted,
            promote,
            places,
            diversity.max_per_category,
            diversity.mmr,
            table,
            where,
            k,
        )
        done, out_ids, out_scores, reasons = _compose_list(*args)
        if done:
            return out_ids, out_scores, reasons
        state = _compose(*args)  # the candidates ran out: fetch beyond them, as the stage does
        layout = _Layout.resume(context, plan, request, rules, state)
        layout.fill(state[10], state[13], started=True)
        return _finish(
            layout.ids, layout.scores, layout.why, state[2], layout.placed, layout.n_placed
        )


class _Layout:
    """One list being laid out by :class:`ArrangeStage` (the state of one call).

    Rows index the candidates (best first), extended by any fetched beyond them; ``cats`` are
    their categories' numbers (-1 for none) and ``taken[r]`` counts the rows already in the
    list (or pinned for it) of row ``r``'s category. The choices run compiled: the slots'
    picks (:func:`_pin`) and the place by place choice (:func:`_lay_out`).
    """

    def __init__(
        self,
        context: RuleStages,
        plan: RulePlan,
        request: ListRequest,
        rules: Rules,
        ids: np.ndarray,
        scores: np.ndarray,
    ) -> None:
        self.context = context
        self.plan = plan
        self.pipeline = context.pipeline
        self.request = request
        self.rules = rules
        self.k = request.k
        diversity = rules.diversity if rules.diversity is not None else NO_DIVERSITY
        self.cap = diversity.max_per_category
        self.mmr = diversity.mmr
        self.ids = np.asarray(ids, dtype=np.int64)
        self.scores = np.asarray(scores, dtype=np.float32)
        self.cats, self.relevance = _rows(self.ids, self.scores, context.category_codes(), self.mmr)
        n = len(self.ids)
        self.used = np.zeros(n, dtype=np.bool_)
        self.why = np.zeros(n, dtype=np.uint8)
        self.taken = np.zeros(n, dtype=np.int64)
        self.sims = _NO_SIMS
        self.unit = _NO_SIMS
        self.table = self.pipeline.similarity_table() if self.mmr > 0 else None
        self.nearest = self.relevance  # a placeholder without MMR (never read)
        if self.mmr > 0 and n:
            if self.table is not None:
                self.unit = _unit_rows(self.table[0], self.table[1], self.ids)
            else:
                self.sims = self.pipeline.pairwise_similarity(self.ids, exact=False)
            self.nearest = np.zeros(n)
        self.placed = np.empty(self.k, dtype=np.int64)
        self.n_placed = 0
        self.deeper = 0

    @classmethod
    def resume(
        cls,
        context: RuleStages,
        plan: RulePlan,
        request: ListRequest,
        rules: Rules,
        state: LayoutState,
    ) -> _Layout:
        """The layout :func:`_compose` left unfinished (the candidates ran out before ``k``
        places), to go on fetching beyond them as :meth:`run` does."""
        layout = cls.__new__(cls)
        layout.context, layout.plan, layout.request, layout.rules = context, plan, request, rules
        layout.pipeline = context.pipeline
        layout.k = request.k
        diversity = rules.diversity if rules.diversity is not None else NO_DIVERSITY
        layout.cap, layout.mmr = diversity.max_per_category, diversity.mmr
        layout.table = layout.pipeline.similarity_table() if layout.mmr > 0 else None
        layout.sims = _NO_SIMS
        (
            layout.ids,
            layout.scores,
            _,
            layout.cats,
            layout.relevance,
            layout.used,
            layout.why,
            layout.taken,
            layout.unit,
            layout.nearest,
            _,
            layout.placed,
            layout.n_placed,
            _,
        ) = state
        layout.deeper = 0
        return layout

    def _pick(self, rows: np.ndarray, count: int, why: Reason) -> np.ndarray:
        """The first ``count`` of ``rows`` (in order) still free and under the cap, taken."""
        return _pin(rows, count, int(why), self.used, self.why, self.cats, self.taken, self.cap)

    def _deeper(self) -> bool:
        """Fetch the next candidates beyond these (the model's, then the backfill's) in the
        categories still open; False when none came."""
        if self.deeper >= DEEPER_ROUNDS:
            return False
        self.deeper += 1
        within = None
        if self.cap:
            full = _full_categories(self.cats, self.taken, self.cap)
            if len(full):
                within = self.context.open_categories(full)
        # As many per place still to fill as the candidates had per place.
        want = DIVERSITY_CANDIDATES_PER_SLOT * max(1, self.k - self.n_placed)
        got, got_scores = self.pipeline.candidates(self.request, want, within=within, skip=self.ids)
        if not len(got):
            self.deeper = DEEPER_ROUNDS
            return False
        self.ids, self.scores, self.used, self.why, self.cats, self.taken = _appended(
            self.ids,
            self.scores,
            self.used,
            self.why,
            self.cats,
            self.taken,
            np.asarray(got, dtype=np.int64),
            np.asarray(got_scores, dtype=np.float32),
            self.context.category_codes(),
        )
        if self.mmr > 0:
            # Items from beyond the candidates come after all of them: no relevance of their
            # own (their scores may be the backfill's popularity, on another scale).
            self.relevance = np.concatenate([self.relevance, np.zeros(len(got))])
            placed = self.placed[: self.n_placed]
            if self.table is not None:
                self.unit = _unit_rows(self.table[0], self.table[1], self.ids)
                self.nearest = _nearest_of(self.unit, placed)
            else:
                self.sims = self.pipeline.pairwise_similarity(self.ids, exact=False)
                self.nearest = _nearest(self.sims, placed)
        return True

    def run(self) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The list: ids, scores and (when anything was pinned) reasons."""
        k, rules = self.k, self.rules
        pinned = np.full(k, -1, dtype=np.int64)
        if rules.promotion is not None:
            count = slot_count(k, rules.promotion.share)
            promoted = self.plan.promoted
            assert promoted is not None
            chosen = self._pick(np.flatnonzero(promoted[self.ids]), count, Reason.PROMOTED)
            pinned[_slot_places(k, count)[: len(chosen)]] = chosen
        if rules.exploration is not None:
            count = slot_count(k, rules.exploration.share)
            rows = np.flatnonzero(self.context.explorable(rules.exploration, self.ids))
            rows = rows[self.context.draw_order(rules.exploration, self.request, self.ids[rows])]
            chosen = self._pick(rows, count, Reason.EXPLORED)
            wanted = slot_positions(k, count)[: len(chosen)]
            places = _free_positions(wanted, set(np.flatnonzero(pinned >= 0).tolist()), k)
            pinned[places] = chosen
        self.fill(pinned, 0)
        rows = self.placed[: self.n_placed]
        if rules.promotion is None and rules.exploration is None:
            return self.ids[rows], self.scores[rows]
        return self.ids[rows], self.scores[rows], self.why[rows]

    def fill(self, pinned: np.ndarray, place: int, *, started: bool = False) -> None:
        """Lay out places ``place..k-1`` (:func:`_lay_out`), fetching beyond the candidates
        (:meth:`_deeper`) whenever they run out; ``started``: a first :func:`_lay_out` pass
        stopped at ``place`` already, so fetch first."""
        give_up = False
        if started and not self._deeper():
            give_up = True  # nothing more to fetch: leave the free places empty
        while place < self.k:
            self.n_placed, place = _lay_out(
                self.relevance,
                self.sims,
                self.unit,
                self.cats,
                self.taken,
                self.cap,
                self.mmr,
                pinned,
                self.used,
                self.nearest,
                self.placed,
                self.n_placed,
                place,
                give_up,
            )
            if place < self.k and not self._deeper():
                give_up = True


@lru_cache(maxsize=1024)
def _slot_places(k: int, count: int) -> np.ndarray:
    """:func:`slot_positions` as a read-only array, kept (the same few per server)."""
    places = np.array(slot_positions(k, count), dtype=np.int64)
    places.setflags(write=False)
    return places


_NO_SIMS = np.zeros((0, 0), dtype=np.float32)


# ----------------------------------------------------------------- compiled kernels
@njit(cache=True)
def _merged(
    ids: np.ndarray, scores: np.ndarray, more_ids: np.ndarray, more_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Two runs of candidates, each best first by the top-k rule (score, then lowest item
    index), merged into one run in that order (as sorting them together would)."""
    n, m = len(ids), len(more_ids)
    out_ids = np.empty(n + m, np.int64)
    out_scores = np.empty(n + m, np.float32)
    i = j = 0
    for o in range(n + m):
        if j == m or (
            i < n
            and (
                scores[i] > more_scores[j]
                or (scores[i] == more_scores[j] and ids[i] <= more_ids[j])
            )
        ):
            out_ids[o], out_scores[o] = ids[i], scores[i]
            i += 1
        else:
            out_ids[o], out_scores[o] = more_ids[j], more_scores[j]
            j += 1
    return out_ids, out_scores


@njit(cache=True)
def _boosted(scores: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``scores * factors ** sign(scores)`` (float64, see :class:`Boost`) as float32, and a
    claim of :attr:`Reason.BOOSTED` (1) for each item whose factor is above 1."""
    n = len(scores)
    boosted = np.empty(n, np.float32)
    raised = np.zeros(n, np.uint8)
    for i in range(n):
        value = scores[i]
        boosted[i] = np.float32(value * factors[i] ** np.sign(value))
        if factors[i] > 1.0:
            raised[i] = 1
    return boosted, raised


@njit(cache=True)
def _rows(
    ids: np.ndarray, scores: np.ndarray, codes: np.ndarray, mmr: float
) -> tuple[np.ndarray, np.ndarray]:
    """The candidates' category numbers and, with ``mmr > 0``, their relevances: the scores
    scaled to [0, 1] over the candidates (all 0 when the scores are equal)."""
    n = len(ids)
    cats = np.empty(n, np.int64)
    for r in range(n):
        cats[r] = codes[ids[r]]
    relevance = np.zeros(n if mmr > 0 else 0)
    if mmr > 0 and n:
        low, high = scores.min(), scores.max()
        if high > low:
            for r in range(n):
                relevance[r] = (np.float64(scores[r]) - low) / (np.float64(high) - low)
    return cats, relevance


@njit(cache=True)
def _full_categories(cats: np.ndarray, taken: np.ndarray, cap: int) -> np.ndarray:
    """The numbers of the (named) categories with ``cap`` rows in the list, sorted."""
    return np.unique(cats[(taken >= cap) & (cats >= 0)])


@njit(cache=True)
def _appended(
    ids: np.ndarray,
    scores: np.ndarray,
    used: np.ndarray,
    reasons: np.ndarray,
    cats: np.ndarray,
    taken: np.ndarray,
    got: np.ndarray,
    got_scores: np.ndarray,
    codes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A layout's per-row arrays with the items ``got`` (and their scores) added as free rows:
    their counts are those of the rows in the list (``used``), by category (``codes``)."""
    more = len(got)
    got_cats = np.empty(more, np.int64)
    got_taken = np.zeros(more, np.int64)
    for i in range(more):
        code = codes[got[i]]
        got_cats[i] = code
        if code >= 0:
            for r in range(len(cats)):
                if used[r] and cats[r] == code:
                    got_taken[i] += 1
    return (
        np.concatenate((ids, got)),
        np.concatenate((scores, got_scores)),
        np.concatenate((used, np.zeros(more, np.bool_))),
        np.concatenate((reasons, np.zeros(more, np.uint8))),
        np.concatenate((cats, got_cats)),
        np.concatenate((taken, got_taken)),
    )


@njit(cache=True)
def _nearest(sims: np.ndarray, placed: np.ndarray) -> np.ndarray:
    """Each row's highest similarity to the ``placed`` rows, at least 0 (similarities are
    finite)."""
    nearest = np.zeros(len(sims))
    for r in range(len(sims)):
        if not len(placed):
            break
        high = sims[r, placed[0]]
        for p in placed[1:]:
            if sims[r, p] > high:
                high = sims[r, p]
        nearest[r] = max(np.float64(high), 0.0)
    return nearest


@njit(cache=True)
def _unit_rows(table: np.ndarray, where: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The unit vectors of ``ids`` (rows of ``table`` at ``where[ids]``: see
    :meth:`RankingPipeline.similarity_table`), stored transposed (``f x len(ids)``), so that
    :func:`_raise_nearest` reads each dimension as one contiguous run."""
    f = table.shape[1]
    unit = np.empty((f, len(ids)), np.float32)
    for i in range(len(ids)):
        row = where[ids[i]]
        for j in range(f):
            unit[j, i] = table[row, j]
    return unit


@njit(cache=True)
def _raise_nearest(unit: np.ndarray, row: int, nearest: np.ndarray) -> None:
    """Raise each row's ``nearest`` to its similarity with ``row`` (``unit``: transposed unit
    vectors, :func:`_unit_rows`). Summed dimension by dimension over all rows at once (the
    compiler vectorizes across rows), in float32 as the index's products are."""
    f, n = unit.shape
    column = np.zeros(n, np.float32)
    for j in range(f):
        weight = unit[j, row]
        for r in range(n):
            column[r] += unit[j, r] * weight
    for r in range(n):
        if column[r] > nearest[r]:
            nearest[r] = column[r]


@njit(cache=True)
def _nearest_of(unit: np.ndarray, placed: np.ndarray) -> np.ndarray:
    """:func:`_nearest` with the similarities of the ``placed`` rows from unit vectors."""
    nearest = np.zeros(unit.shape[1])
    for p in placed:
        _raise_nearest(unit, p, nearest)
    return nearest


@njit(cache=True)
def _pin(
    rows: np.ndarray,
    count: int,
    why: int,
    used: np.ndarray,
    reasons: np.ndarray,
    cats: np.ndarray,
    taken: np.ndarray,
    cap: int,
) -> np.ndarray:
    """The first ``count`` of ``rows`` (in order) still free and under the cap, marked used
    with reason ``why``, their categories' counts in ``taken`` raised."""
    chosen = np.empty(min(count, len(rows)), np.int64)
    c = 0
    for row in rows:
        if c == len(chosen):
            break
        code = cats[row]
        if used[row] or (cap > 0 and code >= 0 and taken[row] >= cap):
            continue
        used[row] = True
        reasons[row] = why
        if code >= 0:
            for r in range(len(cats)):
                if cats[r] == code:
                    taken[r] += 1
        chosen[c] = row
        c += 1
    return chosen[:c]


@njit(cache=True)
def _lay_out(
    relevance: np.ndarray,
    sims: np.ndarray,
    unit: np.ndarray,
    cats: np.ndarray,
    taken: np.ndarray,
    cap: int,
    mmr: float,
    pinned: np.ndarray,
    used: np.ndarray,
    nearest: np.ndarray,
    placed: np.ndarray,
    n_placed: int,
    place: int,
    give_up: bool,
) -> tuple[int, int]:
    """Fill places ``place..k-1`` (``k = len(pinned)``): a pinned row where ``pinned`` has one,
    else the free row under the cap that is first in order (``mmr == 0``) or has the best
    ``(1 - mmr) * relevance - mmr * nearest`` (first of equals). Similarities are ``sims``
    (rows x rows), or with ``unit`` (the rows' unit vectors, transposed: :func:`_unit_rows`)
    computed for each placed row against all (:func:`_raise_nearest`). ``used``, ``taken`` (rows
    of each row's category in the list), ``nearest`` (highest similarity to a placed row, at
    least 0) and ``placed`` are updated in place.
    Returns the rows placed and the place reached: short of ``k`` when a free place found no
    row, unless ``give_up``, which leaves such places empty and goes on."""
    k = len(pinned)
    n = len(used)
    while place < k:
        row = pinned[place]
        if row < 0:
            best = -1
            best_value = -np.inf
            for r in range(n):
                if used[r]:
                    continue
                if cap > 0 and cats[r] >= 0 and taken[r] >= cap:
                    continue
                if mmr <= 0.0:
                    best = r
                    break
                value = (1.0 - mmr) * relevance[r] - mmr * nearest[r]
                if value > best_value:
                    best_value = value
                    best = r
            if best < 0:
                if not give_up:
                    return n_placed, place
                place += 1
                continue
            row = best
            used[row] = True
            code = cats[row]
            if code >= 0:
                for r in range(n):
                    if cats[r] == code:
                        taken[r] += 1
        placed[n_placed] = row
        n_placed += 1
        if mmr > 0.0:
            if unit.size:
                _raise_nearest(unit, row, nearest)
            else:
                for r in range(n):
                    if sims[r, row] > nearest[r]:
                        nearest[r] = sims[r, row]
        place += 1
    return n_placed, place


@njit(cache=True)
def _finish(
    ids: np.ndarray,
    scores: np.ndarray,
    why: np.ndarray,
    raised: np.ndarray,
    placed: np.ndarray,
    n_placed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The list a layout placed: ids, scores and reasons, the arrangement's claims over the
    boosts' (``raised``; rows fetched beyond the candidates were never boosted), as the pipeline
    merges the claims of stages run one by one."""
    out_ids = np.empty(n_placed, np.int64)
    out_scores = np.empty(n_placed, np.float32)
    reasons = np.empty(n_placed, np.uint8)
    for i in range(n_placed):
        row = placed[i]
        out_ids[i], out_scores[i] = ids[row], scores[row]
        reason = why[row]
        if reason == 0 and row < len(raised):
            reason = raised[row]
        reasons[i] = reason
    return out_ids, out_scores, reasons


LayoutState = tuple[
    np.ndarray,  # ids (the candidates, best first, then any fetched beyond them)
    np.ndarray,  # scores
    np.ndarray,  # the boosts' claims per row
    np.ndarray,  # categories
    np.ndarray,  # relevances
    np.ndarray,  # used
    np.ndarray,  # reasons
    np.ndarray,  # taken
    np.ndarray,  # unit vectors (transposed)
    np.ndarray,  # nearest
    np.ndarray,  # pinned
    np.ndarray,  # placed
    int,  # rows placed
    int,  # the place reached
]
"""What :func:`_compose` leaves of a layout, in the order :meth:`_Layout.resume` reads it."""


@njit(cache=True)
def _score_order(ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The permutation that sorts ``ids`` and ``scores`` by the top-k rule, as
    :func:`~models.kernels.by_score` sorts them (stable; NaN scores last)."""
    n = len(ids)
    if n > SHORT_SORT:
        by_id = np.argsort(ids, kind="mergesort")
        return by_id[np.argsort(-scores[by_id], kind="mergesort")]
    order = np.arange(n)
    for i in range(1, n):
        row = order[i]
        j = i
        while j > 0 and _before(scores[row], ids[row], scores[order[j - 1]], ids[order[j - 1]]):
            order[j] = order[j - 1]
            j -= 1
        order[j] = row
    return order


@njit(cache=True)
def _compose_list(
    ids: np.ndarray,
    scores: np.ndarray,
    more_ids: np.ndarray,
    more_scores: np.ndarray,
    factors: np.ndarray,
    codes: np.ndarray,
    promoted: np.ndarray,
    promote: int,
    places: np.ndarray,
    cap: int,
    mmr: float,
    table: np.ndarray,
    where: np.ndarray,
    k: int,
) -> tuple[bool, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_compose` then :func:`_finish`, returning only the list (ids, scores, reasons)
    after whether the candidates sufficed (False: empty arrays; the caller then resumes the
    layout from :func:`_compose`'s state). Most lists end here, and a list is three arrays to
    hand back to the interpreter where the state is twelve."""
    state = _compose(
        ids,
        scores,
        more_ids,
        more_scores,
        factors,
        codes,
        promoted,
        promote,
        places,
        cap,
        mmr,
        table,
        where,
        k,
    )
    if state[13] < k:
        return False, ids[:0], scores[:0], np.zeros(0, np.uint8)
    out_ids, out_scores, reasons = _finish(
        state[0], state[1], state[6], state[2], state[11], state[12]
    )
    return True, out_ids, out_scores, reasons


@njit(cache=True)
def _compose(
    ids: np.ndarray,
    scores: np.ndarray,
    more_ids: np.ndarray,
    more_scores: np.ndarray,
    factors: np.ndarray,
    codes: np.ndarray,
    promoted: np.ndarray,
    promote: int,
    places: np.ndarray,
    cap: int,
    mmr: float,
    table: np.ndarray,
    where: np.ndarray,
    k: int,
) -> LayoutState:
    """Steps 1, 2 and 4 of the module docstring for one list, in one call (see
    :class:`ComposedStage`): the promotion's items ``more_ids`` merged into the candidates,
    the boosts' ``factors`` (per item; empty: none) applied and the candidates sorted by the
    new scores, then the promotion's ``promote`` slots (at ``places``) pinned from the
    candidates ``promoted`` matches and the other places laid out (:func:`_lay_out`, with
    unit vectors from ``table`` at ``where`` for ``mmr > 0``).

    Returns the layout's state, as :class:`_Layout` keeps it: ids, scores, the boosts' claims
    per row, categories, relevances, used, reasons, taken, unit vectors, nearest, pinned,
    placed, rows placed and the place reached (short of ``k`` when the candidates ran out).
    """
    if len(more_ids):
        ids, scores = _merged(ids, scores, more_ids, more_scores)
    n = len(ids)
    raised = np.zeros(n, np.uint8)
    if len(factors):
        boosted, raised = _boosted(scores.astype(np.float64), factors[ids])
        order = _score_order(ids, boosted)
        ids, scores, raised = ids[order], boosted[order], raised[order]
    cats, relevance = _rows(ids, scores, codes, mmr)
    used = np.zeros(n, np.bool_)
    why = np.zeros(n, np.uint8)
    taken = np.zeros(n, np.int64)
    unit = np.zeros((0, 0), np.float32)
    nearest = np.zeros(n)
    if mmr > 0.0 and n:
        unit = _unit_rows(table, where, ids)
    pinned = np.full(k, -1, np.int64)
    if promote > 0:
        rows = np.flatnonzero(promoted[ids])
        chosen = _pin(rows, promote, PROMOTED, used, why, cats, taken, cap)
        for i in range(len(chosen)):
            pinned[places[i]] = chosen[i]
    placed = np.empty(k, np.int64)
    sims = np.zeros((0, 0), np.float32)
    n_placed, place = _lay_out(
        relevance, sims, unit, cats, taken, cap, mmr, pinned, used, nearest, placed, 0, 0, False
    )
    return (
        ids,
        scores,
        raised,
        cats,
        relevance,
        used,
        why,
        taken,
        unit,
        nearest,
        pinned,
        placed,
        n_placed,
        place,
    )


def _compose_warm_up(codes: np.ndarray) -> None:
    """Compile :func:`_compose` for the arguments servers pass (read-only tables)."""
    ids, scores = np.array([1, 0], dtype=np.int64), np.array([2.0, 1.0], dtype=np.float32)
    factors = np.ones(2)
    promoted = np.array([True, False])
    table = np.eye(2, dtype=np.float32)
    for array in (factors, promoted, table):
        array.setflags(write=False)
    places = _slot_places(2, 1)
    where = np.arange(2, dtype=np.int64)
    where.setflags(write=False)
    for more, boosts, mmr in ((ids[:0], factors, 0.5), (ids[:1], _NO_FACTORS, 0.0)):
        _compose(
            ids,
            scores,
            more,
            scores[: len(more)],
            boosts,
            codes,
            promoted,
            1,
            places,
            1,
            mmr,
            table,
            where,
            2,
        )


_NO_FACTORS = np.zeros(0, dtype=np.float64)
_NO_IDS = np.zeros(0, dtype=np.int64)
_NO_SCORES = np.zeros(0, dtype=np.float32)
_NO_PROMOTED = np.zeros(0, dtype=np.bool_)


_warm = False


def warm_up() -> None:
    """Compile (or load from numba's disk cache) the rules' kernels before requests need them;
    once per process (every pipeline's :class:`RuleStages` asks)."""
    global _warm
    if _warm:
        return
    _warm = True
    cats = np.array([0, -1], dtype=np.int64)
    eye = np.eye(2, dtype=np.float32)
    for sims, unit, mmr in ((_NO_SIMS, _NO_SIMS, 0.0), (eye, _NO_SIMS, 0.5), (_NO_SIMS, eye, 0.5)):
        _lay_out(
            np.zeros(2),
            sims,
            unit,
            cats,
            np.zeros(2, dtype=np.int64),
            1,
            mmr,
            np.full(2, -1, dtype=np.int64),
            np.zeros(2, dtype=np.bool_),
            np.zeros(2),
            np.empty(2, dtype=np.int64),
            0,
            0,
            False,
        )
    ids, scores = np.array([1, 0], dtype=np.int64), np.array([2.0, 1.0], dtype=np.float32)
    _merged(ids, scores, ids[:0], scores[:0])
    _boosted(scores.astype(np.float64), np.ones(2))
    codes = cats.copy()
    codes.setflags(write=False)  # as RuleStages.category_codes hands them out
    _rows(ids, scores, codes, 0.5)
    used, why = np.zeros(2, np.bool_), np.zeros(2, np.uint8)
    _pin(ids, 1, int(Reason.PROMOTED), used, why, cats, ids, 1)
    _full_categories(cats, ids, 1)
    _appended(ids, scores, used, why, cats, ids, ids, scores, codes)
    _nearest(eye, ids[:1])
    frozen = eye.copy()
    frozen.setflags(write=False)  # as the similar-items index hands its rows out
    _nearest_of(_unit_rows(frozen, ids, ids), ids[:1])
    _compose_warm_up(codes)
    _finish(ids, scores, why, why, ids, 1)
