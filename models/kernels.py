"""Compiled (numba) kernel of one exact top-k search in a :class:`models.search.NormOrderedIndex`.

Why compiled: written as numpy calls, one search is some forty calls on arrays of a few thousand
items. Each carries interpreter overhead, and most of them release the GIL around their loop. In
a threaded gRPC server every release hands the interpreter to another thread that is waiting for
it (the poller, another handler) and the search then waits to get it back: on the benchmark
catalog those extra context switches cost more CPU per request than the search itself
(``docs/benchmarks.md``, "Where the time goes"). The kernel runs the whole search in one call that
keeps the GIL; the dot products still go through the same BLAS ``sgemv`` as ``item_factors @ u``,
so the scores, and therefore the ranking, are exactly those of the plain float32 computation.

Compiled functions are cached on disk (``cache=True``: next to this file, or in numba's per-user
cache directory when that is read-only), so a server process compiles them once per machine;
:func:`warm_up` compiles them before a model starts serving.
"""

from __future__ import annotations

import numpy as np

# numba's np.dot calls BLAS through SciPy, whose OpenBLAS loads with this module. Importing it
# here, not lazily at the first compile, puts it in the process before a server pins BLAS thread
# pools to one thread (threadpoolctl only limits libraries that are already loaded).
import scipy.linalg.cython_blas  # noqa: F401
from numba import njit

NO_FILTER = np.zeros(0, dtype=np.bool_)
"""The ``disallowed`` argument of :func:`search_one` for a query without a filter."""
PROJECTED = 4
"""Principal directions the second step's bound uses (fixed, so its loop is unrolled)."""


@njit(cache=True)
def _mask(scores: np.ndarray, start: int, blocked: np.ndarray, disallowed: np.ndarray) -> None:
    """Set scores of positions ``start:start + len(scores)`` that are blocked or disallowed to
    ``-inf`` (``blocked``: sorted positions; ``disallowed``: mask over positions, or empty)."""
    stop = start + len(scores)
    if len(disallowed):
        for p in range(start, stop):
            if disallowed[p]:
                scores[p - start] = -np.inf
    for i in range(np.searchsorted(blocked, start), len(blocked)):
        if blocked[i] >= stop:
            break
        scores[blocked[i] - start] = -np.inf


@njit(cache=True)
def _kth_largest(scores: np.ndarray, k: int) -> float:
    """The k-th largest of ``scores`` (``k <= len(scores)``), by a min-heap of the best ``k``:
    one comparison for most items, no copy of the row."""
    heap = np.empty(k, np.float32)
    heap[:] = -np.inf
    for x in scores:
        if x <= heap[0]:
            continue
        # Replace the root (the smallest kept) and sift the new value down.
        i = 0
        while True:
            child = 2 * i + 1
            if child >= k:
                break
            if child + 1 < k and heap[child + 1] < heap[child]:
                child += 1
            if heap[child] >= x:
                break
            heap[i] = heap[child]
            i = child
        heap[i] = x
    return np.float64(heap[0])


