"""Exact top-k selection: the one rule every list Affinity makes is ranked by.

The rule: the ``k`` highest scores, best first; equal scores by ascending item index; an item
scoring ``-inf`` (filtered out) is never returned. Each function here returns exactly the ids
that rule gives, whatever the ties, so a list ranked one user at a time (serving) and one
ranked in a batch (evaluation) are the same list. None of them sorts a whole row: a partition
finds the ``k``-th score and only the items reaching it are sorted.
"""

from __future__ import annotations

import numpy as np

NEG_INF = np.float32(-np.inf)

TOPK_BLOCK = 64
"""Columns per block in :func:`top_k_ids`' first pass (block maxima bound the k-th score)."""
ROW_BLOCK = 128
"""Width of the blocks whose maxima :func:`top_k_row` scans before looking at single scores."""
MIN_BLOCKED_ROW = 8 * ROW_BLOCK
"""Rows shorter than this are ranked by a plain partition: block maxima only pay on long rows."""


def topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` columns of each row of ``scores`` by the module's rule, and their scores.

    Slots without a candidate (fewer than ``k`` finite scores) hold id ``-1`` and score ``-inf``,
    so callers can tell "fewer than k candidates" from real results.
    """
    scores = np.atleast_2d(scores)
    n_rows, n_cols = scores.shape
    k = min(k, n_cols)
    if k <= 0:
        return np.empty((n_rows, 0), np.int64), np.empty((n_rows, 0), np.float32)
    if k < n_cols:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        part_scores = np.take_along_axis(scores, part, axis=1)
        # The partition picks arbitrarily among items tied with the k-th score: rows where more
        # items reach it than there are places are ranked by a full sort instead.
        kth = part_scores.min(axis=1)
        # (A -inf k-th score ties only items that are never returned.)
        tied = np.flatnonzero(((scores >= kth[:, None]).sum(axis=1) > k) & (kth > NEG_INF))
        for row in tied:
            order = np.lexsort((np.arange(n_cols), -scores[row]))[:k]
            part[row], part_scores[row] = order, scores[row, order]
    else:
        part = np.broadcast_to(np.arange(n_cols), (n_rows, n_cols)).copy()
        part_scores = scores.copy()
    order = np.lexsort((part, -part_scores), axis=1)
    ids = np.take_along_axis(part, order, axis=1).astype(np.int64)
    top = np.take_along_axis(part_scores, order, axis=1).astype(np.float32)
    invalid = ~np.isfinite(top) & (top < 0)
    ids[invalid] = -1
    return ids, top


def top_k_ids(scores: np.ndarray, k: int) -> np.ndarray:
    """The ids :func:`topk` returns for ``scores``, without a full partition per row.

    The ``k``-th largest of a row's block maxima (blocks of :data:`TOPK_BLOCK` columns) is a lower
    bound on the row's ``k``-th largest score, so only the few blocks whose maximum reaches it
    hold candidates: one pass over the matrix instead of an ``argpartition`` of every row. Rows
    whose ``k``-th and ``k+1``-th scores tie and rows with fewer than ``k`` finite scores go
    through :func:`topk` itself, so the result is the same array in every case.
    """
    scores = np.atleast_2d(scores)
    n_rows, n_cols = scores.shape
    n_full = n_cols // TOPK_BLOCK
    n_blocks = -(-n_cols // TOPK_BLOCK)
    if n_rows == 0 or k <= 0 or n_full < max(k, 4):
        return topk(scores, k)[0]
    block_max = np.empty((n_rows, n_blocks), dtype=scores.dtype)
    full = scores[:, : n_full * TOPK_BLOCK].reshape(n_rows, n_full, TOPK_BLOCK)
    block_max[:, :n_full] = full.max(axis=2)
    if n_blocks > n_full:
        block_max[:, n_full] = scores[:, n_full * TOPK_BLOCK :].max(axis=1)
    bound = np.partition(block_max, n_blocks - k, axis=1)[:, n_blocks - k]
    fast = bound > NEG_INF  # a -inf bound would make every entry a candidate
    # Candidate entries: those reaching the bound in the blocks whose maximum reaches it.
    cand_row, cand_block = np.nonzero((block_max >= bound[:, None]) & fast[:, None])
    cols = cand_block[:, None] * TOPK_BLOCK + np.arange(TOPK_BLOCK)
    inside = cols < n_cols
    cols = np.minimum(cols, n_cols - 1)
    rows = np.broadcast_to(cand_row[:, None], cols.shape)
    values = scores[rows, cols]
    keep = inside & (values >= bound[cand_row, None])
    rows, cols, values = rows[keep], cols[keep], values[keep]
    order = np.lexsort((cols, -values, rows))
    rows, cols, values = rows[order], cols[order], values[order]
    counts = np.bincount(rows, minlength=n_rows)
    starts = np.cumsum(counts) - counts
    ids = np.full((n_rows, k), -1, dtype=np.int64)
    picked = np.flatnonzero(fast)
    ids[picked] = cols[starts[picked, None] + np.arange(k)]
    # Candidates are sorted by (score desc, id asc), so a tie at the k-th place is already
    # broken by the rule; only rows without a finite bound need the general path.
    slow = np.flatnonzero(~fast)
    if len(slow):
        ids[slow] = topk(scores[slow], k)[0]
    return ids


def top_k_row(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` entries of the 1-d ``scores`` (finite or ``-inf``), as :func:`topk` of one row.

    The row is viewed as ``ROW_BLOCK`` strided slices of length ``m``; the element-wise maximum
    over them is each column's block maximum. If ``t`` is the k-th largest block maximum, ``k``
    distinct items score at least ``t``, so every item of the true top k lies in a column whose
    maximum is ``>= t``: only those columns (about ``k x ROW_BLOCK`` items) are ranked exactly.
    """
    n = len(scores)
    m = n // ROW_BLOCK
    if n < MIN_BLOCKED_ROW or k * 4 > m:
        return _top_k_exact(scores, k)
    maxima = scores[: m * ROW_BLOCK].reshape(ROW_BLOCK, m).max(axis=0)
    threshold = np.partition(maxima, m - k)[m - k]
    columns = np.flatnonzero(maxima >= threshold)
    # Row-major over (slice, column) with columns ascending: the candidate ids come out sorted,
    # so ranking them by (score, position) is ranking them by (score, id).
    candidates = (columns[None, :] + m * np.arange(ROW_BLOCK)[:, None]).ravel()
    candidates = np.concatenate([candidates, np.arange(m * ROW_BLOCK, n)])
    candidates.sort()
    ids, top = _top_k_exact(scores[candidates], k)
    found = ids >= 0
    ids[found] = candidates[ids[found]]
    return ids, top


def _top_k_exact(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`topk` of one row, without the 2-d bookkeeping (this runs once per request)."""
    n = len(scores)
    k = min(k, n)
    if k <= 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    kth = np.partition(scores, n - k)[n - k] if k < n else NEG_INF
    # Every item reaching the k-th score competes, so ties are broken by id, not by the
    # partition's arbitrary choice; with fewer than k finite scores, the finite ones do.
    part = np.flatnonzero(scores >= kth) if kth > NEG_INF else np.flatnonzero(scores > NEG_INF)
    top = scores[part]
    order = np.lexsort((part, -top))[:k]
    ids = np.full(k, -1, dtype=np.int64)
    best = np.full(k, NEG_INF, dtype=np.float32)
    ids[: len(order)] = part[order]
    best[: len(order)] = top[order]
    return ids, best
