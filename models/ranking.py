"""The one ranking pipeline: every list Affinity makes is made here.

Served lists, ``batch-recommend``, the MLflow pyfunc, offline evaluation and the promotion gate
all call :class:`RankingPipeline`, so a list is the same wherever it is made and the offline
numbers in MLflow describe what users see. A list goes through five steps:

1. **candidates**: personalized scores of a trained user, fold-in of a user known only by
   recent items, items similar to query items, or popular / trending items;
2. **filters**: availability, item type and category, the user's seen items, excluded ids;
3. **re-ranking stages**: an ordered list of small steps (:class:`RerankStage`) that rescore or
   reorder the candidates; empty by default, plus the ranking rules a request asks for
   (:mod:`models.rules`: diversity, rotation, boosts, promotions, exploration);
4. **exact top-k** by the rule of :mod:`models.topk` (score, then lowest item index), or the
   first ``k`` in the order an ordering stage set;
5. **backfill** from popular items when the filters left fewer than ``k``.

Steps 1, 2 and 4 are fused where that is faster and gives the same list: a factor model's
request is one exact search of a norm-ordered index (:mod:`models.search`) that skips filtered
items as it scans, instead of scoring the whole catalog and masking it. Filter masks are
computed once per model and cached, never per request.

:meth:`RankingPipeline.rank` makes one list (a request, in model indices);
:meth:`RankingPipeline.rank_users` makes many at once (evaluation's batches), through the same
candidate sources, filters, stages, top-k rule and backfill. :meth:`recommend`,
:meth:`similar_items` and :meth:`popular` take and return external ids.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeAlias
from weakref import WeakMethod

import numpy as np
import scipy.sparse as sp

from .ann import ApproximateIndex, load_approximate_index
from .artifact import ITEM_TYPES, ItemCatalog, ModelBundle
from .batching import ScoreBatcher
from .errors import InvalidInputError, NotFoundError, NotReadyError
from .kernels import by_score, claim_reasons, warm_up
from .ranking_metrics import item_popularity
from .scoring import Scorer, SharedScorer, VectorScorer
from .search import Hits, NormOrderedIndex, Query
from .topk import NEG_INF, top_k_ids, top_k_row
from .vocabulary import MISSING, Vocabulary

if TYPE_CHECKING:
    from .rules import Rules
    from .strategies import Strategy, StrategyStages


class Source(enum.StrEnum):
    """Where a recommendation list came from."""

    PERSONALIZED = "personalized"
    FOLD_IN = "fold_in"
    POPULAR = "popular"


class Reason(enum.IntEnum):
    """Why an item is in a list (:attr:`Ranked.reasons`, one ``uint8`` code per item)."""

    MODEL = 0
    """Ranked there by the model's score (after dislikes and rotation, if any)."""
    BOOSTED = 1
    """A boost rule raised its score (:class:`models.rules.Boost` with a factor above 1)."""
    PROMOTED = 2
    """Placed in a promotion slot (:class:`models.rules.Promotion`)."""
    EXPLORED = 3
    """Placed in an exploration slot (:class:`models.rules.Exploration`)."""


class ListKind(enum.Enum):
    """What a :class:`ListRequest` asks for (the candidate source of step 1)."""

    USER = "user"
    SIMILAR = "similar"
    POPULAR = "popular"
    TRENDING = "trending"


@dataclass(frozen=True)
class ItemFilter:
    """Restrict candidates to these item types and categories (empty means no restriction)."""

    item_types: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()

    @classmethod
    def of(cls, item_types: Sequence[str] = (), categories: Sequence[str] = ()) -> ItemFilter:
        return cls(tuple(sorted(set(item_types))), tuple(sorted(set(categories))))


NO_FILTER = ItemFilter()


@dataclass(frozen=True, eq=False)
class ItemMask:
    """A mask over items that its maker keeps and passes again and again (the categories a
    diversity cap leaves open, :meth:`models.rules.RuleStages.open_categories`): compared and
    hashed by identity, so what the pipeline derives from it, such as the mask in its search
    index's order, is cached as for a filter instead of recomputed per list."""

    mask: np.ndarray


FilterKey: TypeAlias = ItemFilter | tuple[ItemFilter, ItemFilter | ItemMask] | np.ndarray
"""Which items may be candidates: a filter, a filter and a second filter (or kept mask) that
must both pass, or a mask."""
_NO_ITEMS = np.empty(0, dtype=np.int64)
_NO_ITEMS.setflags(write=False)
FEW_ALLOWED = 0.25
"""Largest share of the catalog a rule's filter may let through for its search to visit the
allowed items by list (:meth:`RankingPipeline._few_allowed_positions`) instead of by mask."""


class ListRequest:
    """One list to make, in model indices (see :meth:`RankingPipeline.rank`).

    A plain slotted class rather than a dataclass: one is built per served request, and a frozen
    dataclass's ``__init__`` is measurably slower (``docs/benchmarks.md``, "Figures behind design
    choices in the code").
    """

    __slots__ = (
        "beyond",
        "disliked",
        "exclude",
        "include_seen",
        "item_filter",
        "items",
        "k",
        "kind",
        "recent",
        "rules",
        "strategy",
        "user",
    )

    def __init__(
        self,
        kind: ListKind,
        k: int,
        *,
        user: int = MISSING,
        recent: np.ndarray = _NO_ITEMS,
        items: np.ndarray = _NO_ITEMS,
        exclude: np.ndarray = _NO_ITEMS,
        item_filter: ItemFilter = NO_FILTER,
        include_seen: bool = False,
        disliked: np.ndarray = _NO_ITEMS,
        rules: Rules | None = None,
        strategy: Strategy | None = None,
    ) -> None:
        self.kind = kind
        self.k = k
        self.user = user
        """A trained user's index, or ``MISSING`` for a user known only by :attr:`recent`."""
        self.recent = recent
        """Items the user acted on that the model has not seen (fold-in)."""
        self.items = items
        """The query items of a :attr:`ListKind.SIMILAR` request."""
        self.exclude = exclude
        """Items never to return."""
        self.item_filter = item_filter
        self.include_seen = include_seen
        """Allow items the user has already interacted with (and :attr:`recent`)."""
        self.disliked = disliked
        """Items the user said "not interested" to: never returned (even with
        :attr:`include_seen`), and their neighbours pushed down when the pipeline has a
        :class:`DislikeStage`."""
        # An exploration's clock is read once here, so every stage sees the same day and ages.
        self.rules = rules if rules is None else rules.settled()
        """The ranking rules of this list (:class:`models.rules.Rules`); None: none."""
        self.strategy = strategy
        """The lifecycle-stage strategy of this list (:mod:`models.strategies`); None: the
        plain ranking."""
        self.beyond: Beyond | None = None
        """Items step 1 found beyond this list's candidates in the same search, for its first
        stage (see :meth:`RankingPipeline.candidates`); set by the pipeline."""


class Beyond(NamedTuple):
    """Items beyond a list's candidates, found in the search that found them: the answer of
    ``candidates(request, n, within=within, skip=after, backfill=False)``."""

    within: ItemFilter
    n: int
    after: np.ndarray
    """The candidates (the very array) they lie beyond."""
    ids: np.ndarray
    scores: np.ndarray


class Ranked(NamedTuple):
    """A list in model indices, best first, and where it came from."""

    ids: np.ndarray
    scores: np.ndarray
    source: Source
    reasons: np.ndarray | None = None
    """Why each item is there (:class:`Reason` codes, ``uint8``); None: all :attr:`Reason.MODEL`
    (every list made without rules)."""

    def reason_codes(self) -> np.ndarray:
        """:attr:`reasons`, or all :attr:`Reason.MODEL` when there are none."""
        if self.reasons is None:
            return np.zeros(len(self.ids), dtype=np.uint8)
        return self.reasons


@dataclass
class Recommendations:
    """A ranked list in external ids, best first."""

    item_ids: list[str]
    scores: list[float]
    source: Source
    indices: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0, np.int64))
    reasons: np.ndarray | None = field(repr=False, default=None)
    """Why each item is there (:class:`Reason` codes); None: all :attr:`Reason.MODEL`."""

    def __len__(self) -> int:
        return len(self.item_ids)

    def reason_list(self) -> list[Reason]:
        """One :class:`Reason` per item."""
        if self.reasons is None:
            return [Reason.MODEL] * len(self.item_ids)
        return [Reason(int(code)) for code in self.reasons]


