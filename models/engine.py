"""Answer recommendation questions in external ids, on top of one loaded :class:`ModelBundle`.

This is the data plane shared by the gRPC servicer and offline ``batch-recommend``: it resolves
ids, builds the candidate set (availability, item-type and category filters, exclusions, seen
items), picks personalized, fold-in or popular scoring, and backfills from popular items when the
filters starve the personalized list. Filter masks are computed once per model and cached, never
per request.

For factor models a request never scores the whole catalog: :class:`models.search.NormOrderedIndex`
finds the exact top k by scanning items in decreasing-norm order until no unscored item can beat
the k-th best score, in one compiled call (:mod:`models.kernels`). "More like this" cannot prune
(every unit vector has norm 1), so concurrent similar-items requests are batched instead: a request
that finds another one searching waits and is searched in the next batch together with every
request that queued meanwhile (:class:`ScoreBatcher`), so a lone request pays no delay and a busy
server reads the item factors once per batch instead of once per request. Models without factors
score every item; their top-k scans block maxima first (:func:`top_k_row`), which returns exactly
what a full partition would.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from weakref import WeakMethod

import numpy as np
import scipy.sparse as sp

from models.artifact import ITEM_TYPES, ModelBundle
from models.base import NEG_INF
from models.errors import InvalidInputError, NotFoundError
from models.kernels import warm_up
from models.search import Hits, NormOrderedIndex, Query, top_k_row
from models.vocabulary import MISSING


class Source(enum.StrEnum):
    """Where a recommendation list came from."""

    PERSONALIZED = "personalized"
    FOLD_IN = "fold_in"
    POPULAR = "popular"


@dataclass(frozen=True)
class ItemFilter:
    """Restrict candidates to these item types and categories (empty means no restriction)."""

    item_types: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()

    @classmethod
    def of(cls, item_types: Sequence[str] = (), categories: Sequence[str] = ()) -> ItemFilter:
        return cls(tuple(sorted(set(item_types))), tuple(sorted(set(categories))))


@dataclass
class Recommendations:
    """A ranked list in external ids, best first."""

    item_ids: list[str]
    scores: list[float]
    source: Source
    indices: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0, np.int64))

    def __len__(self) -> int:
        return len(self.item_ids)


MAX_BATCH = 64
"""Most requests searched together (bounds the score block a batch allocates)."""


class _Slot:
    __slots__ = ("done", "error", "lead", "request", "result")

    def __init__(self, request: Any) -> None:
        self.request = request
        # A lock taken at birth: a waiting thread blocks on acquire() until the leader releases
        # it, the cheapest wake-up Python has (an Event goes through a Condition and its locks).
        self.done = threading.Lock()
        self.done.acquire()
        self.lead = False
        self.result: Any = None
        self.error: BaseException | None = None


class ScoreBatcher:
    """Serves concurrent single requests together, with no added delay for a lone one.

    The first request to arrive computes at once; requests arriving while a batch is computing
    queue up, and when it finishes the oldest waiting request is woken to compute everything
    queued so far in one call of ``run`` (leader/follower hand-off: results are never computed
    by a thread whose own answer is already done). ``run`` takes a list of requests and returns
    one result per request, in order.
    """

    def __init__(
        self, run: Callable[[list[Any]], Sequence[Any]], max_batch: int = MAX_BATCH
    ) -> None:
        self._run = run
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Slot] = []
        self._busy = False
        self.batches = 0
        self.scored = 0

    def __call__(self, request: Any) -> Any:
        """The result of ``run`` for this one ``request``."""
        slot = _Slot(request)
        with self._lock:
            self._queue.append(slot)
            lead = not self._busy
            self._busy = True
        if not lead:
            slot.done.acquire()
            if not slot.lead:
                return self._result(slot)
        self._run_batch(slot)
        return self._result(slot)

    @staticmethod
    def _result(slot: _Slot) -> Any:
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _run_batch(self, own: _Slot) -> None:
        with self._lock:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
        try:
            results = self._run([s.request for s in batch])
            for result, s in zip(results, batch, strict=True):
                s.result = result
        except BaseException as exc:
            for s in batch:
                s.error = exc
        self.batches += 1
        self.scored += len(batch)
        with self._lock:
            if self._queue:
                nxt = self._queue[0]
                nxt.lead = True  # it takes over the queue (itself included) when woken
                nxt.done.release()
            else:
                self._busy = False
        for s in batch:
            if s is not own:
                s.done.release()


_NO_ITEMS = np.empty(0, dtype=np.int64)


def _cached(method: Callable[..., Any], maxsize: int = 256) -> Callable[..., Any]:
    """``lru_cache`` of a bound method that holds its instance weakly.

    ``lru_cache(self.method)`` stored on ``self`` is a reference cycle, so a swapped-out engine
    (hundreds of MB) would wait for a full garbage collection instead of being freed at once.
    """
    ref = WeakMethod(method)

    @lru_cache(maxsize=maxsize)
    def call(*args: Any) -> Any:
        bound = ref()
        if bound is None:  # pragma: no cover - the engine is gone, nobody can call us
            raise ReferenceError("engine was garbage collected")
        return bound(*args)

    return call


class Engine:
    """Immutable, thread-safe query interface over one model bundle."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle
        self.model = bundle.model
        self.n_items = len(bundle.items)
        # Factor models expose user vectors: requests are searched in a norm-ordered index of the
        # item factors. Other models score every item for one request.
        model = self.model
        self._user_vectors: Callable[[np.ndarray], np.ndarray] | None = None
        self._user_vector: Callable[[int], np.ndarray] | None = None
        self._history_vectors: Callable[[sp.csr_matrix], np.ndarray] | None = None
        self._fold_in_items: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
        self._index: NormOrderedIndex | None = None
        item_factors = getattr(model, "item_factors", None)
        if (
            item_factors is not None
            and hasattr(model, "user_vectors")
            and hasattr(model, "history_vectors")
        ):
            self._user_vectors = model.user_vectors
            self._user_vector = getattr(model, "user_vector", None)
            self._history_vectors = model.history_vectors
            self._fold_in_items = getattr(model, "fold_in_items", None)
            self._index = NormOrderedIndex(item_factors)
            warm_up()  # compiled before the engine serves (from numba's disk cache after once)
        # "More like this" on factor models: cosine similarity, i.e. the dot product of unit
        # vectors. Their norms are all 1, so nothing can be pruned, but concurrent requests still
        # share one pass over the catalog.
        self._similar_index: NormOrderedIndex | None = None
        self._similar_batcher: ScoreBatcher | None = None
        unit_vectors = getattr(model, "item_unit_vectors", None)
        if self._index is not None and unit_vectors is not None:
            self._similar_index = NormOrderedIndex(unit_vectors(), first_block=self.n_items)
            self._similar_batcher = ScoreBatcher(self._similar_index.search)
        cat = bundle.catalog
        self._available = np.asarray(cat.available, dtype=bool)
        self._type_masks = {t: np.asarray(cat.item_type == t) for t in np.unique(cat.item_type)}
        self._category_masks = {c: np.asarray(cat.category == c) for c in np.unique(cat.category)}
        # Popular / trending rankings restricted to available items, computed once.
        self._popular_order = self._order(bundle.popularity)
        self._trending_order = self._order(bundle.trending)
        seen = bundle.seen
        self._seen = seen if seen.dtype == np.float32 else sp.csr_matrix(seen, dtype=np.float32)
        # Weight given to a fresh interaction in fold-in: a typical confidence of the training data.
        self._recent_weight = float(np.median(seen.data)) if seen.nnz else 1.0
        self.candidate_mask = _cached(self._candidate_mask)
        self._masked_out = _cached(self._masked_out_items)
        self._disallowed = _cached(self._disallowed_positions)

    @property
    def item_types(self) -> list[str]:
        return sorted(t for t in self._type_masks if t)

    @property
    def categories(self) -> list[str]:
        return sorted(c for c in self._category_masks if c)

    def _order(self, scores: np.ndarray) -> np.ndarray:
        order = np.lexsort((np.arange(self.n_items), -np.asarray(scores, dtype=np.float64)))
        return order[self._available[order]]

    # ----------------------------------------------------------------- filters
    def _candidate_mask(self, flt: ItemFilter) -> np.ndarray:
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

    def _masked_out_items(self, flt: ItemFilter) -> np.ndarray:
        """Indices the filter removes: usually few, so setting them beats a full ``where``."""
        out = np.flatnonzero(~self.candidate_mask(flt))
        out.setflags(write=False)
        return out

    def _disallowed_positions(self, flt: ItemFilter, similar: bool = False) -> np.ndarray | None:
        """The filter's excluded items as a mask over the positions of the recommendation (or,
        with ``similar``, the similar-items) index; None when it excludes nothing."""
        index = self._similar_index if similar else self._index
        assert index is not None
        out = ~self.candidate_mask(flt)
        if not out.any():
            return None
        disallowed = out[index.order]
        disallowed.setflags(write=False)
        return disallowed

    def _known_items(self, item_ids: Sequence[str]) -> np.ndarray:
        idx = self.bundle.items.lookup(item_ids)
        return idx[idx != MISSING]

    # ----------------------------------------------------------------- queries
    def recommend(
        self,
        user_id: str,
        k: int,
        *,
        recent_item_ids: Sequence[str] = (),
        exclude_item_ids: Sequence[str] = (),
        item_filter: ItemFilter = ItemFilter(),
        include_seen: bool = False,
    ) -> Recommendations:
        """Personalized top ``k`` for ``user_id``, with fold-in and popular fallbacks."""
        self._check_k(k)
        mask = self.candidate_mask(item_filter)
        uidx = self.bundle.users.get(user_id)
        recent = self._known_items(recent_item_ids) if recent_item_ids else _NO_ITEMS
        excluded = self._known_items(exclude_item_ids) if exclude_item_ids else _NO_ITEMS
        parts = [excluded] if len(excluded) else []
        if uidx != MISSING:
            if not include_seen:
                indptr = self._seen.indptr
                parts.append(self._seen.indices[indptr[uidx] : indptr[uidx + 1]])
            source = Source.PERSONALIZED
        elif len(recent):
            source = Source.FOLD_IN
        else:
            return self._popular(k, mask, excluded, trending=False)
        if len(recent) and not include_seen:
            parts.append(recent)
        blocked = parts[0] if len(parts) == 1 else np.concatenate(parts or [_NO_ITEMS])
        if self._index is not None:
            query = Query(
                self._vector(int(uidx), recent),
                k,
                self._index.positions(blocked),
                self._disallowed(item_filter),
            )
            # One compiled call that keeps the GIL: no batching, which would only add hand-offs
            # between threads for a search this short.
            hits = self._index.search([query])[0]
            return self._finish(hits.ids, hits.scores, k, mask, blocked, source)
        return self._rank(self._scores(int(uidx), recent), k, item_filter, blocked, source)

    def _vector(self, uidx: int, recent: np.ndarray) -> np.ndarray:
        """A factor model's vector for the user (``uidx`` MISSING: known only by ``recent``)."""
        assert self._user_vectors is not None and self._history_vectors is not None
        if uidx != MISSING:
            if not len(recent):
                if self._user_vector is not None:
                    return self._user_vector(uidx)
                return self._user_vectors(np.array([uidx]))[0]
            return self._history_vectors(self._seen[uidx] + self._history_row(recent))[0]
        if self._fold_in_items is not None:
            # Duplicates add up, as in a CSR row; no sparse matrix is built for one request.
            items, counts = np.unique(recent, return_counts=True)
            return self._fold_in_items(items, counts * np.float32(self._recent_weight))
        return self._history_vectors(self._history_row(recent))[0]

    def _scores(self, uidx: int, recent: np.ndarray) -> np.ndarray:
        """Every item's score for a model without factors (a private float32 row)."""
        if uidx != MISSING and not len(recent):
            row = self._seen[uidx]
            return np.array(self.model.score_users(np.array([uidx]), row)[0], dtype=np.float32)
        history = self._history_row(recent)
        if uidx != MISSING:
            history = self._seen[uidx] + history
        return np.array(self.model.score_history(history)[0], dtype=np.float32)

    def similar_items(
        self,
        item_ids: Sequence[str],
        k: int,
        *,
        exclude_item_ids: Sequence[str] = (),
        item_filter: ItemFilter = ItemFilter(),
    ) -> Recommendations:
        """Items most similar to all of ``item_ids`` ("more like this"); never the query items."""
        self._check_k(k)
        if not item_ids:
            raise InvalidInputError("item_ids must hold at least one item id", field="item_ids")
        query = self.bundle.items.lookup(item_ids)
        unknown = [i for i, q in zip(item_ids, query, strict=True) if q == MISSING]
        if unknown:
            raise NotFoundError(f"unknown item id(s): {', '.join(map(repr, unknown[:5]))}")
        mask = self.candidate_mask(item_filter)  # validates the filter before any scoring
        blocked = np.concatenate([query, self._known_items(exclude_item_ids)])
        index, batcher = self._similar_index, self._similar_batcher
        if index is not None and batcher is not None:
            # The mean of the query items' unit vectors scores each item by its mean cosine.
            rows = index.rows(query)
            vector = rows[0] if len(rows) == 1 else rows.mean(axis=0, dtype=np.float32)
            hits: Hits = batcher(
                Query(vector, k, index.positions(blocked), self._disallowed(item_filter, True))
            )
            return self._finish(hits.ids, hits.scores, k, mask, blocked, Source.PERSONALIZED)
        sims = np.asarray(self.model.score_similar(query), dtype=np.float32)
        scores = sims[0].copy() if len(query) == 1 else sims.sum(axis=0) / len(query)
        return self._rank(scores, k, item_filter, blocked, Source.PERSONALIZED)

    def popular(
        self,
        k: int,
        *,
        item_filter: ItemFilter = ItemFilter(),
        exclude_item_ids: Sequence[str] = (),
        trending: bool = False,
    ) -> Recommendations:
        """Most popular (or trending) available items within the filter."""
        self._check_k(k)
        mask = self.candidate_mask(item_filter)
        return self._popular(k, mask, self._known_items(exclude_item_ids), trending=trending)

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _check_k(k: int) -> None:
        if k <= 0:
            raise InvalidInputError(f"k must be positive, got {k}", field="k")

    def _history_row(self, items: np.ndarray) -> sp.csr_matrix:
        data = np.full(len(items), self._recent_weight, dtype=np.float32)
        row = sp.csr_matrix(
            (data, (np.zeros(len(items), np.int64), items)), shape=(1, self.n_items)
        )
        row.sum_duplicates()
        return row

    def _rank(
        self,
        scores: np.ndarray,
        k: int,
        item_filter: ItemFilter,
        blocked: np.ndarray,
        source: Source,
    ) -> Recommendations:
        """Top ``k`` of ``scores`` (a private float32 row, overwritten) within the filter."""
        mask = self.candidate_mask(item_filter)
        # One cheap reduction instead of a full isfinite/where pass: the maximum is finite
        # unless a score is NaN (which max propagates) or +inf.
        if not np.isfinite(scores.max()):
            scores[~np.isfinite(scores)] = NEG_INF
        scores[self._masked_out(item_filter)] = NEG_INF
        if len(blocked):
            scores[blocked] = NEG_INF
        ids, top = top_k_row(scores, k)
        keep = ids >= 0
        return self._finish(ids[keep], top[keep], k, mask, blocked, source)

    def _finish(
        self,
        ids: np.ndarray,
        top: np.ndarray,
        k: int,
        mask: np.ndarray,
        blocked: np.ndarray,
        source: Source,
    ) -> Recommendations:
        """The ranked ``ids``, backfilled from popular items when filters left fewer than k."""
        if len(ids) < k:  # filters starved the list: backfill from popular items
            extra = self._popular(
                k - len(ids), mask, np.concatenate([blocked, ids]), trending=False
            )
            ids = np.concatenate([ids, extra.indices])
            top = np.concatenate([top, np.asarray(extra.scores, dtype=np.float32)])
        # float32 tolist() gives Python floats of the same values, without a float64 copy.
        return Recommendations(self.bundle.items.decode(ids), top.tolist(), source, ids)

    def _popular(
        self, k: int, mask: np.ndarray, blocked: np.ndarray, *, trending: bool
    ) -> Recommendations:
        order = self._trending_order if trending else self._popular_order
        scores = self.bundle.trending if trending else self.bundle.popularity
        ok = mask[order]
        if len(blocked):
            block = np.zeros(self.n_items, dtype=bool)
            block[blocked] = True
            ok &= ~block[order]
        ids = order[ok][:k]
        return Recommendations(
            self.bundle.items.decode(ids), scores[ids].astype(float).tolist(), Source.POPULAR, ids
        )
