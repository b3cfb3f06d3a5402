"""Audiences: the users most likely to engage with some items, scored against those items.

The reverse of a recommendation list: one row of item scores per user becomes one column of user
scores per item set. A user's score for a set is the mean of their scores for its items, which
every model gives without scoring the catalog:

- factor models (:class:`~models.scoring.VectorScorer`: ALS, BPR, LMF) score
  ``user_vector · mean(item_vectors)``, one float32 matrix-vector product over the user
  factors, in chunks so the memory a request takes stays small;
- item x item models (EASE and GF-CF's dense form, item-KNN) score
  ``seen_row · mean(weights[:, items])``: the user's interactions times the columns of the
  target items, one sparse matrix-vector product;
- other scorers (GF-CF's factored form) score the catalog for a chunk of users at a time and
  keep the target items' columns: exact, but it costs the whole catalog per user;
- popularity (a :class:`~models.scoring.SharedScorer`) gives every user the same scores, so it
  cannot tell users apart: its audiences rank users by activity (their number of distinct items
  in the model's data), the "most active users" a campaign would pick without a model.

Users are then ranked by the rule of :mod:`models.topk` (best score first, equal scores by lower
user index) among the candidates a mask allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .errors import InvalidInputError
from .scoring import Scorer, SharedScorer, VectorScorer
from .topk import NEG_INF, top_k_row

USER_CHUNK = 65_536
"""Users scored per step: bounds the temporary vectors (16 MB at 64 factors)."""
CATALOG_CHUNK_CELLS = 16_000_000
"""For scorers of the whole catalog: users x items scored per step (64 MB of float32)."""

BASIS_FACTORS = "factors"
BASIS_ITEM_WEIGHTS = "item_weights"
BASIS_CATALOG = "catalog_scores"
BASIS_ACTIVITY = "activity"


@dataclass(frozen=True)
class AudienceScores:
    """One score per user of the model (row order of its seen matrix) and how they were made."""

    scores: np.ndarray
    """Float32, ``(n_users,)``; higher: more likely to engage."""
    basis: str
    """``factors``, ``item_weights``, ``catalog_scores`` or ``activity`` (see the module)."""


def category_items(category: np.ndarray, available: np.ndarray, name: str) -> np.ndarray:
    """Indices of every available item of category ``name`` (ascending).

    Raises :class:`InvalidInputError` (field ``category``) when no item has it, or none of its
    items is available."""
    if not name:
        raise InvalidInputError("category must not be empty", field="category")
    of_category = np.asarray(category) == name
    if not of_category.any():
        raise InvalidInputError(f"unknown category {name!r}", field="category")
    items = np.flatnonzero(of_category & np.asarray(available, dtype=bool))
    if not len(items):
        raise InvalidInputError(f"category {name!r} has no available item", field="category")
    return items


def _checked_items(items: Sequence[int] | np.ndarray, n_items: int) -> np.ndarray:
    idx = np.unique(np.asarray(items, dtype=np.int64))
    if not len(idx):
        raise InvalidInputError("an audience needs at least one item", field="item_ids")
    if idx[0] < 0 or idx[-1] >= n_items:
        raise InvalidInputError(
            f"item indices must lie in [0, {n_items}), got {idx[0]}..{idx[-1]}", field="item_ids"
        )
    return idx


def score_users(
    model: Scorer,
    seen: sp.csr_matrix,
    items: Sequence[int] | np.ndarray,
    *,
    chunk: int = USER_CHUNK,
) -> AudienceScores:
    """Every user's (every row of ``seen``) mean score for ``items`` (model indices)."""
    n_users = int(seen.shape[0])
    idx = _checked_items(items, int(model.n_items))
    if isinstance(model, SharedScorer):
        activity = np.diff(sp.csr_matrix(seen).indptr).astype(np.float32)
        return AudienceScores(activity, BASIS_ACTIVITY)
    if isinstance(model, VectorScorer):
        return AudienceScores(_factor_scores(model, idx, n_users, chunk), BASIS_FACTORS)
    weights = _item_columns(model, idx)
    if weights is not None:
        rows = _model_input(model, seen)
        scores = np.asarray(rows @ weights, dtype=np.float32).ravel()
        return AudienceScores(scores, BASIS_ITEM_WEIGHTS)
    return AudienceScores(_catalog_scores(model, seen, idx), BASIS_CATALOG)