class RerankStage(Protocol):
    """One re-ranking step (step 3): rescore or reorder the candidates of one list.

    A stage gets the candidates best first (model indices and scores, filters already applied)
    and returns them rescored or reordered; the pipeline then takes the exact top ``k`` of what
    the last stage returns, by score. A stage that needs more candidates than places to choose
    from (diversity, promotions) asks for ``candidates_per_slot`` of them per place.

    Two optional extras (read with ``getattr``, so a plain stage needs neither):

    - ``orders = True``: the stage sets the order of the list itself (diversity, slots for
      promotions). The pipeline hands it the candidates sorted by their current scores (the
      top-k rule), and when it is the last stage to run, keeps the order it returns and takes
      its first ``k`` instead of ranking by score. A later stage without ``orders`` hands the
      order back to the scores. An ordering stage makes the whole list: when it runs, step 5
      appends nothing after the stages. It finds more items where it needs them with
      :meth:`RankingPipeline.candidates` (the model's next best, then the backfill), and a
      list it leaves shorter than ``k`` stays short (a diversity cap nothing else can meet).
    - a third array in the result, aligned with the returned ids: a :class:`Reason` code per
      item (``Reason.MODEL`` for no claim). Claims follow the item through later stages; a
      later claim other than ``MODEL`` replaces an earlier one.
    - ``beyond(request) -> (ItemFilter, n) | None``, on a stage that runs first: the items it
      will ask :meth:`RankingPipeline.candidates` for beyond the candidates it gets (``within``
      that filter, ``skip`` those candidates, no backfill). Step 1 may find them in the same
      search as the candidates (a promotion's best items: one pass over the index, not two).
    """

    candidates_per_slot: int

    def __call__(
        self, ids: np.ndarray, scores: np.ndarray, request: ListRequest
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]: ...


class ConditionalStage(RerankStage, Protocol):
    """A stage with work only for some requests: it runs, and asks for its extra candidates,
    only where :meth:`applies` says so (the other requests pay nothing for it)."""

    def applies(self, request: ListRequest) -> bool: ...


class DislikeStage:
    """Pushes down the neighbours of the items a user disliked.

    Each candidate loses ``weight`` times its highest similarity (clipped to [0, 1]) to any
    disliked item, in units of the spread of the candidates' scores: at weight 1 the nearest
    neighbour of a disliked item (similarity 1) falls from the top of the list to the bottom.
    ``similarity(ids, disliked)`` gives that highest similarity per candidate
    (:meth:`RankingPipeline.max_similarity`). The disliked items themselves are never candidates.
    """

    candidates_per_slot = 2

    def __init__(
        self, similarity: Callable[[np.ndarray, np.ndarray], np.ndarray], weight: float = 0.5
    ) -> None:
        if not (math.isfinite(weight) and weight >= 0):
            raise InvalidInputError(f"dislike weight must be >= 0, got {weight}", field="weight")
        self.similarity = similarity
        self.weight = float(weight)

    def applies(self, request: ListRequest) -> bool:
        return self.weight > 0 and len(request.disliked) > 0 and request.kind is ListKind.USER

    def __call__(
        self, ids: np.ndarray, scores: np.ndarray, request: ListRequest
    ) -> tuple[np.ndarray, np.ndarray]:
        if not len(ids):
            return ids, scores
        scores = np.asarray(scores, dtype=np.float32)
        spread = float(scores.max() - scores.min()) or abs(float(scores.max())) or 1.0
        closeness = np.clip(self.similarity(ids, request.disliked), 0.0, 1.0)
        return ids, scores - np.float32(self.weight * spread) * closeness.astype(np.float32)


