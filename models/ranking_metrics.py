"""Top-k ranking metrics with binary relevance, computed for many users at once in numpy.

Input is a ``(n_users, k)`` array of recommended item indices (``-1`` pads short lists) and a CSR
matrix of each user's held-out items, rows aligned; ``docs/metrics.md`` gives every formula.
:func:`per_user_metrics` also takes, per user, a count of held-out items outside the catalog (items
unseen in training): they are relevant, so they count in ``|R|``, but no list can hold them.

Beyond accuracy: intra-list diversity (:func:`intra_list_diversity`, per list, over item vectors
or over categories), catalog coverage (:func:`catalog_coverage`, over all lists together) and
novelty (:func:`novelty`, per list, from the items' popularity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .errors import InvalidInputError

METRIC_NAMES = (
    "precision",
    "recall",
    "ndcg",
    "map",
    "mrr",
    "hit_rate",
    "diversity",
    "coverage",
    "novelty",
)
"""The averaged metrics, in report order; :func:`mean_metrics` names them ``<name>_at_<k>``."""

TARGET_METRICS = ("ndcg", "recall", "precision", "map", "mrr", "hit_rate")
"""The metrics a model can be tuned for and gated on: averages of a per-user accuracy."""


def metric_key(name: str, k: int) -> str:
    """The logged name of metric ``name`` at list length ``k``: ``ndcg`` -> ``ndcg_at_<k>``.

    ``name`` is one of :data:`TARGET_METRICS`, alone or already as ``<name>_at_<k>`` with the
    same ``k``; anything else is refused with the names that would work.
    """
    base, sep, at = name.partition("_at_")
    if base not in TARGET_METRICS or (sep and not at.isdigit()):
        raise InvalidInputError(
            f"unknown metric {name!r}; choose one of {', '.join(TARGET_METRICS)} "
            f"(measured at --k, e.g. ndcg or ndcg_at_{k})",
            field="metric",
        )
    if sep and int(at) != k:
        raise InvalidInputError(
            f"metric {name!r} is measured at k={int(at)} but lists have k={k}; "
            f"use {base} or {base}_at_{k}",
            field="metric",
        )
    return f"{base}_at_{k}"


# ------------------------------------------------------------------ inputs
def _check_recommended(recommended: np.ndarray, n_items: int | None = None) -> np.ndarray:
    rec = np.asarray(recommended)
    if rec.ndim != 2:
        raise InvalidInputError("recommended must be a 2-d (n_users, k) array of item indices")
    if rec.size and not np.issubdtype(rec.dtype, np.integer):
        raise InvalidInputError("recommended must hold integer item indices")
    rec = rec.astype(np.int64, copy=False)
    if rec.size and rec.min() < -1:
        raise InvalidInputError("recommended holds a negative index other than the -1 padding")
    if n_items is not None and rec.size and rec.max() >= n_items:
        raise InvalidInputError(f"recommended holds an item index >= the {n_items} items")
    return rec


def relevance_matrix(relevant: sp.spmatrix | sp.sparray) -> sp.csr_matrix:
    """Binary CSR form of held-out items: every stored entry with a positive value is relevant.

    Zero and negative entries (a "dislike" event, an explicit zero) are not relevant items.
    """
    rel = sp.csr_matrix(relevant, dtype=np.float64, copy=True)
    rel.sum_duplicates()
    rel.data = (rel.data > 0).astype(np.int8)
    rel.eliminate_zeros()
    return rel


def _check_pair(
    recommended: np.ndarray, relevant: sp.spmatrix | sp.sparray
) -> tuple[np.ndarray, sp.csr_matrix]:
    rel = relevance_matrix(relevant)
    rec = _check_recommended(recommended, rel.shape[1])
    if rec.shape[0] != rel.shape[0]:
        raise InvalidInputError(
            f"recommended has {rec.shape[0]} rows but relevant has {rel.shape[0]}: rows must align"
        )
    return rec, rel


def unrankable_counts(unrankable: np.ndarray | None, n_rows: int) -> np.ndarray:
    """``unrankable`` checked as one non-negative count per row, as int64 (zeros when None).

    See :func:`per_user_metrics` for what the counts mean.
    """
    if unrankable is None:
        return np.zeros(n_rows, dtype=np.int64)
    extra = np.asarray(unrankable)
    if extra.shape != (n_rows,):
        raise InvalidInputError(
            f"unrankable needs one count per row of relevant ({n_rows}), got shape {extra.shape}",
            field="unrankable",
        )
    if extra.size and not np.issubdtype(extra.dtype, np.integer):
        raise InvalidInputError("unrankable must hold integer counts", field="unrankable")
    extra = extra.astype(np.int64, copy=False)
    if extra.size and extra.min() < 0:
        raise InvalidInputError("unrankable counts must not be negative", field="unrankable")
    return extra


def _duplicates(rec: np.ndarray) -> np.ndarray:
    """Mask of entries that repeat an item already listed earlier in the same row."""
    if rec.shape[1] < 2:
        return np.zeros(rec.shape, dtype=bool)
    order = np.argsort(rec, axis=1, kind="stable")
    ordered = np.take_along_axis(rec, order, axis=1)
    repeat = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    mask = np.zeros(rec.shape, dtype=bool)
    # A stable sort keeps equal items in list order, so the flagged copy is always the later one.
    rows = np.nonzero(repeat)[0]
    mask[rows, order[:, 1:][repeat]] = True
    return mask


def hits(recommended: np.ndarray, relevant: sp.spmatrix | sp.sparray) -> np.ndarray:
    """Boolean ``(n_users, k)``: is the item at each rank one of the user's held-out items.

    Padding (``-1``) is never a hit, and an item repeated in a list counts only at its first rank.
    """
    rec, rel = _check_pair(recommended, relevant)
    return _hits(rec, rel)


def _hits(rec: np.ndarray, rel: sp.csr_matrix) -> np.ndarray:
    n_rows, n_items = rel.shape
    if rec.size == 0 or rel.nnz == 0:
        return np.zeros(rec.shape, dtype=bool)
    # Encode (row, item) as one int64 key so a single sorted search answers every lookup.
    rel_rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(rel.indptr))
    rel_keys = np.sort(rel_rows * n_items + rel.indices.astype(np.int64))
    rec_keys = np.arange(n_rows, dtype=np.int64)[:, None] * n_items + rec
    pos = np.searchsorted(rel_keys, rec_keys)
    found = rel_keys[np.minimum(pos, len(rel_keys) - 1)] == rec_keys
    return found & (rec >= 0) & ~_duplicates(rec)


def _n_relevant(rel: sp.csr_matrix) -> np.ndarray:
    return np.diff(rel.indptr).astype(np.int64)


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def _undefined_where_no_relevant(values: np.ndarray, n_rel: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64, copy=False)
    values[n_rel == 0] = np.nan
    return values


# ---------------------------------------------------------- per-user metrics
# Each returns a float64 array with one value per row, NaN for rows without held-out items (the
# metric is undefined for them and every average skips them).


def precision_at_k(recommended: np.ndarray, relevant: sp.spmatrix | sp.sparray) -> np.ndarray:
    """hits / k, where k is the list length including padding (a short list is not rewarded)."""
    rec, rel = _check_pair(recommended, relevant)
    return _precision(_hits(rec, rel), _n_relevant(rel))


def _precision(hit: np.ndarray, n_rel: np.ndarray) -> np.ndarray:
    k = hit.shape[1]
    values = hit.sum(axis=1) / k if k else np.zeros(len(hit))
    return _undefined_where_no_relevant(values, n_rel)


def recall_at_k(recommended: np.ndarray, relevant: sp.spmatrix | sp.sparray) -> np.ndarray:
    """hits / |relevant|: a user with more held-out items than k cannot reach 1."""
    rec, rel = _check_pair(recommended, relevant)
    return _recall(_hits(rec, rel), _n_relevant(rel))


def _recall(hit: np.ndarray, n_rel: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        values = hit.sum(axis=1) / n_rel
    return _undefined_where_no_relevant(values, n_rel)


def ndcg_at_k(recommended: np.ndarray, relevant: sp.spmatrix | sp.sparray) -> np.ndarray:
    """DCG / ideal DCG with binary gains and a log2(rank + 1) discount."""
    rec, rel = _check_pair(recommended, relevant)
    return _ndcg(_hits(rec, rel), _n_relevant(rel))


def _ndcg(hit: np.ndarray, n_rel: np.ndarray) -> np.ndarray:
    k = hit.shape[1]
    disc = _discounts(k)
    dcg = hit @ disc
    # ideal[m] = DCG of a list whose first m ranks are all hits; the ideal list has min(k, |rel|).
    ideal = np.concatenate([[0.0], np.cumsum(disc)])
    idcg = ideal[np.minimum(n_rel, k)]
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where(idcg > 0, dcg / np.where(idcg > 0, idcg, 1.0), 0.0)
    return _undefined_where_no_relevant(values, n_rel)


def average_precision_at_k(
    recommended: np.ndarray, relevant: sp.spmatrix | sp.sparray
) -> np.ndarray:
    """Sum of precision@i over the ranks i that are hits, divided by min(k, |relevant|)."""
    rec, rel = _check_pair(recommended, relevant)
    return _average_precision(_hits(rec, rel), _n_relevant(rel))


def _average_precision(hit: np.ndarray, n_rel: np.ndarray) -> np.ndarray:
    k = hit.shape[1]
    ranks = np.arange(1, k + 1, dtype=np.float64)
    precision_at_rank = np.cumsum(hit, axis=1) / ranks
    total = (precision_at_rank * hit).sum(axis=1)
    denom = np.minimum(n_rel, k)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where(denom > 0, total / np.maximum(denom, 1), 0.0)
    return _undefined_where_no_relevant(values, n_rel)


def reciprocal_rank_at_k(recommended: np.ndarray, relevant: sp.spmatrix | sp.sparray) -> np.ndarray:
    """1 / rank of the first hit, 0 when no hit is in the top k."""
    rec, rel = _check_pair(recommended, relevant)
    return _reciprocal_rank(_hits(rec, rel), _n_relevant(rel))


def _reciprocal_rank(hit: np.ndarray, n_rel: np.ndarray) -> np.ndarray:
    any_hit = hit.any(axis=1)
    first = np.argmax(hit, axis=1) + 1 if hit.shape[1] else np.ones(len(hit), dtype=np.int64)
    values = np.where(any_hit, 1.0 / first, 0.0)
    return _undefined_where_no_relevant(values, n_rel)


def hit_rate_at_k(recommended: np.ndarray, relevant: sp.spmatrix | sp.sparray) -> np.ndarray:
    """1 when at least one held-out item is in the top k, else 0."""
    rec, rel = _check_pair(recommended, relevant)
    return _undefined_where_no_relevant(np.asarray(_hits(rec, rel).any(axis=1)), _n_relevant(rel))


# ------------------------------------------------------- beyond accuracy
def item_popularity(user_items: sp.spmatrix | sp.sparray) -> np.ndarray:
    """Number of distinct users with a positive entry for each item (int64, one per column)."""
    rel = relevance_matrix(user_items)
    return np.bincount(rel.indices, minlength=rel.shape[1]).astype(np.int64)


def active_users(user_items: sp.spmatrix | sp.sparray) -> int:
    """Rows with at least one positive entry: the users :func:`item_popularity` counts over.

    Padding rows for users that exist only in the test period do not dilute the shares.
    """
    return int((np.diff(relevance_matrix(user_items).indptr) > 0).sum())


def _self_information(item_users: np.ndarray, n_users: int) -> np.ndarray:
    counts = np.asarray(item_users, dtype=np.float64)
    if counts.ndim != 1:
        raise InvalidInputError("item popularity must be a 1-d array with one count per item")
    if n_users <= 0:
        raise InvalidInputError("novelty needs a positive number of users")
    if counts.size and (counts.min() < 0 or counts.max() > n_users):
        raise InvalidInputError(
            f"item popularity must count users per item, between 0 and n_users ({n_users})"
        )
    # An item nobody interacted with would have infinite self-information; count it as seen by
    # one user so that means stay finite.
    return -np.log2(np.maximum(counts, 1.0) / n_users)


def novelty(recommended: np.ndarray, item_popularity: np.ndarray, n_users: int) -> np.ndarray:
    """Mean self-information ``-log2(item_popularity[i] / n_users)`` of each user's list.

    ``item_popularity`` counts the distinct users of each item (see :func:`item_popularity`) out
    of ``n_users`` (see :func:`active_users`); an item with no user counts as one. Rows whose list
    is all padding get NaN.
    """
    counts = np.asarray(item_popularity)
    rec = _check_recommended(recommended, len(counts))
    return _novelty(rec, _self_information(counts, n_users))


def _novelty(rec: np.ndarray, info: np.ndarray) -> np.ndarray:
    valid = rec >= 0
    values = np.where(valid, info[np.where(valid, rec, 0)], 0.0)
    counts = valid.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(counts > 0, values.sum(axis=1) / np.maximum(counts, 1), np.nan)


def category_codes(categories: np.ndarray) -> np.ndarray:
    """Each item's category as a number (int64), ``-1`` for an item without one (``""``).

    ``categories`` are names (one per item); integer codes are passed through, any negative
    one meaning "no category"."""
    values = np.asarray(categories)
    if values.ndim != 1:
        raise InvalidInputError("categories must be a 1-d array with one entry per item")
    if values.size and np.issubdtype(values.dtype, np.integer):
        return np.where(values < 0, -1, values).astype(np.int64)
    names, codes = np.unique(values.astype(str), return_inverse=True)
    codes = codes.astype(np.int64).ravel()
    blank = np.flatnonzero(names == "")
    if len(blank):
        codes[codes == blank[0]] = -1
    return codes


@dataclass(frozen=True, eq=False)
class ItemSpace:
    """How unlike two items are, for :func:`intra_list_diversity`.

    ``basis`` ``"item_vectors"``: ``1 - cos(v_i, v_j)`` of the model's item vectors (in [0, 2];
    0 for parallel vectors, 1 for orthogonal ones; an all-zero vector is orthogonal to every
    other). ``basis`` ``"categories"``: 1 when the two items are in different categories, 0 in
    the same one; a pair where either item has no category is left out.
    """

    basis: str
    unit_vectors: np.ndarray | None = None
    categories: np.ndarray | None = None
    """Category codes (see :func:`category_codes`), ``-1`` for none."""

    @classmethod
    def of_vectors(cls, vectors: np.ndarray) -> ItemSpace:
        """Cosine dissimilarity of ``vectors`` (one row per item)."""
        matrix = np.asarray(vectors, dtype=np.float32)
        if matrix.ndim != 2:
            raise InvalidInputError("item vectors must be a 2-d (n_items, factors) array")
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        unit = np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
        return cls("item_vectors", unit_vectors=unit)

    @classmethod
    def of_unit_vectors(cls, unit_vectors: np.ndarray) -> ItemSpace:
        """Cosine dissimilarity of rows already scaled to length 1 (or all zero), used as they
        are (a factor model's ``item_unit_vectors()``, without a second copy)."""
        unit = np.asarray(unit_vectors, dtype=np.float32)
        if unit.ndim != 2:
            raise InvalidInputError("item vectors must be a 2-d (n_items, factors) array")
        return cls("item_vectors", unit_vectors=unit)

    @classmethod
    def of_categories(cls, categories: np.ndarray) -> ItemSpace:
        """Category dissimilarity: ``categories`` are names (``""`` for none) or codes."""
        return cls("categories", categories=category_codes(categories))

    @property
    def n_items(self) -> int:
        if self.unit_vectors is not None:
            return int(self.unit_vectors.shape[0])
        assert self.categories is not None
        return len(self.categories)


def intra_list_diversity(
    recommended: np.ndarray,
    *,
    item_vectors: np.ndarray | None = None,
    categories: np.ndarray | None = None,
) -> np.ndarray:
    """Mean pairwise dissimilarity of the items of each list (float64, one value per row).

    Give exactly one of ``item_vectors`` (dissimilarity ``1 - cos``) or ``categories`` (1 for a
    pair in different categories, 0 for the same; pairs with an uncategorized item, ``""`` or
    a negative code, left out): see :class:`ItemSpace`. Padding and repeats of an item already
    listed are left out; a row with no pair left gets NaN.
    """
    if (item_vectors is None) == (categories is None):
        raise InvalidInputError("give exactly one of item_vectors or categories")
    space = (
        ItemSpace.of_vectors(item_vectors)
        if item_vectors is not None
        else ItemSpace.of_categories(np.asarray(categories))
    )
    return _diversity(_check_recommended(recommended, space.n_items), space)


def _diversity(rec: np.ndarray, space: ItemSpace) -> np.ndarray:
    n_rows, k = rec.shape
    if k < 2 or n_rows == 0:
        return np.full(n_rows, np.nan)
    valid = (rec >= 0) & ~_duplicates(rec)
    safe = np.where(valid, rec, 0)
    upper = np.triu(np.ones((k, k), dtype=bool), 1)
    if space.unit_vectors is not None:
        rows = space.unit_vectors[safe]  # (n_rows, k, factors)
        unlike = 1.0 - np.einsum("nif,njf->nij", rows, rows).astype(np.float64)
        counted = valid
    else:
        assert space.categories is not None
        codes = space.categories[safe]
        unlike = (codes[:, :, None] != codes[:, None, :]).astype(np.float64)
        counted = valid & (codes >= 0)
    pairs = counted[:, :, None] & counted[:, None, :] & upper
    n_pairs = pairs.sum(axis=(1, 2))
    total = np.where(pairs, unlike, 0.0).sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n_pairs > 0, total / np.maximum(n_pairs, 1), np.nan)


