"""Exact top-k inner-product search over a factor model's items, without scoring the catalog.

A factor model scores item ``i`` for user vector ``u`` as ``u · v_i``, and by Cauchy-Schwarz
``u · v_i <= |u| |v_i|``. Collaborative-filtering factors have very unequal lengths: an item's
norm grows with how much evidence the model has for it, so a few thousand items carry most of
the length (the spread measured on the benchmark catalog is in ``docs/benchmarks.md``, "Figures
behind design choices in the code"). :class:`NormOrderedIndex` stores the items sorted by
decreasing norm: the longest items give a k-th best score ``t`` early, and every item whose bound
``|u| |v_i|`` is below ``t`` can be skipped, which is everything after one cut-off in that order.
The answer is the exact float32 ranking (up to score ties), not an approximation: a user whose
taste points away from the long vectors simply scans further, at worst the whole catalog.

A search runs as one compiled call (:mod:`models.kernels`) that holds the GIL from start to
end, so a threaded server does not trade the interpreter back and forth around dozens of small
numpy calls. An index that prunes nothing (unit vectors for similar items) scores a batch of
concurrent queries with one GEMM instead (see :class:`models.batching.ScoreBatcher`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .kernels import (
    NO_FILTER,
    NO_POSITIONS,
    PROJECTED,
    greedy_capped,
    search_beyond,
    search_one,
)
from .topk import NEG_INF, top_k_row

FIRST_BLOCK = 1024
"""Longest items every query scores first, to learn its k-th best score (for up to
:data:`FIRST_BLOCK_K` items; see :meth:`NormOrderedIndex.first_for`)."""
FIRST_BLOCK_K = 20
"""The list length :data:`FIRST_BLOCK` is sized for: a longer list's first block grows in
proportion, so that it still holds most of the list and its k-th best score still prunes."""
BOUND_SLACK = 1e-4
"""Relative margin on the Cauchy-Schwarz bound, well above float32 dot-product rounding."""
PROJECTION_DIMS = PROJECTED
"""Principal directions of the item factors kept for the finer bound of the second step."""


def _row_norms(factors: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Euclidean norm of every row in double precision, a chunk of rows at a time (no n x f
    double copy of a large catalog)."""
    norms = np.empty(len(factors), dtype=np.float64)
    for start in range(0, len(factors), chunk):
        part = factors[start : start + chunk].astype(np.float64)
        norms[start : start + chunk] = np.sqrt(np.einsum("ij,ij->i", part, part))
    return norms


@dataclass
class Query:
    """One request: a user vector, how many items, and what it must not get.

    ``blocked`` holds index positions (see :attr:`NormOrderedIndex.position`), sorted;
    ``disallowed`` is a boolean mask over positions (True: filtered out), or None for no filter.
    With ``more > 0`` the same pass also finds the best ``more`` items beyond the answer (neither
    blocked nor in it) that ``more_disallowed`` allows, a filter within this one's
    (:attr:`Hits.beyond`): what a second query with the answer blocked too would give.
    """

    vector: np.ndarray
    k: int
    blocked: np.ndarray
    disallowed: np.ndarray | None = None
    more: int = 0
    more_disallowed: np.ndarray | None = None
    more_allowed: np.ndarray | None = None
    """The positions ``more_disallowed`` allows, sorted, where its maker keeps them: the search
    for the items beyond then visits only those (for a filter that lets few items through)."""
    cap: int = 0
    """With ``cap > 0``, the answer is the best items taken by score while no category has
    ``cap`` of them (:func:`models.kernels.search_one` with a cap), ``codes`` giving each position's
    category number (below ``n_codes``; -1 for none, never capped). Fewer than ``k`` come back
    when the first block cannot fill the list under the cap (``more`` is not combined)."""
    codes: np.ndarray | None = None
    n_codes: int = 0