def _weak(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` called through a weak reference to its instance (see :func:`_cached`)."""
    ref = WeakMethod(method)

    def call(*args: Any) -> Any:
        bound = ref()
        if bound is None:  # pragma: no cover - the pipeline is gone, nobody can call us
            raise ReferenceError("ranking pipeline was garbage collected")
        return bound(*args)

    return call


def _cached(method: Callable[..., Any], maxsize: int = 256) -> Callable[..., Any]:
    """``lru_cache`` of a bound method that holds its instance weakly.

    ``lru_cache(self.method)`` stored on ``self`` is a reference cycle, so a swapped-out pipeline
    (hundreds of MB) would wait for a full garbage collection instead of being freed at once.
    """
    ref = WeakMethod(method)

    @lru_cache(maxsize=maxsize)
    def call(*args: Any) -> Any:
        bound = ref()
        if bound is None:  # pragma: no cover - the pipeline is gone, nobody can call us
            raise ReferenceError("ranking pipeline was garbage collected")
        return bound(*args)

    return call


class RankingPipeline:
    """Immutable, thread-safe maker of every list over one model (see the module docstring)."""

    def __init__(
        self,
        model: Scorer,
        *,
        seen: sp.csr_matrix,
        popularity: np.ndarray,
        trending: np.ndarray | None = None,
        catalog: ItemCatalog | None = None,
        users: Vocabulary | None = None,
        items: Vocabulary | None = None,
        stages: Sequence[RerankStage] = (),
        bundle: ModelBundle | None = None,
        dislike_weight: float = 0.0,
        ann: ApproximateIndex | None = None,
    ) -> None:
        """Rank with ``model`` for the users of ``seen`` (their rows: what they already have).

        ``popularity`` (and ``trending``) rank the popular lists and the backfill; ``catalog``
        holds the items' availability, types and categories (default: every item available,
        untyped); ``users`` and ``items`` map external ids for :meth:`recommend` and friends.
        ``dislike_weight`` > 0 appends a :class:`DislikeStage` of that weight to ``stages``.
        ``ann``: an approximate index over a factor model's items (:mod:`models.ann`) for the
        candidates of user lists; default: the bundle's, if its artifact has one.
        """
        if not getattr(model, "is_fitted", True):
            raise NotReadyError("the model is not fitted")
        self.model = model
        self.n_items = n_items = int(model.n_items)
        self.n_users = int(seen.shape[0])
        self.bundle = bundle
        self.users = users
        self.items = items
        self.stages: tuple[RerankStage, ...] = tuple(stages)
        if dislike_weight > 0:
            # Held weakly: a bound method in a stage of its own pipeline would be a reference
            # cycle, keeping a swapped-out model alive until a full garbage collection.
            self.stages += (DislikeStage(_weak(self.max_similarity), dislike_weight),)
        # Stages that run for every request, and those that say per request (ConditionalStage).
        self._always = tuple(s for s in self.stages if not hasattr(s, "applies"))
        self._per_slot = max((s.candidates_per_slot for s in self._always), default=1)
        # The ranking rules' stages, looked at only for requests that carry rules: those that
        # gather extra candidates run before the stages above, the others after them.
        from .rules import RuleStages  # models.rules builds on this module

        self._rules = RuleStages(self)
        # The lifecycle-stage strategies' stages, built for the first request that carries one.
        self._strategies: StrategyStages | None = None
        catalog = catalog if catalog is not None else ItemCatalog.empty(n_items)
        self.catalog = catalog
        self.popularity = np.asarray(popularity, dtype=np.float32)
        if self.popularity.shape != (n_items,):
            raise InvalidInputError(
                f"popularity needs one score per item ({n_items}), got {self.popularity.shape}",
                field="popularity",
            )
        self.trending = self.popularity if trending is None else np.asarray(trending, np.float32)
        self._available = np.asarray(catalog.available, dtype=bool)
        self._type_masks = {
            t: np.asarray(catalog.item_type == t) for t in np.unique(catalog.item_type)
        }
        self._category_masks = {
            c: np.asarray(catalog.category == c) for c in np.unique(catalog.category)
        }
        self._popular_order = self._order(self.popularity)
        self._trending_order = self._order(self.trending)
        self._seen = seen if seen.dtype == np.float32 else sp.csr_matrix(seen, dtype=np.float32)
        # Weight given to a fresh interaction in fold-in: a typical confidence of the training data.
        self._recent_weight = float(np.median(self._seen.data)) if self._seen.nnz else 1.0
        # Factor models are searched in a norm-ordered index of their item vectors; "more like
        # this" on them ranks cosine similarity, the dot product of unit vectors, where nothing
        # can be pruned but concurrent requests share one pass over the catalog.
        self._vectors: VectorScorer | None = None
        self._index: NormOrderedIndex | None = None
        self._similar_index: NormOrderedIndex | None = None
        self._similar_batcher: ScoreBatcher | None = None
        if isinstance(model, VectorScorer):
            self._vectors = model
            self._index = NormOrderedIndex(model.item_factors)
            self._similar_index = NormOrderedIndex(model.item_unit_vectors(), first_block=n_items)
            self._similar_batcher = ScoreBatcher(self._similar_index.search)
            warm_up()  # compiled before the pipeline serves (from numba's disk cache after once)
            if ann is None and bundle is not None and bundle.ann is not None:
                ann = load_approximate_index(bundle.ann, model.item_factors.shape)
        # Large catalogs: user lists' candidates from an approximate index, re-ranked exactly,
        # with the exact index as the fallback (similar items stay exact).
        self._ann = ann if self._index is not None else None
        self._unusable = _NO_ITEMS
        if self._ann is not None and self._index is not None and len(self._index.broken):
            self._unusable = self._index.order[self._index.broken]
        self._shared: SharedScorer | None = model if isinstance(model, SharedScorer) else None
        self.candidate_mask = _cached(self._candidate_mask)
        self._masked_out = _cached(self._masked_out_items)
        self._disallowed = _cached(self._disallowed_positions)
        self._few_allowed = _cached(self._few_allowed_positions)
        self._position_codes: tuple[np.ndarray, np.ndarray, int] | None = None
        self._folded = _cached(self._fold, maxsize=8192)

    @classmethod
    def from_bundle(
        cls,
        bundle: ModelBundle,
        stages: Sequence[RerankStage] = (),
        *,
        dislike_weight: float = 0.0,
        approximate: bool = True,
    ) -> RankingPipeline:
        """The pipeline serving one trained model artifact (``approximate=False``: without the
        approximate index it may ship, every list from the exact search)."""
        if not approximate and bundle.ann is not None:
            bundle = dataclasses.replace(bundle, ann=None)
        return cls(
            bundle.model,
            seen=bundle.seen,
            popularity=bundle.popularity,
            trending=bundle.trending,
            catalog=bundle.catalog,
            users=bundle.users,
            items=bundle.items,
            stages=stages,
            bundle=bundle,
            dislike_weight=dislike_weight,
        )

    @classmethod
    def for_training(
        cls,
        model: Scorer,
        train: sp.csr_matrix,
        *,
        popularity: np.ndarray | None = None,
        stages: Sequence[RerankStage] = (),
    ) -> RankingPipeline:
        """The pipeline of a model evaluated on the matrix it was fitted on: every item
        available, each user's training items seen, popular items by ``popularity`` (default:
        distinct users per item in ``train``)."""
        if not getattr(model, "is_fitted", True):
            raise NotReadyError("the model is not fitted")
        train = sp.csr_matrix(train)
        if train.shape[1] != model.n_items:
            raise InvalidInputError(
                f"the training matrix has {train.shape[1]} items, the model {model.n_items}"
            )
        if popularity is None:
            popularity = item_popularity(train)
        return cls(model, seen=train, popularity=popularity, stages=stages)

    # ------------------------------------------------------------ catalog facts
    @property
    def item_types(self) -> list[str]:
        return sorted(t for t in self._type_masks if t)

    @property
    def categories(self) -> list[str]:
        return sorted(c for c in self._category_masks if c)

    def _order(self, scores: np.ndarray) -> np.ndarray:
        order = np.lexsort((np.arange(self.n_items), -np.asarray(scores, dtype=np.float64)))
        return order[self._available[order]]

    # ----------------------------------------------------------- step 2: filters
    def _candidate_mask(
        self, flt: ItemFilter | tuple[ItemFilter, ItemFilter | ItemMask]
    ) -> np.ndarray:
        if isinstance(flt, tuple):  # both filters (a rule's within the request's)
            within = flt[1]
            second = within.mask if isinstance(within, ItemMask) else self.candidate_mask(within)
            mask = self.candidate_mask(flt[0]) & second
            mask.setflags(write=False)
            return mask
        mask = self._available.copy()
        if flt.item_types:
            for t in flt.item_types:
                if t not in ITEM_TYPES and t not in self._type_masks:
                    raise InvalidInputError(
                        f"unknown item_type {t!r}; expected one of {', '.join(ITEM_TYPES)}",
                        field="item_types",
                    )
            mask &= np.logical_or.reduce(
                [self._type_masks.get(t, np.zeros(self.n_items, bool)) for t in flt.item_types]
            )
        if flt.categories:
            mask &= np.logical_or.reduce(
                [self._category_masks.get(c, np.zeros(self.n_items, bool)) for c in flt.categories]
            )
        mask.setflags(write=False)
        return mask

    def _masked_out_items(self, flt: FilterKey) -> np.ndarray:
        """Indices the filter removes: usually few, so setting them beats a full ``where``."""
        mask = flt if isinstance(flt, np.ndarray) else self.candidate_mask(flt)
        out = np.flatnonzero(~mask)
        out.setflags(write=False)
        return out

    def _disallowed_positions(self, flt: FilterKey, similar: bool = False) -> np.ndarray | None:
        """The filter's excluded items as a mask over the positions of the recommendation (or,
        with ``similar``, the similar-items) index; None when it excludes nothing."""
        index = self._similar_index if similar else self._index
        assert index is not None
        out = ~(flt if isinstance(flt, np.ndarray) else self.candidate_mask(flt))
        if not out.any():
            return None
        disallowed = out[index.order]
        disallowed.setflags(write=False)
        return disallowed

    def _few_allowed_positions(self, flt: FilterKey) -> np.ndarray | None:
        """The positions of the recommendation index that ``flt`` allows, sorted, when they are
        at most :data:`FEW_ALLOWED` of the catalog (a promotion's category, a campaign): a
        search for a rule's items then visits only those. None for a broader filter, whose mask
        costs less than the list."""
        disallowed = self._filter_positions(flt)
        if disallowed is None:
            return None
        allowed = np.flatnonzero(~disallowed)
        if len(allowed) > FEW_ALLOWED * len(disallowed):
            return None
        allowed.setflags(write=False)
        return allowed

    def _filter_out(self, flt: FilterKey) -> np.ndarray:
        """:meth:`_masked_out_items`, cached unless ``flt`` is a mask (made for one request)."""
        return self._masked_out_items(flt) if isinstance(flt, np.ndarray) else self._masked_out(flt)

    def _filter_positions(self, flt: FilterKey, similar: bool = False) -> np.ndarray | None:
        """:meth:`_disallowed_positions`, cached unless ``flt`` is a mask."""
        if isinstance(flt, np.ndarray):
            return self._disallowed_positions(flt, similar)
        return self._disallowed(flt, similar)

    def _blocked(self, request: ListRequest) -> np.ndarray:
        """Items the request must not get: excluded ids, query items, and unless
        ``include_seen`` the user's seen and recent items (repeats are harmless)."""
        parts = [request.exclude] if len(request.exclude) else []
        if len(request.disliked):
            parts.append(request.disliked)
        if request.kind is ListKind.SIMILAR:
            parts.append(request.items)
        elif request.kind is ListKind.USER and not request.include_seen:
            if request.user != MISSING:
                indptr = self._seen.indptr
                parts.append(self._seen.indices[indptr[request.user] : indptr[request.user + 1]])
            if len(request.recent):
                parts.append(request.recent)
        if not parts:
            return _NO_ITEMS
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # ------------------------------------------------------------- one list
    def rank(self, request: ListRequest) -> Ranked:
        """The list ``request`` asks for: candidates -> filters -> stages -> top-k -> backfill."""
        k = request.k
        if k <= 0:
            raise InvalidInputError(f"k must be positive, got {k}", field="k")
        self._check_indices(request)
        mask = self.candidate_mask(request.item_filter)  # validates the filter before scoring
        blocked = self._blocked(request)
        stages = self._stages_for(request)  # checks the rules, if any
        per_slot = self._per_slot
        if stages is not self.stages and stages is not self._always:
            per_slot = max((s.candidates_per_slot for s in stages), default=1)
        if len(stages) == 1 and hasattr(stages[0], "search_cap"):
            capped = self._capped_list(request, blocked, stages[0].search_cap(request))
            if capped is not None:
                return capped
        n = k * per_slot
        beyond = stages[0].beyond(request) if stages and hasattr(stages[0], "beyond") else None
        ids, scores, source = self._candidates(
            request, n, request.item_filter, mask, blocked, beyond
        )
        if not stages:
            if len(ids) < k and source is not Source.POPULAR:
                ids, scores = self._backfill(ids, scores, k, mask, blocked)
            return Ranked(ids, scores, source)
        ids, scores, reasons = self._rerank(ids, scores, request, stages)
        # An ordering stage makes the whole list, backfill included (see RerankStage).
        if not _orders(stages) and len(ids) < k and source is not Source.POPULAR:
            got = len(ids)
            ids, scores = self._backfill(ids, scores, k, mask, blocked)
            if reasons is not None:
                reasons = np.concatenate([reasons, np.zeros(len(ids) - got, np.uint8)])
        return Ranked(ids, scores, source, reasons)

    def _capped_list(
        self, request: ListRequest, blocked: np.ndarray, cap: tuple[np.ndarray, int] | None
    ) -> Ranked | None:
        """A user's list under a category cap and nothing else (``cap``: each item's category
        number, -1 for none, and the cap, from the rules' stage), found by one capped search
        of the index (:func:`models.kernels.search_one` with a cap). It is the list the stage
        lays out from four candidates per place: the same ids and reasons (all the model's), the
        same scores up to float32 rounding (an item may be scored in the first block by one search
        and as a row of the tail by the other), without the candidates or a deeper fetch.

        None where that search does not apply (no factor index, an approximate one, a list
        that is not a user's) or cannot fill the list from its first block; the stage then
        lays the list out."""
        index = self._index
        if cap is None or index is None or self._ann is not None or not index.prunes:
            return None
        if request.kind is not ListKind.USER or (
            request.user == MISSING and not len(request.recent)
        ):
            return None
        codes, n_codes = self._codes_by_position(cap[0])
        query = Query(
            self._vector(request.user, request.recent),
            request.k,
            index.positions(blocked),
            self._filter_positions(request.item_filter),
            cap=cap[1],
            codes=codes,
            n_codes=n_codes,
        )
        hits = index.search([query])[0]
        if len(hits.ids) < request.k:
            return None
        source = Source.PERSONALIZED if request.user != MISSING else Source.FOLD_IN
        return Ranked(hits.ids, hits.scores, source)

    def _codes_by_position(self, codes: np.ndarray) -> tuple[np.ndarray, int]:
        """Item category numbers (``codes``, by item) in the recommendation index's order, and
        how many numbers there are; kept for the next list with the same ``codes`` object."""
        kept = self._position_codes
        if kept is None or kept[0] is not codes:
            assert self._index is not None
            by_position = np.ascontiguousarray(codes[self._index.order], dtype=np.int64)
            by_position.setflags(write=False)
            kept = self._position_codes = (codes, by_position, int(codes.max(initial=-1)) + 1)
        return kept[1], kept[2]

    def _candidates(
        self,
        request: ListRequest,
        n: int,
        flt: FilterKey,
        mask: np.ndarray,
        blocked: np.ndarray,
        beyond: tuple[ItemFilter, int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, Source]:
        """Steps 1 and 2: the best ``n`` candidates of ``request`` that pass ``flt`` (whose
        mask is ``mask``) and are not ``blocked``, and their source; with ``beyond`` (a filter
        and a count, see :class:`RerankStage`), a search of the index finds those items beyond
        the candidates too and keeps them in ``request.beyond``."""
        kind = request.kind
        if kind is ListKind.USER and (request.user != MISSING or len(request.recent)):
            source = Source.PERSONALIZED if request.user != MISSING else Source.FOLD_IN
            ids, scores = self._user_candidates(request, n, blocked, flt, beyond)
        elif kind is ListKind.SIMILAR:
            source = Source.PERSONALIZED
            ids, scores = self._similar_candidates(request, n, blocked, flt)
        else:  # popular, trending, and the cold start of a user nobody knows anything about
            source = Source.POPULAR
            ids, scores = self._popular(n, mask, blocked, trending=kind is ListKind.TRENDING)
        return ids, scores, source

    def candidates(
        self,
        request: ListRequest,
        n: int,
        *,
        within: ItemFilter | ItemMask | None = None,
        skip: np.ndarray = _NO_ITEMS,
        backfill: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The best ``n`` items for ``request`` by steps 1 and 2 (its candidates, filters and
        blocked items), also passing ``within`` (a filter, or a mask its maker keeps), never
        any of ``skip``, and with ``backfill`` topped up from step 5 (popular items, after the
        model's) when the model gives fewer: where a re-ranking stage finds items beyond the
        candidates it got (a promotion's, a diversity cap's, the rest of a list an ordering
        stage makes)."""
        found = request.beyond
        if (
            found is not None
            and _same_array(skip, found.after)
            and within == found.within
            and n == found.n
            and not backfill
        ):
            return found.ids, found.scores
        flt: FilterKey = request.item_filter if within is None else (request.item_filter, within)
        mask = self.candidate_mask(flt)
        blocked = self._blocked(request)
        if len(skip):
            blocked = np.concatenate([blocked, np.asarray(skip, dtype=np.int64)])
        ids, scores, source = self._candidates(request, n, flt, mask, blocked)
        if backfill and len(ids) < n and source is not Source.POPULAR:
            ids, scores = self._backfill(ids, scores, n, mask, blocked)
        return ids, scores

    def item_scores(self, request: ListRequest, ids: np.ndarray) -> np.ndarray:
        """The scores step 1 gives ``ids`` for ``request`` (float32), whether or not they are
        among its candidates: the popular (or trending) scores where the request has no one to
        personalize for."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return np.empty(0, dtype=np.float32)
        kind = request.kind
        if kind is ListKind.USER and (request.user != MISSING or len(request.recent)):
            if self._index is not None:
                vector = self._vector(request.user, request.recent)
                return np.asarray(self._index.rows(ids) @ vector, dtype=np.float32)
            return self._scores(request.user, request.recent)[ids]
        if kind is ListKind.SIMILAR:
            if self._similar_index is not None:
                rows = self._similar_index.rows(request.items)
                vector = rows.mean(axis=0, dtype=np.float32)
                return np.asarray(self._similar_index.rows(ids) @ vector, dtype=np.float32)
            sims = np.asarray(self.model.score_similar(request.items), dtype=np.float32)
            return (sims[:, ids].sum(axis=0) / len(request.items)).astype(np.float32)
        return (self.trending if kind is ListKind.TRENDING else self.popularity)[ids]

    def similarity_table(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The item unit vectors as the similar-items index stores them, and each item's row in
        them (item index -> row), where the model has vectors: ``rows[where[a]] @
        rows[where[b]]`` is the similarity of items ``a`` and ``b`` that
        :meth:`pairwise_similarity` gives with ``exact=False``, for a caller that needs only a few
        of the pairs (maximal marginal relevance). None for other models."""
        index = self._similar_index
        if index is None:
            return None
        return index._factors, index.position

    def pairwise_similarity(self, ids: np.ndarray, *, exact: bool = True) -> np.ndarray:
        """Similarity of every pair of ``ids`` in [0, 1] (``(n, n)``, float32, 1 on the
        diagonal), as :meth:`max_similarity` measures it; a model that gives every user the
        same scores has no item similarity, so there items of one (named) category are alike.
        ``exact=False`` may leave a factor model's cosines as they are (below 0, a diagonal a
        rounding away from 1), for a caller that only compares them with values >= 0."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._similar_index is not None:
            rows = self._similar_index.rows(ids)
            sims = rows @ rows.T
            if not exact:
                return np.asarray(sims, dtype=np.float32)
        elif self._shared is not None:
            category = np.asarray(self.catalog.category)[ids]
            sims = ((category[:, None] == category[None, :]) & (category != "")[:, None]).astype(
                np.float32
            )
        else:
            rows = np.array(self.model.score_similar(ids), dtype=np.float32)
            rows[np.arange(len(ids)), ids] = NEG_INF  # an item's score to itself
            rows[~np.isfinite(rows)] = 0.0
            top = rows.max(axis=1, keepdims=True) if rows.shape[1] else np.ones((len(ids), 1))
            top[top <= 0] = 1.0
            sims = rows[:, ids] / top
            sims = np.maximum(sims, sims.T)
        sims = np.clip(np.asarray(sims, dtype=np.float32), 0.0, 1.0)
        np.fill_diagonal(sims, 1.0)
        return sims

    def user_key(self, user: int) -> int:
        """A stable number for a trained user (its external id's hash where the pipeline has id
        maps, else its index), for rules that draw per user (:class:`models.rules.Exploration`)."""
        if user == MISSING:
            return MISSING
        if self.users is not None:
            return external_user_key(self.users.id(user))
        return int(user)

    def _stages_for(self, request: ListRequest) -> tuple[RerankStage, ...]:
        """The stages that run for ``request``: every stage without ``applies`` and the
        conditional ones that apply (the same tuple object when nothing conditional does),
        between the stages of the request's rules, if it has any (checked and planned once
        per ``Rules`` object, :meth:`models.rules.RuleStages.plan`)."""
        own = self._own_stages_for(request)
        if request.strategy is not None:
            own = own + self.strategy_stages(request.strategy)
        if request.rules is None:
            return own
        plan = self._rules.plan(request.rules)
        if not plan.stages:
            return own
        return plan.before + own + plan.after if own else plan.stages

    def strategy_stages(self, strategy: Strategy) -> tuple[RerankStage, ...]:
        """The stages of a lifecycle-stage ``strategy`` on this pipeline (built once)."""
        context = self._strategies
        if context is None:
            from .strategies import StrategyStages  # models.strategies builds on this module

            context = self._strategies = StrategyStages(self)
        return context.stages(strategy)

    def user_items(self, request: ListRequest) -> tuple[np.ndarray, np.ndarray]:
        """The items ``request``'s user has (their row of the model's matrix, if the model
        knows them, then the request's recent items) and each one's confidence (float64)."""
        parts, weights = [], []
        user = request.user
        if user != MISSING:
            start, end = self._seen.indptr[user], self._seen.indptr[user + 1]
            parts.append(np.asarray(self._seen.indices[start:end], dtype=np.int64))
            weights.append(np.asarray(self._seen.data[start:end], dtype=np.float64))
        if len(request.recent):
            parts.append(np.asarray(request.recent, dtype=np.int64))
            weights.append(np.full(len(request.recent), self._recent_weight, dtype=np.float64))
        if not parts:
            return _NO_ITEMS, np.empty(0, dtype=np.float64)
        items, where = np.unique(np.concatenate(parts), return_inverse=True)
        return items, np.bincount(where, weights=np.concatenate(weights), minlength=len(items))

    def popular_candidates(
        self,
        request: ListRequest,
        n: int,
        *,
        within: ItemFilter | ItemMask | None = None,
        trending: bool = False,
        skip: np.ndarray = _NO_ITEMS,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``n`` most popular (or trending) items ``request`` may get (its filters and
        blocked items, as step 2 applies them), also passing ``within``, never any of ``skip``:
        where a stage wants popular items of its own, whoever the user is."""
        flt: FilterKey = request.item_filter if within is None else (request.item_filter, within)
        blocked = self._blocked(request)
        if len(skip):
            blocked = np.concatenate([blocked, np.asarray(skip, dtype=np.int64)])
        return self._popular(n, self.candidate_mask(flt), blocked, trending=trending)

    def _own_stages_for(self, request: ListRequest) -> tuple[RerankStage, ...]:
        if len(self._always) == len(self.stages):
            return self.stages
        extra = tuple(s for s in self.stages if hasattr(s, "applies") and s.applies(request))
        if not extra:
            return self._always
        return tuple(s for s in self.stages if s in self._always or s in extra)

    def max_similarity(self, ids: np.ndarray, query: np.ndarray) -> np.ndarray:
        """For each of ``ids``, its highest similarity to any of ``query`` (items), about 1 for
        the nearest neighbours: cosine of the item vectors of a factor model, otherwise the
        model's item-item scores scaled by each query item's largest score to another item."""
        ids = np.asarray(ids, dtype=np.int64)
        query = np.unique(np.asarray(query, dtype=np.int64))
        if not len(ids) or not len(query):
            return np.zeros(len(ids), dtype=np.float32)
        if self._similar_index is not None:
            # The similar-items index already holds the unit vectors: gather the few rows.
            index = self._similar_index
            sims = index.rows(ids) @ index.rows(query).T
        else:
            rows = np.array(self.model.score_similar(query), dtype=np.float32)
            rows[np.arange(len(query)), query] = NEG_INF  # an item's score to itself
            rows[~np.isfinite(rows)] = 0.0
            top = rows.max(axis=1, keepdims=True)
            top[top <= 0] = 1.0
            sims = (rows / top)[:, ids].T
        return np.asarray(sims.max(axis=1), dtype=np.float32)

    def _check_indices(self, request: ListRequest) -> None:
        """Model indices out of range are the caller's mistake: a negative one would silently
        wrap around to the end of the catalog (or of the users)."""
        user = request.user
        if user != MISSING and not 0 <= user < self.n_users:
            raise InvalidInputError(
                f"user index {user} is outside [0, {self.n_users})", field="user"
            )
        for name, values in (
            ("recent", request.recent),
            ("items", request.items),
            ("exclude", request.exclude),
            ("disliked", request.disliked),
        ):
            if len(values) and (values.min() < 0 or values.max() >= self.n_items):
                raise InvalidInputError(
                    f"{name} holds item indices outside [0, {self.n_items})", field=name
                )

    def _user_candidates(
        self,
        request: ListRequest,
        n: int,
        blocked: np.ndarray,
        flt: FilterKey,
        beyond: tuple[ItemFilter, int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        if self._index is not None:
            vector = self._vector(request.user, request.recent)
            if self._ann is not None:
                # `beyond` is left unset: a stage that wants those items asks candidates().
                found = self._ann.search(
                    vector,
                    n,
                    blocked,
                    flt if isinstance(flt, np.ndarray) else self.candidate_mask(flt),
                    self._index.rows,
                    self._unusable,
                    keep=not isinstance(flt, np.ndarray),
                )
                if found is not None:
                    return found
            query = Query(vector, n, self._index.positions(blocked), self._filter_positions(flt))
            if beyond is not None and not isinstance(flt, np.ndarray):
                query.more = beyond[1]
                both = (request.item_filter, beyond[0])
                query.more_disallowed = self._filter_positions(both)
                query.more_allowed = self._few_allowed(both)
            # One compiled call that keeps the GIL: no batching, which would only add hand-offs
            # between threads for a search this short.
            hits = self._index.search([query])[0]
            if hits.beyond is not None and beyond is not None:
                request.beyond = Beyond(beyond[0], beyond[1], hits.ids, *hits.beyond)
            return hits.ids, hits.scores
        scores = self._scores(request.user, request.recent)
        return self._best(scores, n, flt, blocked)

    def _similar_candidates(
        self, request: ListRequest, n: int, blocked: np.ndarray, flt: FilterKey
    ) -> tuple[np.ndarray, np.ndarray]:
        query = request.items
        index, batcher = self._similar_index, self._similar_batcher
        if index is not None and batcher is not None:
            # The mean of the query items' unit vectors scores each item by its mean cosine.
            rows = index.rows(query)
            vector = rows[0] if len(rows) == 1 else rows.mean(axis=0, dtype=np.float32)
            hits: Hits = batcher(
                Query(vector, n, index.positions(blocked), self._filter_positions(flt, True))
            )
            return hits.ids, hits.scores
        sims = np.asarray(self.model.score_similar(query), dtype=np.float32)
        scores = sims[0].copy() if len(query) == 1 else sims.sum(axis=0) / len(query)
        return self._best(scores, n, flt, blocked)

    def _vector(self, user: int, recent: np.ndarray) -> np.ndarray:
        """A factor model's vector for the user (``user`` MISSING: known only by ``recent``)."""
        vectors = self._vectors
        assert vectors is not None
        if not len(recent):
            return vectors.user_vector(user)
        # A fold-in is a solve per request; the same user with the same recent items (a
        # returning visitor between two events, live events in service/live.py) asks again
        # and again, so the vectors are kept: the key is the items in order of index (a sum
        # does not depend on their order).
        return self._folded(user, np.sort(recent.astype(np.int64, copy=False)).tobytes())

    def _fold(self, user: int, recent_key: bytes) -> np.ndarray:
        """:meth:`_vector` computed (``recent_key``: the sorted recent indices' bytes)."""
        vectors = self._vectors
        assert vectors is not None
        recent = np.frombuffer(recent_key, dtype=np.int64)
        vector = self._solve(vectors, user, recent)
        vector.setflags(write=False)
        return vector

    def _solve(self, vectors: VectorScorer, user: int, recent: np.ndarray) -> np.ndarray:
        if user != MISSING:
            # The user's row plus the recent items, duplicates added up as a CSR sum would, in
            # one gather: no sparse matrices for one request.
            start, end = self._seen.indptr[user], self._seen.indptr[user + 1]
            merged = np.concatenate([self._seen.indices[start:end], recent])
            values = np.concatenate(
                [self._seen.data[start:end], np.full(len(recent), self._recent_weight, np.float32)]
            )
            items, where = np.unique(merged, return_inverse=True)
            summed = np.bincount(where, weights=values, minlength=len(items))
            return vectors.fold_in_items(items, summed.astype(np.float32))
        # Duplicates add up, as in a CSR row; no sparse matrix is built for one request.
        items, counts = np.unique(recent, return_counts=True)
        return np.array(vectors.fold_in_items(items, counts * np.float32(self._recent_weight)))

    def _scores(self, user: int, recent: np.ndarray) -> np.ndarray:
        """Every item's score for a model without an index (a private float32 row)."""
        if user != MISSING and not len(recent):
            row = self._seen[user]
            return np.array(self.model.score_users(np.array([user]), row)[0], dtype=np.float32)
        history = self._history_row(recent)
        if user != MISSING:
            history = self._seen[user] + history
        return np.array(self.model.score_history(history)[0], dtype=np.float32)

    def _history_row(self, items: np.ndarray) -> sp.csr_matrix:
        data = np.full(len(items), self._recent_weight, dtype=np.float32)
        row = sp.csr_matrix(
            (data, (np.zeros(len(items), np.int64), items)), shape=(1, self.n_items)
        )
        row.sum_duplicates()
        return row

    def _best(
        self, scores: np.ndarray, n: int, flt: FilterKey, blocked: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Filters and exact top ``n`` of a full row of ``scores`` (private, overwritten)."""
        # One cheap reduction instead of a full isfinite/where pass: the maximum is finite
        # unless a score is NaN (which max propagates) or +inf.
        if not np.isfinite(scores.max()):
            scores[~np.isfinite(scores)] = NEG_INF
        scores[self._filter_out(flt)] = NEG_INF
        if len(blocked):
            scores[blocked] = NEG_INF
        ids, top = top_k_row(scores, n)
        keep = ids >= 0
        return ids[keep], top[keep]

    def _rerank(
        self,
        ids: np.ndarray,
        scores: np.ndarray,
        request: ListRequest,
        stages: Sequence[RerankStage] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Steps 3 and 4: every stage in order, then the exact top ``k`` of what they left (or
        the first ``k`` in the order the last stage set, see :class:`RerankStage`), and the
        :class:`Reason` codes the stages claimed for them (None when they claimed none)."""
        fresh = True  # the candidates come in the top-k order
        ordered = False
        claims: list[tuple[np.ndarray, np.ndarray]] = []  # (ids, codes) per claiming stage
        for stage in self.stages if stages is None else stages:
            orders = getattr(stage, "orders", False)
            if orders and not ordered and not fresh:  # it starts from the top-k order
                ids, scores = _by_score(ids, scores, len(ids))
            fresh = False
            result = stage(ids, scores, request)
            ids, scores = result[0], result[1]
            if len(result) > 2:
                claims.append(
                    (np.asarray(ids, dtype=np.int64), np.asarray(result[2], dtype=np.uint8))
                )
            ordered = orders
        ids = np.asarray(ids, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        if ordered:
            ids, scores = ids[: request.k], scores[: request.k]
        else:
            ids, scores = _by_score(ids, scores, request.k)
        if not claims:
            return ids, scores, None
        reasons = np.zeros(len(ids), dtype=np.uint8)
        any_claim = False
        for claimed_ids, codes in claims:  # later claims win
            any_claim |= claim_reasons(reasons, ids, claimed_ids, codes)
        return ids, scores, reasons if any_claim else None

    def _popular(
        self, k: int, mask: np.ndarray, blocked: np.ndarray, *, trending: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """The first ``k`` items of the popular (or trending) order that ``mask`` keeps and
        ``blocked`` does not hold. The order is read in growing chunks until ``k`` are found,
        not whole: a list usually needs the first few hundred of a large catalog."""
        order = self._trending_order if trending else self._popular_order
        scores = self.trending if trending else self.popularity
        if k <= 0:
            ids = order[:0]
            return ids, scores[ids]
        block = np.unique(np.asarray(blocked, dtype=np.int64)) if len(blocked) else None
        parts: list[np.ndarray] = []
        found, start, step = 0, 0, max(8 * k, 512)
        while found < k and start < len(order):
            chunk = order[start : start + step]
            ok = mask[chunk]
            if block is not None:
                at = np.minimum(np.searchsorted(block, chunk), len(block) - 1)
                ok &= block[at] != chunk
            hits = chunk[ok]
            parts.append(hits)
            found += len(hits)
            start += step
            step *= 4
        ids = np.concatenate(parts)[:k] if len(parts) > 1 else parts[0][:k]
        return ids, scores[ids]

    def _backfill(
        self, ids: np.ndarray, scores: np.ndarray, k: int, mask: np.ndarray, blocked: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Step 5: popular items after ``ids`` when the filters left fewer than ``k``."""
        extra, extra_scores = self._popular(
            k - len(ids), mask, np.concatenate([blocked, ids]), trending=False
        )
        return np.concatenate([ids, extra]), np.concatenate([scores, extra_scores])

    # ------------------------------------------------------------ many lists
    def rank_users(
        self,
        users: np.ndarray,
        k: int,
        *,
        history: sp.csr_matrix | None = None,
        exclude: sp.csr_matrix | None = None,
        include_seen: bool = False,
        allowed: np.ndarray | None = None,
        item_filter: ItemFilter = NO_FILTER,
        rules: Rules | None = None,
        strategy: Strategy | None = None,
    ) -> np.ndarray:
        """The item ids of :meth:`rank` for many users at once, ``(len(users), k)``, ``-1``
        where nothing is left to recommend: offline evaluation and the promotion gate.

        ``users`` are trained users' indices or ``MISSING``; row ``i`` of ``history`` holds the
        interactions a ``MISSING`` user is folded in from (rows of trained users are ignored);
        row ``i`` of ``exclude`` the items user ``i`` must not get; ``allowed`` (a mask over
        items) restricts the candidates further, like ``item_filter``; ``rules`` apply to every
        row, and so does a lifecycle-stage ``strategy`` (:mod:`models.strategies`). A trained
        user's list is the same as :meth:`rank` gives for that user, whose scores it computes
        the same way. (A rule that looks beyond the candidates, a promotion or an
        exploration, folds a ``MISSING`` user in from the items of its history row, each with
        the weight :meth:`rank` gives a recent item.)
        """
        if k <= 0:
            raise InvalidInputError(f"k must be positive, got {k}", field="k")
        users = np.asarray(users, dtype=np.int64).ravel()
        n_rows = len(users)
        known = users != MISSING
        if known.any() and (users[known].min() < 0 or users[known].max() >= self.n_users):
            raise InvalidInputError(
                f"users holds user indices outside [0, {self.n_users})", field="users"
            )
        if not known.all() and history is None:
            raise InvalidInputError(
                "users unknown to the model need a history to fold in", field="history"
            )
        mask = self.candidate_mask(item_filter)
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=bool)
            if allowed.shape != (self.n_items,):
                raise InvalidInputError(
                    f"allowed must hold one flag per item ({self.n_items})", field="allowed"
                )
            mask = mask & allowed
        blocked = self._blocked_rows(users, known, history, exclude, include_seen)
        per_slot = self._per_slot
        if rules is not None or strategy is not None:
            if rules is not None:
                rules = rules.settled()  # one clock for every row
            probe = ListRequest(ListKind.USER, k, rules=rules, strategy=strategy)
            stages = self._stages_for(probe)  # checks the rules
            per_slot = max((s.candidates_per_slot for s in stages), default=1)
        n = min(k * per_slot, self.n_items)
        if self._index is not None:
            ids, scores = self._search_users(users, known, history, blocked, mask, n)
        elif self._shared is not None and history is None:
            ids = _shared_ranking_ids(self._shared.shared_scores(), blocked, mask, n)
            scores = _scores_of(self._shared.shared_scores(), ids)
        else:
            raw = self._score_users(users, known, history)
            ids, scores = _masked_best(raw, blocked, mask, n)
        if history is not None:
            # Nothing to fold in from: the cold start's popular list, as rank gives it.
            empty = np.diff(sp.csr_matrix(history).indptr) == 0
            for row in np.flatnonzero(~known & empty):
                row_blocked = blocked.indices[blocked.indptr[row] : blocked.indptr[row + 1]]
                got, got_scores = self._popular(n, mask, row_blocked, trending=False)
                ids[row], scores[row] = -1, NEG_INF
                ids[row, : len(got)], scores[row, : len(got)] = got, got_scores
        final = np.zeros(n_rows, dtype=bool)  # rows whose stages made the whole list
        if rules is not None or strategy is not None:
            ids, final = self._rerank_rule_rows(
                ids, scores, users, k, rules, blocked, history, item_filter, allowed, strategy
            )
        elif self.stages:
            ids = self._rerank_rows(ids, scores, users, k)
        ids = ids[:, :k]
        if ids.shape[1] < k:
            ids = np.pad(ids, ((0, 0), (0, k - ids.shape[1])), constant_values=-1)
        short = np.flatnonzero((ids[:, -1] < 0) & ~final)  # backfill, as rank does
        for row in short:
            found = ids[row][ids[row] >= 0]
            row_blocked = blocked.indices[blocked.indptr[row] : blocked.indptr[row + 1]]
            extra, _ = self._popular(
                k - len(found), mask, np.concatenate([row_blocked, found]), trending=False
            )
            ids[row, len(found) : len(found) + len(extra)] = extra
        assert ids.shape == (n_rows, k)
        return ids

    def _blocked_rows(
        self,
        users: np.ndarray,
        known: np.ndarray,
        history: sp.csr_matrix | None,
        exclude: sp.csr_matrix | None,
        include_seen: bool,
    ) -> sp.csr_matrix:
        """Per user, the items :meth:`_blocked` would block for the same request."""
        n_rows = len(users)
        parts = []
        if exclude is not None:
            parts.append(_binary(exclude, n_rows, self.n_items, "exclude"))
        if not include_seen:
            rows = np.where(known, users, 0)
            seen = self._seen[rows]
            seen = sp.csr_matrix(sp.diags(known.astype(np.float32)) @ seen)
            parts.append(_binary(seen, n_rows, self.n_items, "seen"))
            if history is not None:
                parts.append(
                    sp.diags(1.0 - known) @ _binary(history, n_rows, self.n_items, "history")
                )
        blocked = sum(parts[1:], parts[0]) if parts else sp.csr_matrix((n_rows, self.n_items))
        blocked = sp.csr_matrix(blocked, dtype=np.float32)
        blocked.eliminate_zeros()
        blocked.sort_indices()
        return blocked

    def _search_users(
        self,
        users: np.ndarray,
        known: np.ndarray,
        history: sp.csr_matrix | None,
        blocked: sp.csr_matrix,
        mask: np.ndarray,
        n: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each user's exact search of the index, with the vector :meth:`rank` would use."""
        vectors, index = self._vectors, self._index
        assert vectors is not None and index is not None
        n_rows = len(users)
        matrix = np.zeros((n_rows, vectors.item_factors.shape[1]), dtype=np.float32)
        if known.any():
            matrix[known] = vectors.user_vectors(users[known])
        if not known.all():
            assert history is not None  # rank_users checked it
            matrix[~known] = vectors.history_vectors(sp.csr_matrix(history)[~known])
        disallowed = None
        if not mask.all():
            disallowed = ~mask[index.order]
        queries = [
            Query(
                matrix[row],
                n,
                index.positions(blocked.indices[blocked.indptr[row] : blocked.indptr[row + 1]]),
                disallowed,
            )
            for row in range(n_rows)
        ]
        ids = np.full((n_rows, n), -1, dtype=np.int64)
        scores = np.full((n_rows, n), NEG_INF, dtype=np.float32)
        for row, hits in enumerate(index.search(queries)):
            ids[row, : len(hits.ids)] = hits.ids
            scores[row, : len(hits.ids)] = hits.scores
        return ids, scores

    def _score_users(
        self, users: np.ndarray, known: np.ndarray, history: sp.csr_matrix | None
    ) -> np.ndarray:
        """Dense scores of every user, computed as :meth:`_scores` computes one user's."""
        if known.all():
            return self.model.score_users(users, self._seen[users])
        assert history is not None  # rank_users checked it
        history = sp.csr_matrix(history, dtype=np.float32)
        scores = np.empty((len(users), self.n_items), dtype=np.float32)
        if known.any():
            scores[known] = self.model.score_users(users[known], self._seen[users[known]])
        scores[~known] = self.model.score_history(history[~known])
        return scores

    def _rerank_rows(
        self, ids: np.ndarray, scores: np.ndarray, users: np.ndarray, k: int
    ) -> np.ndarray:
        out = np.full((len(ids), k), -1, dtype=np.int64)
        for row in range(len(ids)):
            keep = ids[row] >= 0
            request = ListRequest(ListKind.USER, k, user=int(users[row]))
            stages = self._stages_for(request)
            if not stages:
                got = ids[row][keep][:k]
            else:
                got, _, _ = self._rerank(ids[row][keep], scores[row][keep], request, stages)
            out[row, : len(got)] = got
        return out

    def _rerank_rule_rows(
        self,
        ids: np.ndarray,
        scores: np.ndarray,
        users: np.ndarray,
        k: int,
        rules: Rules | None,
        blocked: sp.csr_matrix,
        history: sp.csr_matrix | None,
        item_filter: ItemFilter,
        allowed: np.ndarray | None,
        strategy: Strategy | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_rerank_rows` for rows ranked with ``rules`` (or a ``strategy``): each row's
        request carries what :meth:`rank` would know of it (its blocked items, its history to
        fold in), so stages that look beyond the candidates find the same items. Also returns
        the rows whose stages made the whole list (no backfill after them)."""
        out = np.full((len(ids), k), -1, dtype=np.int64)
        final = np.zeros(len(ids), dtype=bool)
        outside = _NO_ITEMS if allowed is None else np.flatnonzero(~allowed)
        rows_of = sp.csr_matrix(history) if history is not None else None
        for row in range(len(ids)):
            user = int(users[row])
            row_blocked = blocked.indices[blocked.indptr[row] : blocked.indptr[row + 1]]
            recent = _NO_ITEMS
            if user == MISSING and rows_of is not None:
                recent = rows_of.indices[rows_of.indptr[row] : rows_of.indptr[row + 1]]
                recent = np.asarray(recent, dtype=np.int64)
            request = ListRequest(
                ListKind.USER,
                k,
                user=user,
                recent=recent,
                exclude=np.concatenate([row_blocked.astype(np.int64), outside]),
                item_filter=item_filter,
                include_seen=True,  # the seen items are in the row's blocked items already
                rules=rules,
                strategy=strategy,
            )
            keep = ids[row] >= 0
            row_ids, row_scores = ids[row][keep], scores[row][keep]
            stages = self._stages_for(request)
            if not stages:
                got = row_ids[:k]
            else:
                final[row] = _orders(stages)
                got, _, _ = self._rerank(row_ids, row_scores, request, stages)
            out[row, : len(got)] = got
        return out, final

    # ---------------------------------------------------------- external ids
    def vocabularies(self) -> tuple[Vocabulary, Vocabulary]:
        """The user and item id maps of :meth:`recommend` and friends."""
        if self.users is None or self.items is None:
            raise NotReadyError("this pipeline has no id maps; rank model indices instead")
        return self.users, self.items

    def _known_items(self, item_ids: Sequence[str]) -> np.ndarray:
        idx = self.vocabularies()[1].lookup(item_ids)
        return idx[idx != MISSING]

    def _decode(self, ranked: Ranked) -> Recommendations:
        items = self.vocabularies()[1]
        # float32 tolist() gives Python floats of the same values, without a float64 copy.
        scores = np.asarray(ranked.scores, dtype=np.float32).tolist()
        return Recommendations(
            items.decode(ranked.ids), scores, ranked.source, ranked.ids, ranked.reasons
        )

    def recommend(
        self,
        user_id: str,
        k: int,
        *,
        recent_item_ids: Sequence[str] = (),
        exclude_item_ids: Sequence[str] = (),
        item_filter: ItemFilter = NO_FILTER,
        include_seen: bool = False,
        disliked_item_ids: Sequence[str] = (),
        as_unknown: bool = False,
        rules: Rules | None = None,
        strategy: Strategy | None = None,
    ) -> Recommendations:
        """Personalized top ``k`` for ``user_id``, with fold-in and popular fallbacks.

        ``disliked_item_ids`` are never returned (see :class:`DislikeStage` for their
        neighbours); ``as_unknown`` ranks as if the model had never seen the user (an erased
        user whose row the model still holds): only ``recent_item_ids`` personalize it.
        ``rules`` are the list's ranking rules (:mod:`models.rules`); an exploration draws for
        ``user_id`` (its :func:`external_user_key`), known to the model or not. ``strategy``:
        the user's lifecycle-stage strategy (:mod:`models.strategies`; None: plain ranking).
        """
        users, _ = self.vocabularies()
        if rules is not None and rules.exploration is not None:
            rules = rules.for_user(external_user_key(user_id))
        request = ListRequest(
            ListKind.USER,
            k,
            user=MISSING if as_unknown else users.get(user_id),
            recent=self._known_items(recent_item_ids) if recent_item_ids else _NO_ITEMS,
            exclude=self._known_items(exclude_item_ids) if exclude_item_ids else _NO_ITEMS,
            item_filter=item_filter,
            include_seen=include_seen,
            disliked=self._known_items(disliked_item_ids) if disliked_item_ids else _NO_ITEMS,
            rules=rules,
            strategy=strategy,
        )
        return self._decode(self.rank(request))

    def similar_items(
        self,
        item_ids: Sequence[str],
        k: int,
        *,
        exclude_item_ids: Sequence[str] = (),
        item_filter: ItemFilter = NO_FILTER,
        rules: Rules | None = None,
    ) -> Recommendations:
        """Items most similar to all of ``item_ids`` ("more like this"); never the query items.
        ``rules``: the list's ranking rules (:mod:`models.rules`), diversity above all."""
        if k <= 0:
            raise InvalidInputError(f"k must be positive, got {k}", field="k")
        if not item_ids:
            raise InvalidInputError("item_ids must hold at least one item id", field="item_ids")
        _, items = self.vocabularies()
        query = items.lookup(item_ids)
        unknown = [i for i, q in zip(item_ids, query, strict=True) if q == MISSING]
        if unknown:
            raise NotFoundError(f"unknown item id(s): {', '.join(map(repr, unknown[:5]))}")
        request = ListRequest(
            ListKind.SIMILAR,
            k,
            items=query,
            exclude=self._known_items(exclude_item_ids) if exclude_item_ids else _NO_ITEMS,
            item_filter=item_filter,
            rules=rules,
        )
        return self._decode(self.rank(request))

    def popular(
        self,
        k: int,
        *,
        item_filter: ItemFilter = NO_FILTER,
        exclude_item_ids: Sequence[str] = (),
        trending: bool = False,
        rules: Rules | None = None,
    ) -> Recommendations:
        """Most popular (or trending) available items within the filter, under ``rules``."""
        request = ListRequest(
            ListKind.TRENDING if trending else ListKind.POPULAR,
            k,
            exclude=self._known_items(exclude_item_ids) if exclude_item_ids else _NO_ITEMS,
            item_filter=item_filter,
            rules=rules,
        )
        return self._decode(self.rank(request))


def external_user_key(user_id: str) -> int:
    """A stable number (63 bits) for an external user id, the same in every process and model
    version: what an exploration draws with (see :class:`models.rules.Exploration`)."""
    digest = hashlib.blake2b(user_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` is ``b``, or a view of all of it (``np.asarray`` with a dtype may wrap an
    array in such a view)."""
    return a is b or (a.base is b and a.shape == b.shape and a.strides == b.strides)


def _orders(stages: Sequence[RerankStage]) -> bool:
    """Whether any of ``stages`` sets the order of the list itself (see :class:`RerankStage`)."""
    return any(getattr(s, "orders", False) for s in stages)


def _by_score(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` of ``ids`` by the top-k rule (score, then lowest item index)."""
    return by_score(np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float32), k)


# ------------------------------------------------------------ batch helpers
def _binary(
    matrix: sp.spmatrix | sp.sparray, n_rows: int, n_items: int, name: str
) -> sp.csr_matrix:
    matrix = sp.csr_matrix(matrix, dtype=np.float32)
    if matrix.shape != (n_rows, n_items):
        raise InvalidInputError(
            f"{name} has shape {matrix.shape}, expected one row per user: {(n_rows, n_items)}",
            field=name,
        )
    ones = np.ones(len(matrix.indices), dtype=np.float32)
    return sp.csr_matrix((ones, matrix.indices, matrix.indptr), shape=matrix.shape)


def _masked_best(
    raw: np.ndarray, blocked: sp.csr_matrix, mask: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Filters and exact top ``n`` of a batch of dense score rows, as :meth:`_best` per row.

    A score block the model has just computed (float32, owning its memory) is masked in place;
    anything else (a broadcast view, another dtype) is copied first.
    """
    fresh = (
        isinstance(raw, np.ndarray)
        and raw.dtype == np.float32
        and raw.base is None
        and raw.flags.writeable
        and raw.flags.c_contiguous
    )
    scores = raw if fresh else np.array(raw, dtype=np.float32, copy=True)
    scores[~np.isfinite(scores)] = NEG_INF
    if not mask.all():
        scores[:, ~mask] = NEG_INF
    if blocked.nnz:
        coo = blocked.tocoo()
        scores[coo.row, coo.col] = NEG_INF
    ids = top_k_ids(scores, n)
    return ids, np.where(ids >= 0, np.take_along_axis(scores, np.maximum(ids, 0), axis=1), NEG_INF)


def _scores_of(row: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.where(ids >= 0, np.asarray(row, dtype=np.float32)[np.maximum(ids, 0)], NEG_INF)


def _shared_ranking_ids(
    row: np.ndarray, blocked: sp.csr_matrix, mask: np.ndarray, k: int
) -> np.ndarray:
    """:func:`_masked_best`'s ids for a model that gives every user the same scores ``row``.

    Each user's top ``k`` are the first ``k`` items of one shared ranking that the user may
    get, so only the best ``k + (most blocked items of a user)`` items are ranked, once,
    instead of a full row per user.
    """
    n_users, n_items = blocked.shape
    if n_users == 0:
        return np.empty((0, k), np.int64)
    scores = np.where(np.isfinite(row) & mask, row, NEG_INF).astype(np.float32)
    per_user = np.diff(blocked.indptr)
    m = int(min(n_items, k + per_user.max()))
    ranking = top_k_ids(scores[None, :], m)[0]  # best first, -1 past the finite scores
    position = np.full(n_items, -1, dtype=np.int64)
    ranked = ranking >= 0
    position[ranking[ranked]] = np.flatnonzero(ranked)
    taken = np.zeros((n_users, m), dtype=bool)
    coo = blocked.tocoo()
    at = position[coo.col]
    hit = at >= 0
    taken[coo.row[hit], at[hit]] = True
    taken[:, ~ranked] = True
    width = min(k, m)
    # Stable: the untaken positions come first, in ranking order.
    first = np.argsort(taken, axis=1, kind="stable")[:, :width]
    ids = np.where(np.take_along_axis(taken, first, axis=1), -1, ranking[first])
    if width < k:
        ids = np.pad(ids, ((0, 0), (0, k - width)), constant_values=-1)
    return ids.astype(np.int64)