def catalog_coverage(recommended: np.ndarray, n_items: int) -> float:
    """Distinct items recommended to anyone (padding excluded) / catalog size."""
    if n_items <= 0:
        raise InvalidInputError("catalog size must be positive")
    rec = _check_recommended(recommended, n_items)
    return float(np.unique(rec[rec >= 0]).size / n_items)


# -------------------------------------------------------------- all at once
@dataclass(frozen=True)
class UserMetrics:
    """Every per-user metric of one evaluation, rows aligned with :attr:`recommended`.

    Accuracy arrays are NaN for users without held-out items; :func:`mean_metrics` averages over
    the other users only.
    """

    k: int
    n_items: int
    recommended: np.ndarray
    n_relevant: np.ndarray
    """Relevant held-out items per user, those outside the catalog (``unrankable``) included."""
    precision: np.ndarray
    recall: np.ndarray
    ndcg: np.ndarray
    average_precision: np.ndarray
    reciprocal_rank: np.ndarray
    hit: np.ndarray
    novelty: np.ndarray
    diversity: np.ndarray
    """Intra-list diversity of each list (NaN without an :class:`ItemSpace` or a pair)."""

    def __len__(self) -> int:
        return len(self.n_relevant)

    def select(self, mask: np.ndarray) -> UserMetrics:
        """The rows where ``mask`` is true (a boolean mask or an index array)."""
        return UserMetrics(
            k=self.k,
            n_items=self.n_items,
            recommended=self.recommended[mask],
            n_relevant=self.n_relevant[mask],
            precision=self.precision[mask],
            recall=self.recall[mask],
            ndcg=self.ndcg[mask],
            average_precision=self.average_precision[mask],
            reciprocal_rank=self.reciprocal_rank[mask],
            hit=self.hit[mask],
            novelty=self.novelty[mask],
            diversity=self.diversity[mask],
        )

    @classmethod
    def concat(cls, parts: Sequence[UserMetrics]) -> UserMetrics:
        """Stack the results of several batches (same ``k`` and catalog)."""
        if not parts:
            raise InvalidInputError("nothing to concatenate")
        first = parts[0]
        if any(p.k != first.k or p.n_items != first.n_items for p in parts):
            raise InvalidInputError("batches disagree on k or catalog size")
        return UserMetrics(
            k=first.k,
            n_items=first.n_items,
            recommended=np.concatenate([p.recommended for p in parts]),
            n_relevant=np.concatenate([p.n_relevant for p in parts]),
            precision=np.concatenate([p.precision for p in parts]),
            recall=np.concatenate([p.recall for p in parts]),
            ndcg=np.concatenate([p.ndcg for p in parts]),
            average_precision=np.concatenate([p.average_precision for p in parts]),
            reciprocal_rank=np.concatenate([p.reciprocal_rank for p in parts]),
            hit=np.concatenate([p.hit for p in parts]),
            novelty=np.concatenate([p.novelty for p in parts]),
            diversity=np.concatenate([p.diversity for p in parts]),
        )


