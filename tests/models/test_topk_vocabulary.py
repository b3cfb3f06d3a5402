"""Top-k selection and id vocabularies: the two primitives every query goes through.

:mod:`models.topk` has three implementations of one rule (the ``k`` highest scores, best first,
equal scores by lowest item index, ``-inf`` never returned); they must give the same ids for any
row, ties at the ``k``-th place included, or a list ranked in a batch would differ from the same
list ranked alone.
"""

from __future__ import annotations

import numpy as np
import pytest

import models.topk as topk_module
from models.errors import InvalidInputError, NotFoundError
from models.topk import (
    MIN_BLOCKED_ROW,
    NEG_INF,
    ROW_BLOCK,
    TOPK_BLOCK,
    top_k_ids,
    top_k_row,
    topk,
)
from models.vocabulary import MISSING, Vocabulary


def by_the_rule(row: np.ndarray, k: int) -> list[int]:
    """The rule, by a full sort: score descending, then item index; -inf gives -1."""
    order = np.lexsort((np.arange(len(row)), -row))[:k]
    return [int(i) if row[i] > NEG_INF else -1 for i in order]


def all_three(scores: np.ndarray, k: int) -> list[list[int]]:
    """``topk``'s ids per row, after checking ``top_k_ids`` and ``top_k_row`` agree with it."""
    ids, top = topk(scores, k)
    np.testing.assert_array_equal(top_k_ids(scores, k), ids)
    for row, want_ids, want_top in zip(scores, ids, top, strict=True):
        got_ids, got_top = top_k_row(row.copy(), k)
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_array_equal(got_top, want_top)
    return ids.tolist()


def test_topk_orders_best_first_and_breaks_ties_by_index() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.9, -1.0]], dtype=np.float32)
    ids, top = topk(scores, 3)
    assert ids.tolist() == [[1, 3, 2]]
    assert top[0].tolist() == pytest.approx([0.9, 0.9, 0.5])


def test_topk_marks_missing_candidates() -> None:
    scores = np.array([[-np.inf, 2.0, -np.inf]], dtype=np.float32)
    ids, top = topk(scores, 3)
    assert ids.tolist() == [[1, -1, -1]]
    assert np.isneginf(top[0, 1:]).all()


def test_topk_matches_full_sort_on_random_rows() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((4, 1000)).astype(np.float32)
    ids, _ = topk(scores, 10)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    assert (ids == expected).all()


# Row lengths that take each function's plain path, and (for k up to 8) its block-maxima path.
SMALL, LARGE = 12, 8 * MIN_BLOCKED_ROW + 5


def test_long_rows_take_the_block_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tie tests below exercise the fast paths, not only the full partitions they replace."""
    assert LARGE // TOPK_BLOCK >= 8 and LARGE // ROW_BLOCK >= 4 * 8
    ranked: list[int] = []
    exact, full = topk_module._top_k_exact, topk_module.topk
    monkeypatch.setattr(
        topk_module, "_top_k_exact", lambda s, k: ranked.append(len(s)) or exact(s, k)
    )
    monkeypatch.setattr(topk_module, "topk", lambda s, k: ranked.append(-1) or full(s, k))
    row = np.zeros(LARGE, dtype=np.float32)
    row[[5, 900, 7000]] = 1.0  # a tie at the 2nd place
    assert top_k_ids(row[None, :], 2).tolist() == [[5, 900]]
    assert top_k_row(row, 2)[0].tolist() == [5, 900]
    assert ranked and all(0 < n < LARGE for n in ranked), ranked


@pytest.mark.parametrize("n", [SMALL, LARGE])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_a_tie_at_the_kth_place_goes_to_the_lowest_indices(n: int, k: int) -> None:
    rng = np.random.default_rng(n + k)
    row = rng.uniform(0.0, 1.0, n).astype(np.float32)
    # k - 1 clear winners, then the k-th place tied among items spread over the row (the lowest
    # of them not first, so a partition's arbitrary pick would show).
    tied = np.sort(rng.choice(n, size=min(6, n - k), replace=False))
    winners = rng.choice(np.setdiff1d(np.arange(n), tied), size=k - 1, replace=False)
    row[tied] = 1.5
    row[winners] = 2.0 + np.arange(k - 1, dtype=np.float32)
    scores = np.stack([row, row[::-1].copy()])
    got = all_three(scores, k)
    assert got == [by_the_rule(r, k) for r in scores]
    assert got[0][-1] == tied[0]
    assert got[1][-1] == n - 1 - tied[-1]


@pytest.mark.parametrize("n", [SMALL, LARGE])
def test_equal_scores_everywhere_give_the_first_k_items(n: int) -> None:
    scores = np.zeros((3, n), dtype=np.float32)
    scores[1, :4] = NEG_INF  # the first items filtered out: the next ones come instead
    scores[2, ::2] = NEG_INF
    assert all_three(scores, 5) == [
        [0, 1, 2, 3, 4],
        [4, 5, 6, 7, 8],
        [1, 3, 5, 7, 9],
    ]


@pytest.mark.parametrize("n", [SMALL, LARGE])
def test_fewer_finite_scores_than_k_are_ranked_then_marked_missing(n: int) -> None:
    scores = np.full((1, n), NEG_INF, dtype=np.float32)
    scores[0, [n - 1, 2, 7]] = [0.5, 0.5, 0.9]
    assert all_three(scores, 5) == [[7, 2, n - 1, -1, -1]]


def test_the_three_agree_on_many_ties_at_random() -> None:
    rng = np.random.default_rng(0)
    for n in (SMALL, 300, MIN_BLOCKED_ROW, LARGE):
        scores = np.round(rng.standard_normal((6, n)), 1).astype(np.float32)  # many ties
        scores[rng.random(scores.shape) < 0.3] = NEG_INF
        for k in (1, 4, 8):
            assert all_three(scores, k) == [by_the_rule(r, k) for r in scores]


def test_vocabulary_round_trip_and_unknown_ids() -> None:
    vocab = Vocabulary(["u1", "u2", "u3"], kind="user")
    assert vocab.index("u2") == 1
    assert vocab.lookup(["u3", "nobody"]).tolist() == [2, MISSING]
    assert vocab.decode(np.array([2, 0])) == ["u3", "u1"]
    with pytest.raises(NotFoundError, match="unknown user id 'nobody'"):
        vocab.index("nobody")
    assert Vocabulary.from_array(vocab.to_array(), kind="user").ids.tolist() == ["u1", "u2", "u3"]


def test_vocabulary_rejects_duplicates() -> None:
    with pytest.raises(InvalidInputError, match="unique"):
        Vocabulary(["a", "a"])