@dataclass
class Hits:
    """Result of one :class:`Query`: item ids (model indices) best first, their scores, and how
    many items were scored to find them."""

    ids: np.ndarray
    scores: np.ndarray
    scanned: int
    beyond: tuple[np.ndarray, np.ndarray] | None = None
    """The ids and scores of the items beyond the answer that the query asked for (``more``)."""


class NormOrderedIndex:
    """The item factors sorted by decreasing norm, for exact top-k search.

    A search takes two steps. The first block (the ``first_block`` longest items) gives each
    query a k-th best score ``t``; every later position whose norm bound ``|u| |v|`` is below
    ``t`` can be skipped, and since the bound only falls along the order, that is everything after
    one cut-off position found by binary search. The second step looks at the positions up to the
    cut-off with a finer bound: with ``P`` the top principal directions of the item factors,
    ``u · v <= (Pu) · (Pv) + |u_perp| |v_perp|`` (the residuals orthogonal to them), a few
    multiply-adds per item instead of a full dot product. Only the items whose finer bound
    reaches ``t`` are scored exactly; when too many do, the whole range is scored (one GEMV).
    Both bounds are upper bounds, so the result is exact.
    """

    def __init__(
        self, item_factors: np.ndarray, first_block: int = FIRST_BLOCK, *, projection: bool = True
    ) -> None:
        """Index ``item_factors``; ``projection=False`` leaves out the second step's finer bound
        (only the norm bound prunes), for comparison."""
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
        self.n_items = n
        self._project(sorted_factors, norms[self.order], projection)
        self._quantize(self._factors)

    def _quantize(self, factors: np.ndarray) -> None:
        """Each row as int8 levels times a per-row scale (its largest magnitude over 127), the
        norm of that approximation and its distance to the row. The last carries the float32
        margin too (``BOUND_SLACK`` times the row's norm), so that a level score plus its error
        bound is an upper bound on the exact float32 score, as the kernel's screen needs."""
        n, f = factors.shape
        if n <= self._first:  # every query scores the whole catalog: no screen to feed
            n = 0
        self._levels = np.empty((n, f), dtype=np.int8)
        self._level_scale = np.empty(n, dtype=np.float32)
        self._level_norm = np.empty(n, dtype=np.float32)
        self._level_error = np.empty(n, dtype=np.float32)
        for start in range(0, n, 1 << 16):  # no n x f double copy of a large catalog
            rows = factors[start : start + (1 << 16)].astype(np.float64)
            top = np.abs(rows).max(axis=1) if f else np.zeros(len(rows))
            scale = np.where(top > 0, top / 127.0, 1.0).astype(np.float32)
            levels = np.clip(np.rint(rows / scale[:, None]), -127, 127)
            approx = levels * scale[:, None].astype(np.float64)
            norm = np.sqrt(np.einsum("ij,ij->i", approx, approx))
            error = np.sqrt(np.einsum("ij,ij->i", rows - approx, rows - approx))
            error += BOUND_SLACK * np.sqrt(np.einsum("ij,ij->i", rows, rows))
            part = slice(start, start + len(rows))
            self._levels[part] = levels.astype(np.int8)
            self._level_scale[part] = scale
            # Rounded up to float32, so the stored bounds never shrink.
            self._level_norm[part] = np.nextafter(norm.astype(np.float32), np.float32(np.inf))
            self._level_error[part] = np.nextafter(error.astype(np.float32), np.float32(np.inf))

    def _project(self, factors: np.ndarray, norms: np.ndarray, enabled: bool) -> None:
        """Principal directions ``P`` (rows), and ``P v`` and ``|v_perp|`` of every position.

        The kernel's bound takes exactly :data:`PROJECTION_DIMS` directions: with fewer factors
        than that, the missing directions are zero rows, which add nothing to the bound.
        """
        n, f = factors.shape
        d = min(PROJECTION_DIMS, f - 1)
        self._directions = np.zeros((0, f), dtype=np.float64)
        self._projected_t = np.zeros((0, n), dtype=np.float32)
        self._residual = np.zeros(0, dtype=np.float32)
        if not enabled or d < 1 or n <= self._first:
            return
        gram = (factors.T @ factors).astype(np.float64)
        _, vectors = np.linalg.eigh(gram)  # ascending eigenvalues, orthonormal columns
        directions = np.zeros((PROJECTION_DIMS, f), dtype=np.float64)
        directions[:d] = vectors[:, ::-1][:, :d].T
        # float32 products (no n x f double copy); their rounding is far below the margins.
        projected = (factors @ directions.T.astype(np.float32)).astype(np.float64)
        residual = np.sqrt(np.maximum(norms**2 - np.einsum("ij,ij->i", projected, projected), 0))
        self._directions = directions
        # Stored d x n: the kernel reads each direction's coordinates as one contiguous row.
        self._projected_t = np.ascontiguousarray(projected.T, dtype=np.float32)
        self._residual = (residual * (1.0 + BOUND_SLACK)).astype(np.float32)

    @property
    def nbytes(self) -> int:
        """Memory the index holds beyond the model (the sorted copy of the item factors)."""
        extra = 0
        if len(self._directions):
            extra = self._projected_t.nbytes + self._residual.nbytes
        levels = self._levels.nbytes + 3 * self._level_scale.nbytes
        return int(
            self._factors.nbytes + self.order.nbytes * 2 + self._neg_bound.nbytes + extra + levels
        )

    @property
    def prunes(self) -> bool:
        """Whether a search skips items (the catalog is longer than the first block), as
        opposed to scoring every item for every query."""
        return self._first < self.n_items

    def first_for(self, k: int) -> int:
        """The first block of a query for ``k`` items: :data:`FIRST_BLOCK` (as built) up to
        :data:`FIRST_BLOCK_K` items, in proportion beyond. The k-th best score of a fixed block
        falls as ``k`` grows, so the norm bound then stops later and the int8 screen reads
        every position up to there; scoring a longer block (one GEMV, as cheap per row as the
        screen) gives a higher k-th score and a much shorter tail. On the benchmark catalog
        (20,000 items, ALS factors) a search for 40 items took 41 us with a block of 2,048
        against 61 with 1,024. Any block gives the exact answer."""
        return min(self.n_items, max(self._first, self._first * k // FIRST_BLOCK_K))

    def positions(self, item_ids: np.ndarray) -> np.ndarray:
        """Sorted positions of ``item_ids`` (model indices), for :attr:`Query.blocked`; repeats
        are harmless, so they are not removed."""
        pos = self.position[np.asarray(item_ids, dtype=np.int64)]
        if len(self.broken):
            pos = np.concatenate([pos, self.broken])
        pos.sort()
        return pos

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        """The stored factor rows of ``item_ids`` (model indices), as the search scores them."""
        return self._factors[self.position[np.asarray(item_ids, dtype=np.int64)]]

    def search(self, queries: Sequence[Query]) -> list[Hits]:
        """Exact top ``k`` of every query (see the class docstring for the two steps).

        Each query is one call of the compiled kernel (:func:`models.kernels.search_one`). An
        index that prunes nothing (``first_block`` covering the catalog, as for similar items)
        scores the batch with one numpy GEMM instead, then ranks each query's row: the pass over
        the whole catalog takes milliseconds, and numpy releases the GIL for it, so other requests
        keep arriving (and queue into the next batch) meanwhile.
        """
        if self._first >= self.n_items:
            return self._search_full(queries)
        hits = []
        index = (
            self._factors,
            self.order,
            self._neg_bound,
            self._directions,
            self._projected_t,
            self._residual,
            self._levels,
            self._level_scale,
            self._level_norm,
            self._level_error,
        )
        for q in queries:
            vector = np.ascontiguousarray(q.vector, dtype=np.float32)
            disallowed = NO_FILTER if q.disallowed is None else q.disallowed
            if q.more <= 0 or q.cap > 0:
                capped: tuple[np.ndarray, int, int] | tuple[()] = ()
                if q.cap > 0:
                    assert q.codes is not None, "a capped query needs its category codes"
                    capped = (q.codes, q.cap, q.n_codes)
                ids, scores, scanned = search_one(
                    *index,
                    vector,
                    q.k,
                    self.first_for(q.k),
                    q.blocked,
                    disallowed,
                    BOUND_SLACK,
                    *capped,
                )
                hits.append(Hits(ids, scores, scanned))
                continue
            more_disallowed = NO_FILTER if q.more_disallowed is None else q.more_disallowed
            ids, scores, scanned, more_ids, more_scores = search_beyond(
                *index,
                vector,
                q.k,
                self.first_for(q.k),
                q.blocked,
                disallowed,
                BOUND_SLACK,
                q.more,
                more_disallowed,
                NO_POSITIONS if q.more_allowed is None else q.more_allowed,
                q.more_allowed is not None,
            )
            hits.append(Hits(ids, scores, scanned, (more_ids, more_scores)))
        return hits

    def _rank_row(self, row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Best ``k`` of a full row of scores over positions, as item ids and scores: best
        first, equal scores by item id, ``-inf`` never. Plain numpy (block maxima first, see
        :func:`top_k_row`), which releases the GIL while it reads the row."""
        _, best = top_k_row(row, min(k, len(row)))
        kth = float(best[-1]) if len(best) else NEG_INF
        # Every item tied with the k-th score competes for the last places, lowest id first.
        cut = kth if kth > NEG_INF else np.nextafter(np.float32(NEG_INF), np.float32(0))
        top = np.flatnonzero(row >= cut)
        ids, values = self.order[top], row[top]
        rank = np.lexsort((ids, -values))[:k]
        return ids[rank].astype(np.int64), values[rank].astype(np.float32)

    def _search_full(self, queries: Sequence[Query]) -> list[Hits]:
        """Every item scored for every query: one GEMM for the batch (memory-bound work that a
        batch shares), then each query's row ranked; both in numpy, which releases the GIL."""
        vectors = np.stack([np.asarray(q.vector, dtype=np.float32) for q in queries])
        # (n, f) @ (f, m), then one transposed copy: OpenBLAS runs this several times faster than
        # (m, f) @ (f, n), and row j of the copy is query j's scores, contiguous for ranking.
        block = np.ascontiguousarray((self._factors @ vectors.T).T)
        hits = []
        for j, q in enumerate(queries):
            row = block[j]
            if not np.isfinite(np.float64(np.dot(vectors[j], vectors[j]))):
                hits.append(Hits(np.empty(0, np.int64), np.empty(0, np.float32), 0))
                continue
            spare = row.copy() if q.more > 0 else row
            row[q.blocked] = NEG_INF
            if q.disallowed is not None:
                np.copyto(row, NEG_INF, where=q.disallowed)
            if q.cap > 0:
                assert q.codes is not None, "a capped query needs its category codes"
                ids, scores = self._rank_row(row, self.n_items)
                counts = np.zeros(max(q.n_codes, 1), dtype=np.int64)
                taken = greedy_capped(self.position[ids], q.codes, q.cap, q.k, counts)
                hits.append(Hits(ids[taken], scores[taken], self.n_items))
                continue
            ids, scores = self._rank_row(row, q.k)
            beyond = None
            if q.more > 0:  # the same row, with the answer blocked too and the second filter
                spare[q.blocked] = NEG_INF
                spare[self.position[ids]] = NEG_INF
                if q.more_disallowed is not None:
                    np.copyto(spare, NEG_INF, where=q.more_disallowed)
                beyond = self._rank_row(spare, q.more)
            hits.append(Hits(ids, scores, self.n_items, beyond))
        return hits