def per_user_metrics(
    recommended: np.ndarray,
    relevant: sp.spmatrix | sp.sparray,
    *,
    unrankable: np.ndarray | None = None,
    item_popularity: np.ndarray | None = None,
    n_users: int | None = None,
    item_space: ItemSpace | None = None,
) -> UserMetrics:
    """Compute every per-user metric in one pass over the hit matrix.

    ``unrankable`` (one count per row) adds relevant items that are not columns of ``relevant``:
    held-out items outside the model's catalog, which no list can hold. They count in ``|R|``
    (recall's and MAP's denominators, NDCG's ideal DCG) and never as hits; precision still
    divides by k. A row with only such items is evaluable and scores 0.

    Novelty needs ``item_popularity`` (distinct users per item) and ``n_users`` (how many users
    that counts over), intra-list diversity an ``item_space``; without them each is NaN.
    """
    rec, rel = _check_pair(recommended, relevant)
    hit = _hits(rec, rel)
    n_rel = _n_relevant(rel) + unrankable_counts(unrankable, rel.shape[0])
    if item_popularity is not None and n_users is not None:
        if len(item_popularity) != rel.shape[1]:
            raise InvalidInputError(
                f"item popularity has {len(item_popularity)} entries for {rel.shape[1]} items"
            )
        nov = _novelty(rec, _self_information(item_popularity, n_users))
    else:
        nov = np.full(len(rec), np.nan)
    if item_space is not None:
        if item_space.n_items != rel.shape[1]:
            raise InvalidInputError(
                f"the item space has {item_space.n_items} items for {rel.shape[1]} items"
            )
        div = _diversity(rec, item_space)
    else:
        div = np.full(len(rec), np.nan)
    return UserMetrics(
        k=rec.shape[1],
        n_items=rel.shape[1],
        recommended=rec,
        n_relevant=n_rel,
        precision=_precision(hit, n_rel),
        recall=_recall(hit, n_rel),
        ndcg=_ndcg(hit, n_rel),
        average_precision=_average_precision(hit, n_rel),
        reciprocal_rank=_reciprocal_rank(hit, n_rel),
        hit=_undefined_where_no_relevant(np.asarray(hit.any(axis=1)), n_rel),
        novelty=nov,
        diversity=div,
    )


