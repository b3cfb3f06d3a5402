"""Answer recommendation questions in external ids, on top of one loaded :class:`ModelBundle`.

This is the data plane shared by the gRPC servicer and offline ``batch-recommend``: it resolves
ids, builds the candidate set (availability, item-type and category filters, exclusions, seen
items), picks personalized, fold-in or popular scoring, and backfills from popular items when the
filters starve the personalized list. Filter masks are computed once per model and cached, never
per request.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import scipy.sparse as sp

from models.artifact import ITEM_TYPES, ModelBundle
from models.base import NEG_INF, topk
from models.errors import InvalidInputError, NotFoundError
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


class Engine:
    """Immutable, thread-safe query interface over one model bundle."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle
        self.model = bundle.model
        self.n_items = len(bundle.items)
        cat = bundle.catalog
        self._available = np.asarray(cat.available, dtype=bool)
        self._type_masks = {t: np.asarray(cat.item_type == t) for t in np.unique(cat.item_type)}
        self._category_masks = {c: np.asarray(cat.category == c) for c in np.unique(cat.category)}
        # Popular / trending rankings restricted to available items, computed once.
        self._popular_order = self._order(bundle.popularity)
        self._trending_order = self._order(bundle.trending)
        seen = bundle.seen
        self._seen = sp.csr_matrix(seen, dtype=np.float32)
        # Weight given to a fresh interaction in fold-in: a typical confidence of the training data.
        self._recent_weight = float(np.median(seen.data)) if seen.nnz else 1.0
        self.candidate_mask = lru_cache(maxsize=256)(self._candidate_mask)

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
        uidx = self.bundle.users.lookup([user_id])[0]
        recent = self._known_items(recent_item_ids)
        excluded = self._known_items(exclude_item_ids)
        blocked = [excluded]
        if uidx != MISSING:
            seen_row = self._seen[uidx]
            if not include_seen:
                blocked.append(seen_row.indices)
            if len(recent):
                history = seen_row + self._history_row(recent)
                scores = self.model.score_history(history)[0]
            else:
                scores = self.model.score_users(np.array([uidx]), seen_row)[0]
            source = Source.PERSONALIZED
        elif len(recent):
            scores = self.model.score_history(self._history_row(recent))[0]
            source = Source.FOLD_IN
        else:
            return self._popular(k, mask, np.concatenate(blocked), trending=False)
        if len(recent) and not include_seen:
            blocked.append(recent)
        return self._rank(scores, k, mask, np.concatenate(blocked), source)

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
        mask = self.candidate_mask(item_filter)
        sims = self.model.score_similar(query)
        scores = np.asarray(sims, dtype=np.float32).sum(axis=0) / len(query)
        blocked = np.concatenate([query, self._known_items(exclude_item_ids)])
        return self._rank(scores, k, mask, blocked, Source.PERSONALIZED)

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
        self, scores: np.ndarray, k: int, mask: np.ndarray, blocked: np.ndarray, source: Source
    ) -> Recommendations:
        scores = np.asarray(scores, dtype=np.float32)
        scores = np.where(mask & np.isfinite(scores), scores, NEG_INF)
        if len(blocked):
            scores[blocked] = NEG_INF
        ids, top = topk(scores[None, :], k)
        keep = ids[0] >= 0
        ids, top = ids[0][keep], top[0][keep]
        if len(ids) < k:  # filters starved the list: backfill from popular items
            extra = self._popular(
                k - len(ids), mask, np.concatenate([blocked, ids]), trending=False
            )
            ids = np.concatenate([ids, extra.indices])
            top = np.concatenate([top, np.asarray(extra.scores, dtype=np.float32)])
        return Recommendations(
            self.bundle.items.decode(ids), top.astype(float).tolist(), source, ids
        )

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