@njit(cache=True)
def _ranked(
    head: np.ndarray,
    tail: np.ndarray,
    tail_pos: np.ndarray,
    order: np.ndarray,
    threshold: float,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of the scores at positions ``0:len(head)`` and ``tail_pos`` that reach
    ``threshold`` (a lower bound on the k-th best): best score first, equal scores by item id,
    as a plain ranking of the whole catalog would; ``-inf`` never enters."""
    count = 0
    for x in head:
        count += x >= threshold and x > -np.inf
    for x in tail:
        count += x >= threshold and x > -np.inf
    ids = np.empty(count, np.int64)
    scores = np.empty(count, np.float32)
    c = 0
    for p in range(len(head)):
        if head[p] >= threshold and head[p] > -np.inf:
            ids[c] = order[p]
            scores[c] = head[p]
            c += 1
    for i in range(len(tail)):
        if tail[i] >= threshold and tail[i] > -np.inf:
            ids[c] = order[tail_pos[i]]
            scores[c] = tail[i]
            c += 1
    by_id = np.argsort(ids)
    ids, scores = ids[by_id], scores[by_id]
    rank = np.argsort(-scores, kind="mergesort")[:k]  # stable: ties stay in id order
    return ids[rank], scores[rank]


@njit(cache=True)
def _quantized(vector: np.ndarray) -> tuple[np.ndarray, float, float]:
    """``vector`` as int8 levels (kept as int32), their scale and the rounding error's norm."""
    f = len(vector)
    top = 0.0
    for j in range(f):
        top = max(top, abs(np.float64(vector[j])))
    scale = top / 127.0 if top > 0.0 else 1.0
    levels = np.empty(f, np.int32)
    error = 0.0
    for j in range(f):
        level = min(127.0, max(-127.0, np.rint(np.float64(vector[j]) / scale)))
        levels[j] = np.int32(level)
        error += (np.float64(vector[j]) - level * scale) ** 2
    return levels, scale, np.sqrt(error) * (1.0 + 1e-6)


@njit(cache=True)
def search_one(
    factors: np.ndarray,
    order: np.ndarray,
    neg_bound: np.ndarray,
    directions: np.ndarray,
    projected_t: np.ndarray,
    residual: np.ndarray,
    levels: np.ndarray,
    level_scale: np.ndarray,
    level_norm: np.ndarray,
    level_error: np.ndarray,
    vector: np.ndarray,
    k: int,
    first: int,
    blocked: np.ndarray,
    disallowed: np.ndarray,
    slack: float,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Best ``k`` items for ``vector``: (item ids, float32 scores, positions examined).

    ``factors`` are the item rows sorted by decreasing norm (``order``: position -> item id),
    ``neg_bound[p]`` is minus an upper bound on the norm of every item at or after position ``p``;
    ``directions`` (``d x f``, ``d`` is :data:`PROJECTED` or 0 for no second-step bound) are
    principal directions of the items, ``projected_t`` (``d x n``) the items' coordinates along
    them and ``residual`` the norms of what is left, with the bound's margin included.
    ``levels`` are the rows as int8 (``level_scale`` per row), ``level_norm`` the norms of the
    rows they stand for and ``level_error`` the distance to the true rows plus the float32 margin.
    ``blocked`` holds sorted positions never to return; ``disallowed`` is a mask over positions
    (empty: no filter). Ties are broken by item id, lowest first; items scoring ``-inf`` (blocked,
    filtered) are never returned, so fewer than ``k`` ids may come back.
    """
    n, f = factors.shape
    neg_inf = -np.inf
    square = 0.0
    for j in range(f):
        square += np.float64(vector[j]) * np.float64(vector[j])
    length = np.sqrt(square)
    if not np.isfinite(length) or k <= 0:
        return np.empty(0, np.int64), np.empty(0, np.float32), 0
    filtered = len(disallowed) > 0
    n_blocked = len(blocked)

    # Step 1: the first block of longest items gives the k-th best score so far.
    head = np.dot(factors[:first], vector)
    _mask(head, 0, blocked, disallowed)
    threshold = _kth_largest(head, min(k, first))

    # Everything after the cut-off has |u| |v| below the threshold: it cannot enter the top k.
    if threshold == neg_inf or threshold <= 0.0:
        stop = n  # fewer than k allowed items so far, or a score a zero vector could tie
    elif length == 0.0:
        stop = first
    else:
        stop = max(int(np.searchsorted(neg_bound, -threshold / length, side="right")), first)

    # Step 2: the allowed positions first:stop whose projection bound reaches the threshold.
    tail_pos = np.empty(0, np.int64)
    tail = np.empty(0, np.float32)
    scanned = first
    if stop > first:
        d = directions.shape[0]
        candidates = np.empty(stop - first, np.int64)
        m = 0
        b = np.searchsorted(blocked, first)
        projected = d == PROJECTED and threshold > 0.0
        bounds = np.empty(0, np.float32)
        limit = np.float32(0.0)
        if projected:
            u = vector.astype(np.float64)
            up = np.zeros(PROJECTED)
            for a in range(PROJECTED):
                for j in range(f):
                    up[a] += directions[a, j] * u[j]
            u_perp = np.float32(np.sqrt(max(square - np.dot(up, up), 0.0)))
            limit = np.float32(threshold - slack * length * -neg_bound[first])
            # Bounds in one element-wise pass over contiguous rows (the compiler vectorizes it).
            rest = residual[first:stop]
            p0, p1 = projected_t[0, first:stop], projected_t[1, first:stop]
            p2, p3 = projected_t[2, first:stop], projected_t[3, first:stop]
            u0, u1 = np.float32(up[0]), np.float32(up[1])
            u2, u3 = np.float32(up[2]), np.float32(up[3])
            bounds = np.empty(stop - first, np.float32)
            for i in range(stop - first):
                bounds[i] = u_perp * rest[i] + u0 * p0[i] + u1 * p1[i] + u2 * p2[i] + u3 * p3[i]
        for i in range(stop - first):
            if projected and bounds[i] < limit:
                continue
            p = first + i
            if filtered and disallowed[p]:
                continue
            while b < n_blocked and blocked[b] < p:
                b += 1
            if b < n_blocked and blocked[b] == p:
                continue
            candidates[m] = p
            m += 1
        scanned = first + (m if projected else stop - first)

        # Step 3: an int8 screen. Each candidate's score from the int8 rows, plus a bound on
        # its error (the query's and the row's rounding, and the float32 margin), must reach
        # the threshold; only those few rows are read in float32 and scored exactly.
        query, query_scale, query_error = _quantized(vector)
        kept = 0
        for i in range(m):
            p = candidates[i]
            dot = np.int32(0)
            for j in range(f):
                dot += np.int32(levels[p, j]) * query[j]
            upper = query_scale * np.float64(level_scale[p]) * dot
            upper += query_error * np.float64(level_norm[p]) + length * np.float64(level_error[p])
            if upper >= threshold:
                candidates[kept] = p
                kept += 1
        if kept:
            rows = np.empty((kept, f), np.float32)
            for i in range(kept):
                rows[i] = factors[candidates[i]]
            tail = np.dot(rows, vector)
            tail_pos = candidates[:kept]

    ids, scores = _ranked(head, tail, tail_pos, order, threshold, k)
    return ids, scores, scanned


def warm_up() -> None:
    """Compile (or load from the on-disk cache) every signature a server calls, so no request
    pays for it: filters arrive as read-only masks, which numba types apart from writable ones."""
    rng = np.random.default_rng(0)
    factors = rng.standard_normal((8, 4)).astype(np.float32)
    norms = np.sqrt((factors.astype(np.float64) ** 2).sum(axis=1))
    order = np.argsort(-norms).astype(np.int64)
    frozen = np.zeros(8, dtype=np.bool_)
    frozen.setflags(write=False)
    levels = np.round(factors[order] * 20).astype(np.int8)
    for disallowed in (NO_FILTER, frozen):
        search_one(
            np.ascontiguousarray(factors[order]),
            order,
            -norms[order],
            np.zeros((PROJECTED, 4)),
            np.zeros((PROJECTED, 8), np.float32),
            norms[order].astype(np.float32),
            levels,
            np.full(8, 0.05, np.float32),
            norms[order].astype(np.float32),
            np.full(8, 0.1, np.float32),
            factors[0].copy(),
            2,
            2,
            np.zeros(0, np.int64),
            disallowed,
            1e-4,
        )
