"""models/audience.py: every model's audience scores equal the mean of its own item scores, the
top-N rule, categories and the interacted mask, on hand-checked matrices."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from models.algorithms import get_algorithm
from models.audience import (
    BASIS_ACTIVITY,
    BASIS_CATALOG,
    BASIS_FACTORS,
    BASIS_ITEM_WEIGHTS,
    category_items,
    interacted,
    score_users,
    top_users,
)
from models.errors import InvalidInputError


@pytest.fixture(scope="module")
def matrix() -> sp.csr_matrix:
    rng = np.random.default_rng(3)
    dense = (rng.random((50, 30)) < 0.2).astype(np.float32) * rng.integers(1, 4, (50, 30))
    return sp.csr_matrix(dense.astype(np.float32))


@pytest.mark.parametrize(
    ("algorithm", "params", "basis"),
    [
        ("als", {"factors": 8, "iterations": 3, "random_state": 0}, BASIS_FACTORS),
        ("bpr", {"factors": 8, "iterations": 3, "random_state": 0}, BASIS_FACTORS),
        ("ease", {}, BASIS_ITEM_WEIGHTS),
        ("ease", {"binary": False}, BASIS_ITEM_WEIGHTS),
        ("itemknn", {"K": 5}, BASIS_ITEM_WEIGHTS),
        ("gfcf", {"form": "factored", "factors": 4}, BASIS_CATALOG),
    ],
)
def test_scores_are_the_mean_of_the_models_own_item_scores(
    matrix: sp.csr_matrix, algorithm: str, params: dict[str, object], basis: str
) -> None:
    with threadpool_limits(1, "blas"):
        model = get_algorithm(algorithm)(**params).fit(matrix)  # type: ignore[arg-type]
    items = [3, 7, 7, 11]  # a repeat counts once
    got = score_users(model, matrix, items, chunk=7)  # chunks that do not divide 50
    full = model.score_users(np.arange(50), matrix)
    assert got.basis == basis and got.scores.dtype == np.float32
    np.testing.assert_allclose(got.scores, full[:, [3, 7, 11]].mean(axis=1), rtol=1e-4, atol=1e-5)


def test_popularity_ranks_users_by_activity(matrix: sp.csr_matrix) -> None:
    model = get_algorithm("popularity")().fit(matrix)
    got = score_users(model, matrix, [0])
    assert got.basis == BASIS_ACTIVITY
    np.testing.assert_array_equal(got.scores, np.diff(matrix.indptr))


def test_top_users_best_first_ties_by_lower_index_within_the_mask() -> None:
    scores = np.array([0.5, 0.9, 0.9, 0.1, np.nan, 0.9, 0.7], dtype=np.float32)
    ids, best = top_users(scores, 3)
    assert ids.tolist() == [1, 2, 5] and best.tolist() == pytest.approx([0.9, 0.9, 0.9])
    mask = np.array([True, False, True, True, True, False, True])
    ids, best = top_users(scores, 10, mask)
    assert ids.tolist() == [2, 6, 0, 3]  # the NaN user never enters; fewer than asked
    assert best.tolist() == pytest.approx([0.9, 0.7, 0.5, 0.1])
    assert top_users(scores, 2, np.zeros(7, bool))[0].tolist() == []
    with pytest.raises(InvalidInputError):
        top_users(scores, 0)


def test_category_items_and_interacted() -> None:
    category = np.array(["a", "b", "a", "b", "b"])
    available = np.array([True, True, True, False, True])
    assert category_items(category, available, "b").tolist() == [1, 4]
    with pytest.raises(InvalidInputError) as info:
        category_items(category, available, "c")
    assert info.value.field == "category"
    with pytest.raises(InvalidInputError):
        category_items(category, np.array([True, False, True, False, False]), "b")
    seen = sp.csr_matrix(np.array([[1, 0, 0], [0, 2, 0], [0, 0, 0], [1, 0, 3]], np.float32))
    assert interacted(seen, [2]).tolist() == [False, False, False, True]
    assert interacted(seen, [0, 1]).tolist() == [True, True, False, True]


def test_unknown_item_indices_are_refused(matrix: sp.csr_matrix) -> None:
    model = get_algorithm("popularity")().fit(matrix)
    for items in ([], [30], [-1]):
        with pytest.raises(InvalidInputError) as info:
            score_users(model, matrix, items)
        assert info.value.field == "item_ids"
