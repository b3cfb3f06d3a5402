"""Compiled (numba) kernel of one exact top-k search in a :class:`models.search.NormOrderedIndex`,
and the ranking pipeline's small per-list loops (:func:`by_score`, :func:`claim_reasons`).

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
NO_POSITIONS = np.zeros(0, dtype=np.int64)
"""The ``more_allowed`` argument of :func:`search_beyond` when its filter is a mask."""
NO_FLOORS = np.zeros(0, dtype=np.float64)
"""No per-category floors (a search without a cap)."""
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
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best ``k`` of the scores at positions ``0:len(head)`` and ``tail_pos`` that reach
    ``threshold`` (a lower bound on the k-th best): best score first, equal scores by item id,
    as a plain ranking of the whole catalog would; ``-inf`` never enters. Item ids, scores and
    positions."""
    count = 0
    for x in head:
        count += x >= threshold and x > -np.inf
    for x in tail:
        count += x >= threshold and x > -np.inf
    ids = np.empty(count, np.int64)
    scores = np.empty(count, np.float32)
    positions = np.empty(count, np.int64)
    c = 0
    for p in range(len(head)):
        if head[p] >= threshold and head[p] > -np.inf:
            ids[c] = order[p]
            scores[c] = head[p]
            positions[c] = p
            c += 1
    for i in range(len(tail)):
        if tail[i] >= threshold and tail[i] > -np.inf:
            ids[c] = order[tail_pos[i]]
            scores[c] = tail[i]
            positions[c] = tail_pos[i]
            c += 1
    by_id = np.argsort(ids)
    ids, scores, positions = ids[by_id], scores[by_id], positions[by_id]
    rank = np.argsort(-scores, kind="mergesort")[:k]  # stable: ties stay in id order
    return ids[rank], scores[rank], positions[rank]


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
    codes: np.ndarray = NO_POSITIONS,
    cap: int = 0,
    n_codes: int = 0,
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

    With ``cap > 0``, the answer is the best ``k`` items taken in order of score while no
    category (``codes``: each position's category number below ``n_codes``, -1 for none, never
    capped) has ``cap`` of them, as a list laid out by score under the cap is. Exact by the same
    bounds: the first block's capped list gives a ``k``-th score ``t``, and the capped list over
    the catalog takes, place by place, items at least as good (taking the best allowed item each
    time is optimal under a cap per category, a matroid), so no item below ``t`` enters it. No
    ids come back when the first block cannot fill the list under the cap (few categories, a
    narrow filter): the caller then lays the list out the long way.
    """
    square = _square(vector)
    if not np.isfinite(square) or k <= 0:
        return np.empty(0, np.int64), np.empty(0, np.float32), 0
    head = np.dot(factors[:first], vector)
    (ids, scores, _), scanned = _search(
        head,
        factors,
        order,
        neg_bound,
        directions,
        projected_t,
        residual,
        levels,
        level_scale,
        level_norm,
        level_error,
        vector,
        square,
        k,
        first,
        blocked,
        disallowed,
        slack,
        codes,
        cap,
        n_codes,
    )
    return ids, scores, scanned


@njit(cache=True)
def search_beyond(
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
    more: int,
    more_disallowed: np.ndarray,
    more_allowed: np.ndarray = NO_POSITIONS,
    listed: bool = False,
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]:
    """:func:`search_one`, and in the same pass the best ``more`` items that ``more_disallowed``
    allows (a mask over positions) and that are neither blocked nor in its answer: the answer
    of a second :func:`search_one` for ``more`` items with the answer's positions blocked too,
    found from the same first block of scores (one read of the longest items, one call).
    ``more_disallowed`` must disallow every position ``disallowed`` does (a filter within the
    query's). With ``listed``, ``more_allowed`` holds the positions that filter allows (sorted)
    and the second search visits only those (:func:`_search_listed`): the same answer, for a
    filter that lets a small share of the catalog through, without a pass over the others."""
    none = (np.empty(0, np.int64), np.empty(0, np.float32))
    square = _square(vector)
    if not np.isfinite(square):
        return none[0], none[1], 0, none[0], none[1]
    head = np.dot(factors[:first], vector)
    spare = head.copy()  # unmasked: the second search masks its own
    ids, scores, positions = np.empty(0, np.int64), np.empty(0, np.float32), blocked[:0]
    scanned = 0
    if k > 0:
        (ids, scores, positions), scanned = _search(
            head,
            factors,
            order,
            neg_bound,
            directions,
            projected_t,
            residual,
            levels,
            level_scale,
            level_norm,
            level_error,
            vector,
            square,
            k,
            first,
            blocked,
            disallowed,
            slack,
        )
    if more <= 0:
        return ids, scores, scanned, none[0], none[1]
    beyond = np.concatenate((blocked, positions))
    beyond.sort()
    if listed:
        more_ids, more_scores = _search_listed(
            spare,
            factors,
            order,
            neg_bound,
            directions,
            projected_t,
            residual,
            levels,
            level_scale,
            level_norm,
            level_error,
            vector,
            square,
            more,
            first,
            beyond,
            more_allowed,
            slack,
        )
        return ids, scores, scanned, more_ids, more_scores
    (more_ids, more_scores, _), _ = _search(
        spare,
        factors,
        order,
        neg_bound,
        directions,
        projected_t,
        residual,
        levels,
        level_scale,
        level_norm,
        level_error,
        vector,
        square,
        more,
        first,
        beyond,
        more_disallowed,
        slack,
    )
    return ids, scores, scanned, more_ids, more_scores


@njit(cache=True)
def _square(vector: np.ndarray) -> float:
    """The squared length of ``vector``, in float64."""
    square = 0.0
    for j in range(len(vector)):
        square += np.float64(vector[j]) * np.float64(vector[j])
    return square


@njit(cache=True)
def _search(
    head: np.ndarray,
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
    square: float,
    k: int,
    first: int,
    blocked: np.ndarray,
    disallowed: np.ndarray,
    slack: float,
    codes: np.ndarray = NO_POSITIONS,
    cap: int = 0,
    n_codes: int = 0,
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], int]:
    """The search of :func:`search_one` from the first block's scores ``head`` (overwritten):
    (ids, scores, positions) and the positions examined. ``k > 0`` and ``square`` (the
    vector's squared length) finite. With ``cap > 0`` the answer is the capped one of
    :func:`search_one` under a cap (``codes``: each position's category number below ``n_codes``, -1
    for none), or nothing when the first block cannot fill ``k`` places under the cap."""
    n, f = factors.shape
    neg_inf = -np.inf
    length = np.sqrt(square)
    filtered = len(disallowed) > 0
    n_blocked = len(blocked)

    # Step 1: the first block of longest items gives the k-th best score so far.
    _mask(head, 0, blocked, disallowed)
    floors = NO_FLOORS
    if cap > 0:
        threshold, floors = _capped_kth(head, codes, cap, k, n_codes)
        if threshold == neg_inf:
            return (blocked[:0], head[:0], blocked[:0]), first
        for p in range(first):  # the first block's items under their category's floor
            if codes[p] >= 0 and head[p] < floors[codes[p]]:
                head[p] = neg_inf
    else:
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
        # The bound holds whatever the sign of the threshold: a list that reaches into items
        # the user scores below zero (a category cap's deeper fetch) still skips most of them.
        projected = d == PROJECTED and threshold > -np.inf
        bounds = np.empty(0, np.float32)
        limit = np.float32(0.0)
        floor_limits = np.empty(0, np.float32)
        if projected:
            u = vector.astype(np.float64)
            up = np.zeros(PROJECTED)
            for a in range(PROJECTED):
                for j in range(f):
                    up[a] += directions[a, j] * u[j]
            u_perp = np.float32(np.sqrt(max(square - np.dot(up, up), 0.0)))
            margin = slack * length * -neg_bound[first]
            limit = np.float32(threshold - margin)
            floor_limits = (floors - margin).astype(np.float32)
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
            if len(floor_limits) and codes[p] >= 0 and bounds[i] < floor_limits[codes[p]]:
                continue
            if filtered and disallowed[p]:
                continue
            while b < n_blocked and blocked[b] < p:
                b += 1
            if b < n_blocked and blocked[b] == p:
                continue
            candidates[m] = p
            m += 1
        scanned = first + (m if projected else stop - first)

        tail, tail_pos = _screened(
            candidates[:m],
            factors,
            levels,
            level_scale,
            level_norm,
            level_error,
            vector,
            length,
            threshold,
            codes,
            floors,
        )

    if cap > 0:
        return (
            _ranked_capped(head, tail, tail_pos, order, threshold, k, codes, cap, n_codes),
            scanned,
        )
    return _ranked(head, tail, tail_pos, order, threshold, k), scanned


@njit(cache=True)
def greedy_capped(
    positions: np.ndarray, codes: np.ndarray, cap: int, k: int, counts: np.ndarray
) -> np.ndarray:
    """The rows of ``positions`` (best first) that a list under a category cap takes: each in
    turn unless ``cap`` of its category (``codes`` by position; -1: none, never capped) are
    in already, until ``k`` are."""
    counts[:] = 0
    taken = np.empty(min(k, len(positions)), np.int64)
    t = 0
    for r in range(len(positions)):
        if t == len(taken):
            break
        code = codes[positions[r]]
        if code >= 0:
            if counts[code] >= cap:
                continue
            counts[code] += 1
        taken[t] = r
        t += 1
    return taken[:t]


@njit(cache=True)
def _capped_kth(
    scores: np.ndarray, codes: np.ndarray, cap: int, k: int, n_codes: int
) -> tuple[float, np.ndarray]:
    """From the first block's ``scores`` (positions ``0:len(scores)``, ``-inf`` for blocked and
    filtered ones): the ``k``-th score of the list a category cap lets through, ``-inf`` when
    the block cannot fill ``k`` places, and each category's floor, the ``cap``-th best score
    in it (``-inf`` where it has fewer).

    A list taken by score under a cap holds each category's best ``cap`` items at most, so
    its ``k`` items are the best ``k`` of those and of the items without a category: one pass
    keeps the best ``cap`` per category, then one selection. The ``k``-th score is a lower
    bound on that of the capped list over the whole catalog, and no item scoring below its
    category's floor can enter that list (that many of its category come before it)."""
    best = np.full((max(n_codes, 1), cap), -np.inf)  # per category, its best so far, descending
    loose = np.empty(len(scores), np.float64)  # the scores of items without a category
    u = 0
    for p in range(len(scores)):
        x = np.float64(scores[p])
        if x == -np.inf:
            continue
        c = codes[p]
        if c < 0:
            loose[u] = x
            u += 1
            continue
        if x <= best[c, cap - 1]:
            continue
        i = cap - 1
        while i > 0 and best[c, i - 1] < x:
            best[c, i] = best[c, i - 1]
            i -= 1
        best[c, i] = x
    union = np.concatenate((best.ravel(), loose[:u]))
    threshold = _kth_largest(union, k) if len(union) >= k else -np.inf
    return threshold, best[:n_codes, cap - 1].copy()


@njit(cache=True)
def _ranked_capped(
    head: np.ndarray,
    tail: np.ndarray,
    tail_pos: np.ndarray,
    order: np.ndarray,
    threshold: float,
    k: int,
    codes: np.ndarray,
    cap: int,
    n_codes: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_ranked` under a category cap: every score that reaches ``threshold`` ranked,
    then taken in that order by :func:`greedy_capped`."""
    ids, scores, positions = _ranked(head, tail, tail_pos, order, threshold, len(head) + len(tail))
    counts = np.zeros(max(n_codes, 1), np.int64)
    taken = greedy_capped(positions, codes, cap, k, counts)
    return ids[taken], scores[taken], positions[taken]


@njit(cache=True)
def _screened(
    candidates: np.ndarray,
    factors: np.ndarray,
    levels: np.ndarray,
    level_scale: np.ndarray,
    level_norm: np.ndarray,
    level_error: np.ndarray,
    vector: np.ndarray,
    length: float,
    threshold: float,
    codes: np.ndarray,
    floors: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Step 3 of a search: an int8 screen of the ``candidates`` (positions, overwritten). Each
    one's score from the int8 rows, plus a bound on its error (the query's and the row's
    rounding, and the float32 margin), must reach the threshold (and under a cap its
    category's floor, ``floors[codes[p]]``; no floors: empty); only those few rows are read in
    float32 and scored exactly. Their exact scores and positions."""
    f = factors.shape[1]
    query, query_scale, query_error = _quantized(vector)
    # Levels are within +-127, so each product fits 16 bits exactly: the compiler then
    # multiplies twice as many lanes at once as with 32-bit products (the sum is 32-bit).
    query16 = query.astype(np.int16)
    kept = 0
    for i in range(len(candidates)):
        p = candidates[i]
        row = levels[p]
        dot = np.int32(0)
        for j in range(f):
            dot += np.int32(np.int16(row[j]) * query16[j])
        upper = query_scale * np.float64(level_scale[p]) * dot
        upper += query_error * np.float64(level_norm[p]) + length * np.float64(level_error[p])
        cut = threshold
        if len(floors) and codes[p] >= 0 and floors[codes[p]] > cut:
            cut = floors[codes[p]]
        if upper >= cut:
            candidates[kept] = p
            kept += 1
    if not kept:
        return np.empty(0, np.float32), candidates[:0]
    rows = np.empty((kept, f), np.float32)
    for i in range(kept):
        rows[i] = factors[candidates[i]]
    return np.dot(rows, vector), candidates[:kept]


@njit(cache=True)
def _search_listed(
    head: np.ndarray,
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
    square: float,
    k: int,
    first: int,
    blocked: np.ndarray,
    allowed: np.ndarray,
    slack: float,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_search` over the positions ``allowed`` only (sorted; a filter as the list of
    what it lets through instead of a mask), from the first block's scores ``head`` (left
    as they are): the same steps and bounds, so the same exact answer (ids and scores), with
    work in proportion to the allowed positions instead of the catalog."""
    n, f = factors.shape
    length = np.sqrt(square)
    n_blocked = len(blocked)
    split = np.searchsorted(allowed, first)
    # Step 1: the allowed positions of the first block, blocked ones left out.
    found_pos = np.empty(len(allowed), np.int64)
    found = np.empty(len(allowed), np.float32)
    m = 0
    b = 0
    for i in range(split):
        p = allowed[i]
        while b < n_blocked and blocked[b] < p:
            b += 1
        if b < n_blocked and blocked[b] == p:
            continue
        found_pos[m] = p
        found[m] = head[p]
        m += 1
    threshold = _kth_largest(found[:m], k) if m >= k else -np.inf
    if threshold == -np.inf or threshold <= 0.0:
        stop = n
    elif length == 0.0:
        stop = first
    else:
        stop = max(int(np.searchsorted(neg_bound, -threshold / length, side="right")), first)
    # Step 2: the allowed positions first:stop whose projection bound reaches the threshold.
    candidates = np.empty(len(allowed) - split, np.int64)
    c = 0
    projected = directions.shape[0] == PROJECTED and threshold > -np.inf and split < len(allowed)
    up = np.zeros(PROJECTED)
    u_perp = 0.0
    limit = 0.0
    if projected:
        for a in range(PROJECTED):
            for j in range(f):
                up[a] += directions[a, j] * np.float64(vector[j])
        u_perp = np.sqrt(max(square - np.dot(up, up), 0.0))
        limit = threshold - slack * length * -neg_bound[first]
    for i in range(split, len(allowed)):
        p = allowed[i]
        if p >= stop:
            break
        if projected:
            bound = u_perp * residual[p]
            for a in range(PROJECTED):
                bound += up[a] * projected_t[a, p]
            if bound < limit:
                continue
        while b < n_blocked and blocked[b] < p:
            b += 1
        if b < n_blocked and blocked[b] == p:
            continue
        candidates[c] = p
        c += 1
    tail, tail_pos = _screened(
        candidates[:c],
        factors,
        levels,
        level_scale,
        level_norm,
        level_error,
        vector,
        length,
        threshold,
        NO_POSITIONS,
        NO_FLOORS,
    )
    scores = np.concatenate((found[:m], tail))
    positions = np.concatenate((found_pos[:m], tail_pos))
    ids, scores, _ = _ranked(head[:0], scores, positions, order, threshold, k)
    return ids, scores


# ------------------------------------------------------- the pipeline's per-list loops
SHORT_SORT = 64
"""Lists up to this long are sorted by insertion (no allocations; they often come sorted)."""


@njit(cache=True)
def _before(score: float, item: int, other_score: float, other_item: int) -> bool:
    """Whether an item goes before another by the top-k rule: higher score, then lower index
    (NaN scores last), as ``np.lexsort((ids, -scores))`` orders them."""
    if np.isnan(score):
        return np.isnan(other_score) and item < other_item
    if np.isnan(other_score):
        return True
    return score > other_score or (score == other_score and item < other_item)


@njit(cache=True)
def _sort_by_score(ids: np.ndarray, scores: np.ndarray) -> None:
    """Sort ``ids`` and ``scores`` (aligned) in place by the top-k rule, stably, by insertion:
    for short lists (:data:`SHORT_SORT`)."""
    for i in range(1, len(ids)):
        item, score = ids[i], scores[i]
        j = i
        while j > 0 and _before(score, item, scores[j - 1], ids[j - 1]):
            ids[j], scores[j] = ids[j - 1], scores[j - 1]
            j -= 1
        ids[j], scores[j] = item, score


@njit(cache=True)
def by_score(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` of ``ids`` and their ``scores`` by the top-k rule: score, then lowest
    item index (``np.lexsort((ids, -scores))``: stable, NaN scores last)."""
    if len(ids) > SHORT_SORT:
        by_id = np.argsort(ids, kind="mergesort")
        rank = by_id[np.argsort(-scores[by_id], kind="mergesort")][:k]
        return ids[rank], scores[rank]
    out_ids, out_scores = ids.copy(), scores.copy()
    _sort_by_score(out_ids, out_scores)
    return out_ids[:k], out_scores[:k]


@njit(cache=True)
def claim_reasons(
    reasons: np.ndarray, ids: np.ndarray, claimed_ids: np.ndarray, codes: np.ndarray
) -> bool:
    """Write into ``reasons`` (aligned with ``ids``) the non-zero codes one stage claimed for
    ``claimed_ids``, over what earlier stages claimed; whether it claimed any. What the
    re-ranking stages of one list claimed (see :class:`models.ranking.RerankStage`)."""
    order = np.argsort(ids)
    keys = ids[order]
    any_claim = False
    for j in range(len(claimed_ids)):
        code = codes[j]
        if code == 0:
            continue
        any_claim = True
        i = np.searchsorted(keys, claimed_ids[j])
        while i < len(keys) and keys[i] == claimed_ids[j]:
            reasons[order[i]] = code
            i += 1
    return any_claim


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
    index = (
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
    )
    blocked = np.zeros(0, np.int64)
    for disallowed in (NO_FILTER, frozen):
        search_one(*index, factors[0].copy(), 2, 2, blocked, disallowed, 1e-4)
    # A rule's filter within the request's: a mask of its own, or none when neither excludes.
    for disallowed, more_disallowed in (
        (NO_FILTER, frozen),
        (frozen, frozen),
        (NO_FILTER, NO_FILTER),
    ):
        listed_positions = np.flatnonzero(~more_disallowed)
        listed_positions.setflags(write=False)  # as the pipeline keeps them
        for allowed, listed in ((NO_POSITIONS, False), (listed_positions, True)):
            search_beyond(
                *index,
                factors[0].copy(),
                2,
                2,
                blocked,
                disallowed,
                1e-4,
                2,
                more_disallowed,
                allowed,
                listed,
            )
    codes = np.array([0, 1, -1, 0, 1, 2, 2, -1], np.int64)
    codes.setflags(write=False)  # as the pipeline keeps them
    for disallowed in (NO_FILTER, frozen):
        search_one(*index, factors[0].copy(), 2, 2, blocked, disallowed, 1e-4, codes, 1, 3)
    ids, scores = np.array([2, 1], np.int64), np.array([0.5, 0.5], np.float32)
    claim_reasons(np.zeros(2, np.uint8), ids, ids, np.ones(2, np.uint8))
    by_score(ids, scores, 2)
