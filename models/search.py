"""Exact top-k inner-product search over a factor model's items, without scoring the catalog.

A factor model scores item ``i`` for user vector ``u`` as ``u · v_i``, and by Cauchy-Schwarz
``u · v_i <= |u| |v_i|``. Collaborative-filtering factors have very unequal lengths: an item's
norm grows with how much evidence the model has for it, so a few thousand items carry most of
the length (on the 200k-item benchmark catalog the median item norm is 0.02 and the largest
18.6). :class:`NormOrderedIndex` stores the items sorted by decreasing norm: the longest items
give a k-th best score ``t`` early, and every item whose bound ``|u| |v_i|`` is below ``t`` can
be skipped, which is everything after one cut-off in that order. The answer is the exact float32
ranking (up to score ties), not an approximation: a user whose taste points away from the long
vectors simply scans further, at worst the whole catalog.

The search is batched: concurrent requests (see :class:`models.engine.ScoreBatcher`) share one
GEMM per step, and each ranks only the positions its own cut-off needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.base import NEG_INF

FIRST_BLOCK = 1024
"""Longest items every query scores first, to learn its k-th best score."""
BOUND_SLACK = 1e-4
"""Relative margin on the Cauchy-Schwarz bound, well above float32 dot-product rounding."""
PROJECTION_DIMS = 4
"""Principal directions of the item factors kept for the finer bound of the second step."""
DENSE_FRACTION = 3
"""Second step: score the whole range instead of gathering candidates once more than one in
this many positions of the range is a candidate (a contiguous GEMV beats a large gather)."""


BLOCK = 128
"""Width of the blocks whose maxima :func:`top_k_row` scans before looking at single scores."""
MIN_BLOCKED_TOPK = 8 * BLOCK
"""Rows shorter than this are ranked by a plain partition: block maxima only pay on long rows."""


def top_k_row(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` entries of the 1-d ``scores`` (finite or ``-inf``), like :func:`topk` on a row.

    The row is viewed as ``BLOCK`` strided slices of length ``m``; the element-wise maximum over
    them is each column's block maximum. If ``t`` is the k-th largest block maximum, ``k`` distinct
    items score at least ``t``, so every item of the true top k lies in a column whose maximum
    is ``>= t``: only those columns (about ``k x BLOCK`` items) are ranked exactly.
    """
    n = len(scores)
    m = n // BLOCK
    if n < MIN_BLOCKED_TOPK or k * 4 > m:
        return _top_k_exact(scores, k)
    maxima = scores[: m * BLOCK].reshape(BLOCK, m).max(axis=0)
    threshold = np.partition(maxima, m - k)[m - k]
    columns = np.flatnonzero(maxima >= threshold)
    # Row-major over (slice, column) with columns ascending: the candidate ids come out sorted,
    # which keeps topk's tie-break (lowest id first) identical.
    candidates = (columns[None, :] + m * np.arange(BLOCK)[:, None]).ravel()
    candidates = np.concatenate([candidates, np.arange(m * BLOCK, n)])
    ids, top = _top_k_exact(scores[candidates], k)
    found = ids >= 0
    ids[found] = candidates[ids[found]]
    return ids, top