def _mean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def mean_metrics(metrics: UserMetrics) -> dict[str, float]:
    """Average over users with at least one held-out item, named ``precision_at_10`` and so on.

    Coverage is computed over the lists of those same users; novelty averages the users whose
    list is not empty, diversity those whose list has a pair to compare. With no evaluable user
    every value is NaN.
    """
    evaluable = metrics.n_relevant > 0
    sub = metrics.select(evaluable)
    suffix = f"_at_{metrics.k}"
    coverage = catalog_coverage(sub.recommended, sub.n_items) if len(sub) else float("nan")
    values = {
        "precision": _mean(sub.precision),
        "recall": _mean(sub.recall),
        "ndcg": _mean(sub.ndcg),
        "map": _mean(sub.average_precision),
        "mrr": _mean(sub.reciprocal_rank),
        "hit_rate": _mean(sub.hit),
        "diversity": _mean(sub.diversity),
        "coverage": coverage,
        "novelty": _mean(sub.novelty),
    }
    return {name + suffix: values[name] for name in METRIC_NAMES}


def summarize(
    recommended: np.ndarray,
    relevant: sp.spmatrix | sp.sparray,
    *,
    k: int | None = None,
    n_items: int | None = None,
    unrankable: np.ndarray | None = None,
    item_popularity: np.ndarray | None = None,
    n_users: int | None = None,
    item_space: ItemSpace | None = None,
) -> dict[str, float]:
    """:func:`per_user_metrics` then :func:`mean_metrics` in one call.

    ``k`` cuts longer lists or pads shorter ones with ``-1`` (default: the list length);
    ``n_items``, when given, must match the columns of ``relevant``; ``unrankable`` is as in
    :func:`per_user_metrics`. Novelty is NaN unless both ``item_popularity`` and ``n_users`` are
    given.
    """
    rec = _check_recommended(recommended)
    if k is not None:
        if k <= 0:
            raise InvalidInputError("k must be positive", field="k")
        rec = rec[:, :k]
        if rec.shape[1] < k:
            rec = np.pad(rec, ((0, 0), (0, k - rec.shape[1])), constant_values=-1)
    if n_items is not None and n_items != relevant.shape[1]:
        raise InvalidInputError(
            f"catalog has {n_items} items but relevant has {relevant.shape[1]} columns"
        )
    return mean_metrics(
        per_user_metrics(
            rec,
            relevant,
            unrankable=unrankable,
            item_popularity=item_popularity,
            n_users=n_users,
            item_space=item_space,
        )
    )