def _factor_scores(model: VectorScorer, items: np.ndarray, n_users: int, chunk: int) -> np.ndarray:
    target = np.asarray(model.item_factors[items], dtype=np.float32).mean(axis=0)
    target = np.ascontiguousarray(target, dtype=np.float32)
    out = np.empty(n_users, dtype=np.float32)
    factors = getattr(model, "user_factors", None)
    if isinstance(factors, np.ndarray) and factors.dtype == np.float32 and len(factors) >= n_users:
        # The user factors themselves, sliced (views): no copy of a million rows.
        for start in range(0, n_users, chunk):
            stop = min(start + chunk, n_users)
            np.dot(factors[start:stop], target, out=out[start:stop])
        return out
    for start in range(0, n_users, chunk):
        stop = min(start + chunk, n_users)
        vectors = np.asarray(model.user_vectors(np.arange(start, stop)), dtype=np.float32)
        out[start:stop] = vectors @ target
    return out


def _item_columns(model: Scorer, items: np.ndarray) -> np.ndarray | None:
    """The mean of the target items' columns of an item x item model's weights (what one
    interaction with each item adds to the targets' scores), or ``None`` for other models."""
    from .item_matrix import ItemMatrixModel
    from .neighbors import ItemKNN

    if isinstance(model, ItemMatrixModel) and getattr(model, "weights", None) is not None:
        weights = model.weights
        return np.asarray(weights[:, items], dtype=np.float32).mean(axis=1)
    if isinstance(model, ItemKNN):
        columns = model.similarity[:, items]
        return np.asarray(columns.mean(axis=1), dtype=np.float32).ravel()
    return None


def _model_input(model: Scorer, seen: sp.csr_matrix) -> sp.csr_matrix:
    """``seen`` as the model scores it (EASE and GF-CF binarize their input by default)."""
    from .item_matrix import ItemMatrixModel

    if isinstance(model, ItemMatrixModel):
        return model._input(seen)  # the same transform its own scoring applies
    return sp.csr_matrix(seen, dtype=np.float32)


def _catalog_scores(model: Scorer, seen: sp.csr_matrix, items: np.ndarray) -> np.ndarray:
    seen = sp.csr_matrix(seen)
    n_users = int(seen.shape[0])
    step = max(1, CATALOG_CHUNK_CELLS // max(1, int(model.n_items)))
    out = np.empty(n_users, dtype=np.float32)
    for start in range(0, n_users, step):
        stop = min(start + step, n_users)
        block = model.score_users(np.arange(start, stop), seen[start:stop])
        out[start:stop] = np.asarray(block[:, items], dtype=np.float32).mean(axis=1)
    return out


def interacted(seen: sp.csr_matrix, items: Sequence[int] | np.ndarray) -> np.ndarray:
    """Whether each user (row of ``seen``) has an interaction with any of ``items``."""
    seen = sp.csr_matrix(seen)
    columns = np.zeros(int(seen.shape[1]), dtype=bool)
    columns[np.asarray(items, dtype=np.int64)] = True
    hit = columns[seen.indices] & (seen.data != 0)
    rows = np.repeat(np.arange(seen.shape[0]), np.diff(seen.indptr))
    out = np.zeros(int(seen.shape[0]), dtype=bool)
    out[rows[hit]] = True
    return out


def top_users(
    scores: np.ndarray, n: int, candidates: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``n`` users among ``candidates`` (a boolean mask; default all), best first,
    equal scores by lower index (:mod:`models.topk`'s rule), and their scores.

    Fewer than ``n`` when fewer users are candidates; a NaN score never enters.
    """
    if n <= 0:
        raise InvalidInputError(f"an audience needs at least one user, got {n}", field="max_users")
    row = np.array(scores, dtype=np.float32, copy=True)
    row[np.isnan(row)] = NEG_INF
    if candidates is not None:
        mask = np.asarray(candidates, dtype=bool)
        if mask.shape != row.shape:
            raise InvalidInputError(
                f"the candidate mask covers {mask.shape[0]} users, the scores {row.shape[0]}"
            )
        row[~mask] = NEG_INF
    ids, best = top_k_row(row, min(n, len(row)))
    found = ids >= 0
    return ids[found], best[found]