def _top_k_exact(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`topk` of one row, without the 2-d bookkeeping (this runs once per request)."""
    n = len(scores)
    k = min(k, n)
    part = np.argpartition(scores, n - k)[n - k :] if k < n else np.arange(n)
    top = scores[part]
    order = np.lexsort((part, -top))
    ids, top = part[order].astype(np.int64), top[order].astype(np.float32)
    ids[np.isneginf(top)] = -1
    return ids, top


def _row_norms(factors: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Euclidean norm of every row in double precision, a chunk of rows at a time (no n x f
    double copy of a large catalog)."""
    norms = np.empty(len(factors), dtype=np.float64)
    for start in range(0, len(factors), chunk):
        part = factors[start : start + chunk].astype(np.float64)
        norms[start : start + chunk] = np.sqrt(np.einsum("ij,ij->i", part, part))
    return norms


def _kth_largest(row: np.ndarray, k: int) -> float:
    """The k-th largest value of ``row`` (``-inf`` when fewer than k are finite)."""
    if len(row) >= 8 * MIN_BLOCKED_TOPK:
        _, best = top_k_row(row, k)  # block maxima first: cheaper than a full partition
        return float(best[-1])
    return float(np.partition(row, len(row) - k)[len(row) - k])


@dataclass
class Query:
    """One request: a user vector, how many items, and what it must not get.

    ``blocked`` holds index positions (see :attr:`NormOrderedIndex.position`), sorted and unique;
    ``disallowed`` is a boolean mask over positions (True: filtered out), or None for no filter.
    """

    vector: np.ndarray
    k: int
    blocked: np.ndarray
    disallowed: np.ndarray | None = None


@dataclass
class Hits:
    """Result of one :class:`Query`: item ids (model indices) best first, their scores, and how
    many items were scored to find them."""

    ids: np.ndarray
    scores: np.ndarray
    scanned: int


class NormOrderedIndex:
    """The item factors sorted by decreasing norm, for exact batched top-k search.

    A search takes two steps. The first block (the ``first_block`` longest items) gives each
    query a k-th best score ``t``; every later position whose norm bound ``|u| |v|`` is below
    ``t`` can be skipped, and since the bound only falls along the order, that is everything after
    one cut-off position found by binary search. The second step looks at the positions up to the
    cut-off with a finer bound: with ``P`` the top principal directions of the item factors,
    ``u · v <= (Pu) · (Pv) + |u_perp| |v_perp|`` (the residuals orthogonal to them), a few
    multiply-adds per item instead of a full dot product. Only the items whose finer bound
    reaches ``t`` are scored exactly; when too many do, the whole range is scored (one GEMM
    shared by the batch). Both bounds are upper bounds, so the result is exact.
    """

    def __init__(self, item_factors: np.ndarray, first_block: int = FIRST_BLOCK) -> None:
        factors = np.asarray(item_factors, dtype=np.float32)
        n = len(factors)
        finite = np.isfinite(factors).all(axis=1)
        norms = _row_norms(factors)
        norms[~finite] = 0.0
        # Stable sort: equal norms keep id order, so the index is deterministic.
        self.order = np.argsort(-norms, kind="stable")
        """Position -> item id."""
        self.position = np.empty(n, dtype=np.int64)
        """Item id -> position."""
        self.position[self.order] = np.arange(n, dtype=np.int64)
        sorted_factors = factors[self.order]
        sorted_factors[np.logical_not(finite)[self.order]] = 0.0
        self._factors = np.ascontiguousarray(sorted_factors)
        # -bound[p] is non-decreasing, for searchsorted; bound[p] >= |v| at every position >= p.
        self._neg_bound = -(norms[self.order] * (1.0 + BOUND_SLACK))
        # Items whose factors are not finite are never returned (their scores would be NaN).
        self.broken = np.sort(self.position[~finite])
        self._first = min(n, max(1, first_block))
        self._head = np.arange(self._first, dtype=np.int64)
        self.n_items = n
        self._project(sorted_factors, norms[self.order])

    def _project(self, factors: np.ndarray, norms: np.ndarray) -> None:
        """Principal directions ``P`` (rows), and ``P v`` and ``|v_perp|`` of every position."""
        n, f = factors.shape
        d = min(PROJECTION_DIMS, f - 1)
        self._directions: np.ndarray | None = None
        if d < 1 or n <= self._first:
            return
        gram = (factors.T @ factors).astype(np.float64)
        _, vectors = np.linalg.eigh(gram)  # ascending eigenvalues, orthonormal columns
        directions = np.ascontiguousarray(vectors[:, ::-1][:, :d].T)
        # float32 products (no n x f double copy); their rounding is far below the margins.
        projected = (factors @ directions.T.astype(np.float32)).astype(np.float64)
        residual = np.sqrt(np.maximum(norms**2 - np.einsum("ij,ij->i", projected, projected), 0))
        self._directions = directions
        # Stored d x n: a (d,) @ (d, n) product runs at memory speed, (n, d) @ (d,) does not.
        self._projected_t = np.ascontiguousarray(projected.T, dtype=np.float32)
        self._residual = (residual * (1.0 + BOUND_SLACK)).astype(np.float32)

    @property
    def nbytes(self) -> int:
        """Memory the index holds beyond the model (the sorted copy of the item factors)."""
        extra = 0
        if self._directions is not None:
            extra = self._projected_t.nbytes + self._residual.nbytes
        return int(self._factors.nbytes + self.order.nbytes * 2 + self._neg_bound.nbytes + extra)

    def positions(self, item_ids: np.ndarray) -> np.ndarray:
        """Sorted unique positions of ``item_ids`` (model indices), for :attr:`Query.blocked`."""
        pos = self.position[np.asarray(item_ids, dtype=np.int64)]
        if len(self.broken):
            pos = np.concatenate([pos, self.broken])
        return np.unique(pos)

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        """The stored factor rows of ``item_ids`` (model indices), as the search scores them."""
        return self._factors[self.position[np.asarray(item_ids, dtype=np.int64)]]

    def _score(self, start: int, end: int, vectors: np.ndarray) -> np.ndarray:
        """Scores of positions ``start:end``, one column per vector (a fresh array)."""
        items = self._factors[start:end]
        if len(vectors) == 1:
            return (items @ vectors[0])[:, None]  # GEMV: the fastest kernel for one user
        return items @ vectors.T

    def search(self, queries: Sequence[Query]) -> list[Hits]:
        """Exact top ``k`` of every query (see the class docstring for the two steps)."""
        if len(queries) == 1:
            vectors = np.asarray(queries[0].vector, dtype=np.float32)[None, :]
        else:
            vectors = np.stack([np.asarray(q.vector, dtype=np.float32) for q in queries])
        wide = vectors.astype(np.float64)
        lengths = np.sqrt(np.einsum("ij,ij->i", wide, wide))
        first = self._first
        block = self._score(0, first, vectors)
        heads: list[np.ndarray] = []
        stops = np.zeros(len(queries), dtype=np.int64)
        thresholds = np.full(len(queries), np.inf)
        for j, q in enumerate(queries):
            head = block[:, j]
            self._mask(head, q, 0, first)
            heads.append(head)
            length = lengths[j]
            if not np.isfinite(length):
                continue  # NaN or inf scores: nothing to rank, the caller falls back
            k = min(q.k, first)
            threshold = _kth_largest(head, k) if k else np.inf
            thresholds[j] = threshold
            stops[j] = self._cut_off(threshold, float(length))
        # Second step: (scores, positions) per query; positions None means first:stop in order.
        tails: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        dense = []
        for j in np.flatnonzero(stops > first).tolist():
            stop = int(stops[j])
            found = self._candidates(vectors[j], lengths[j], thresholds[j], stop, queries[j])
            if found is None:
                dense.append(j)
            else:
                tails[j] = (self._factors[found] @ vectors[j], found)
        if dense:
            rest = self._score(first, int(stops[dense].max()), vectors[dense])
            for col, j in enumerate(dense):
                part = rest[: stops[j] - first, col]
                self._mask(part, queries[j], first, int(stops[j]))
                tails[j] = (part, None)
        hits = []
        for j, q in enumerate(queries):
            if not np.isfinite(lengths[j]):
                hits.append(Hits(np.empty(0, np.int64), np.empty(0, np.float32), 0))
                continue
            tail = tails.get(j)
            if tail is None:  # the first block's k-th score is already the answer's
                hits.append(self._hits(heads[j], q.k, None, first, thresholds[j]))
            else:
                scores = np.concatenate((heads[j], tail[0]))
                where = None if tail[1] is None else np.concatenate((self._head, tail[1]))
                kth = self._kth_above(scores, q.k, thresholds[j])
                hits.append(self._hits(scores, q.k, where, len(scores), kth))
        return hits

    def _candidates(
        self, vector: np.ndarray, length: float, threshold: float, stop: int, q: Query
    ) -> np.ndarray | None:
        """Positions in ``first:stop`` whose projection bound reaches ``threshold``, or None
        when the range should be scored whole (no projection, non-positive threshold, or too
        many candidates)."""
        if self._directions is None or not threshold > 0.0:
            return None
        first = self._first
        u = vector.astype(np.float64)
        up = self._directions @ u
        u_perp = np.sqrt(max(float(u @ u) - float(up @ up), 0.0))
        bound = up.astype(np.float32) @ self._projected_t[:, first:stop]
        bound += np.float32(u_perp) * self._residual[first:stop]
        self._mask(bound, q, first, stop)  # filtered and blocked items are no candidates
        # Float32 rounding of the bound is far below this margin (relative to |u| max|v|).
        margin = BOUND_SLACK * length * -self._neg_bound[first]
        found = np.flatnonzero(bound >= threshold - margin)
        if len(found) * DENSE_FRACTION > stop - first:
            return None
        found += first
        return found

    def _cut_off(self, threshold: float, length: float) -> int:
        """Positions that may still hold an item scoring at least ``threshold``: ``0:cut_off``."""
        if threshold == NEG_INF or threshold <= 0.0:
            # Fewer than k allowed items so far, or a non-positive k-th score: a zero-norm
            # item (score 0) could still beat it, so only a full scan is exact.
            return self.n_items
        if length == 0.0:
            return self._first  # every score is 0 < threshold: nothing later can enter
        # Continue while length * bound[p] >= threshold, i.e. -bound[p] <= -threshold / length.
        cut = int(np.searchsorted(self._neg_bound, -threshold / length, side="right"))
        return max(cut, self._first)

    def _mask(self, row: np.ndarray, q: Query, start: int, end: int) -> None:
        """Set the scores of ``q``'s filtered and blocked items among ``start:end`` to -inf."""
        if q.disallowed is not None:
            np.copyto(row, NEG_INF, where=q.disallowed[start:end])
        blocked = q.blocked
        if len(blocked):
            # Scalar searchsorted calls: a tuple of bounds would go through array conversion.
            lo = 0 if start == 0 else int(blocked.searchsorted(start))
            hi = len(blocked) if end >= self.n_items else int(blocked.searchsorted(end))
            if hi > lo:
                row[blocked[lo:hi] - start] = NEG_INF

    @staticmethod
    def _kth_above(scores: np.ndarray, k: int, floor: float) -> float | None:
        """The k-th largest of ``scores`` given ``floor``, a lower bound on it (the first block's
        k-th score): only the few scores at or above the floor need ranking. None if unknown."""
        if not floor > NEG_INF:
            return None
        above = scores[scores >= floor]
        if len(above) < k:  # cannot happen for a true lower bound; let the caller rank it all
            return None
        return float(np.partition(above, len(above) - k)[len(above) - k])

    def _hits(
        self,
        scores: np.ndarray,
        k: int,
        where: np.ndarray | None,
        scanned: int,
        kth: float | None = None,
    ) -> Hits:
        """Top ``k`` of ``scores`` (at ``where`` positions; None: positions 0, 1, ...), given
        their k-th largest value ``kth`` if known."""
        if kth is None:
            _, best = top_k_row(scores, min(k, len(scores)))
            kth = float(best[-1]) if len(best) else -np.inf
        # Every item tied with the k-th score competes for the last places, lowest id first.
        cut = kth if kth > -np.inf else np.nextafter(NEG_INF, np.float32(0))
        top = np.flatnonzero(scores >= cut)
        ids = self.order[top if where is None else where[top]]
        values = scores[top]
        # Best first; equal scores in item-id order, as a plain ranking of the catalog would.
        rank = np.lexsort((ids, -values))[:k]
        return Hits(ids[rank].astype(np.int64), values[rank].astype(np.float32), scanned)
