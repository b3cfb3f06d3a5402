"""The contract every registered algorithm honours, plus the few algorithm-specific promises.

Each algorithm is fitted once on the synthetic two-cluster data (see ``conftest.py``); the shared
tests check the public ``Recommender`` API the training pipeline and the service rely on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares

from models.base import Recommender
from models.ease import EASE, estimate_memory_gb
from models.errors import InvalidInputError, ModelTooLargeError, NotReadyError
from models.factorization import ALS
from models.neighbors import ItemKNN
from models.registry import algorithm_names, get_algorithm
from tests.models.conftest import NON_PERSONALIZED, TEST_PARAMS, Synthetic

ALGORITHMS = algorithm_names()
PERSONALIZED = [name for name in ALGORITHMS if name not in NON_PERSONALIZED]

Fitted = Callable[[str], Recommender]


def seen_sets(matrix: sp.csr_matrix, users: np.ndarray) -> list[set[int]]:
    return [set(matrix[u].indices.tolist()) for u in users]


def test_every_algorithm_is_tested() -> None:
    assert set(ALGORITHMS) == set(TEST_PARAMS) | NON_PERSONALIZED


# --------------------------------------------------------------------------- shared contract
@pytest.mark.parametrize("name", ALGORITHMS)
def test_fit_returns_self_and_records_shape(name: str, synthetic: Synthetic) -> None:
    model = get_algorithm(name)(**TEST_PARAMS.get(name, {}))
    assert not model.is_fitted
    assert model.fit(synthetic.user_items) is model
    assert model.is_fitted
    assert (model.n_users, model.n_items) == (synthetic.n_users, synthetic.n_items)
    scores = model.score_users(np.array([0, 3]), synthetic.user_items[[0, 3]])
    assert scores.shape == (2, synthetic.n_items)
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("name", ALGORITHMS)
def test_batch_recommend_is_best_first_and_skips_seen(
    name: str, fitted: Fitted, synthetic: Synthetic
) -> None:
    model = fitted(name)
    users = np.arange(0, 40, 3)
    ids, scores = model.recommend(users, synthetic.user_items, N=7)
    assert ids.shape == scores.shape == (len(users), 7)
    assert (np.diff(scores, axis=1) <= 0).all()
    for row, seen in zip(ids, seen_sets(synthetic.user_items, users), strict=True):
        assert len(set(row.tolist())) == 7
        assert not seen & set(row.tolist())


@pytest.mark.parametrize("name", ALGORITHMS)
def test_recommend_accepts_only_the_users_rows(
    name: str, fitted: Fitted, synthetic: Synthetic
) -> None:
    model = fitted(name)
    users = np.array([5, 1, 8])
    full = model.recommend(users, synthetic.user_items, N=5)
    own = model.recommend(users, synthetic.user_items[users], N=5)
    np.testing.assert_array_equal(full[0], own[0])
    np.testing.assert_allclose(full[1], own[1], rtol=1e-5)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_seen_items_come_back_when_not_filtered(
    name: str, fitted: Fitted, synthetic: Synthetic
) -> None:
    model = fitted(name)
    users = np.arange(20)
    ids, _ = model.recommend(users, synthetic.user_items, N=5, filter_already_liked_items=False)
    seen = seen_sets(synthetic.user_items, users)
    assert any(set(row.tolist()) & s for row, s in zip(ids, seen, strict=True))


@pytest.mark.parametrize("name", ALGORITHMS)
def test_allow_list_and_deny_list(name: str, fitted: Fitted, synthetic: Synthetic) -> None:
    model = fitted(name)
    users = np.arange(6)
    allowed = np.arange(0, synthetic.n_items, 4)
    ids, scores = model.recommend(users, synthetic.user_items, N=len(allowed) + 3, items=allowed)
    for row, row_scores, seen in zip(
        ids, scores, seen_sets(synthetic.user_items, users), strict=True
    ):
        real = row[row >= 0]
        assert set(real.tolist()) == set(allowed.tolist()) - seen
        assert np.isneginf(row_scores[row < 0]).all()

    top, _ = model.recommend(users, synthetic.user_items, N=3)
    denied = np.unique(top)
    ids, _ = model.recommend(users, synthetic.user_items, N=10, filter_items=denied)
    assert not set(ids.ravel().tolist()) & set(denied.tolist())


@pytest.mark.parametrize("name", ALGORITHMS)
def test_fold_in_for_a_new_user(name: str, fitted: Fitted, synthetic: Synthetic) -> None:
    model = fitted(name)
    first, second = synthetic.cluster_items(0), synthetic.cluster_items(1)
    history = synthetic.history(first[[1, 2, 3]].tolist(), second[[1, 2, 3]].tolist())
    ids, scores = model.recommend_history(history, N=5)
    assert ids.shape == scores.shape == (2, 5)
    assert not {1, 2, 3} & set(ids[0].tolist())
    if name in NON_PERSONALIZED:
        return
    # Each new user is recommended items of the cluster their history comes from.
    assert np.isin(ids[0], first).all(), ids[0]
    assert np.isin(ids[1], second).all(), ids[1]


@pytest.mark.parametrize("name", ALGORITHMS)
def test_recalculate_user_uses_the_given_rows(
    name: str, fitted: Fitted, synthetic: Synthetic
) -> None:
    model = fitted(name)
    user = 4  # an even user: cluster 0
    ids, _ = model.recommend(user, synthetic.user_items, N=5, recalculate_user=True)
    assert ids.shape == (5,)
    assert not set(ids.tolist()) & set(synthetic.user_items[user].indices.tolist())
    if name not in NON_PERSONALIZED:
        assert np.isin(ids, synthetic.cluster_items(0)).all()


@pytest.mark.parametrize("name", ALGORITHMS)
def test_similar_items_excludes_the_query(name: str, fitted: Fitted, synthetic: Synthetic) -> None:
    model = fitted(name)
    query = np.arange(synthetic.n_items)
    ids, scores = model.similar_items(query, N=5)
    assert ids.shape == scores.shape == (synthetic.n_items, 5)
    assert (ids != query[:, None]).all()
    if name in NON_PERSONALIZED:
        return
    same = synthetic.item_cluster[ids] == synthetic.item_cluster[query][:, None]
    assert same.mean() >= 0.95


@pytest.mark.parametrize("name", ALGORITHMS)
def test_similar_items_honours_filters(name: str, fitted: Fitted) -> None:
    model = fitted(name)
    allowed = np.arange(10, 20)
    ids, _ = model.similar_items(12, N=20, items=allowed)
    assert set(ids[ids >= 0].tolist()) == set(allowed.tolist()) - {12}
    ids, _ = model.similar_items(12, N=20, filter_items=np.arange(0, 60, 2))
    assert (ids % 2 == 1).all()


@pytest.mark.parametrize("name", ALGORITHMS)
def test_scalar_ids_give_one_dimensional_results(
    name: str, fitted: Fitted, synthetic: Synthetic
) -> None:
    model = fitted(name)
    ids, scores = model.recommend(3, synthetic.user_items, N=4)
    assert ids.shape == scores.shape == (4,)
    batch, _ = model.recommend(np.array([3]), synthetic.user_items, N=4)
    np.testing.assert_array_equal(ids, batch[0])
    ids, scores = model.similar_items(np.int64(7), N=4)  # type: ignore[arg-type]
    assert ids.shape == scores.shape == (4,)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_save_load_round_trip(
    name: str, fitted: Fitted, synthetic: Synthetic, tmp_path: Path
) -> None:
    model = fitted(name)
    model.save(tmp_path)
    loaded = Recommender.load(tmp_path)
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    assert loaded.training_loss == pytest.approx(model.training_loss)
    users = np.arange(12)
    history = synthetic.history([1, 2, 40], [33])
    for before, after in [
        (
            model.recommend(users, synthetic.user_items),
            loaded.recommend(users, synthetic.user_items),
        ),
        (model.recommend_history(history), loaded.recommend_history(history)),
        (model.similar_items(users), loaded.similar_items(users)),
    ]:
        np.testing.assert_array_equal(before[0], after[0])
        np.testing.assert_array_equal(before[1], after[1])


@pytest.mark.parametrize("name", ALGORITHMS)
def test_out_of_range_ids_are_invalid_input(
    name: str, fitted: Fitted, synthetic: Synthetic
) -> None:
    model = fitted(name)
    with pytest.raises(InvalidInputError, match="user index out of range"):
        model.recommend(synthetic.n_users, synthetic.user_items)
    with pytest.raises(InvalidInputError, match="user index out of range"):
        model.recommend(np.array([0, -1]), synthetic.user_items)
    with pytest.raises(InvalidInputError, match="item index out of range"):
        model.similar_items(synthetic.n_items)
    with pytest.raises(InvalidInputError, match="item index out of range"):
        model.similar_items(np.array([-1]))
    with pytest.raises(InvalidInputError, match=r"^items holds"):
        model.recommend(0, synthetic.user_items, items=np.array([synthetic.n_items]))
    with pytest.raises(InvalidInputError, match="filter_items"):
        model.recommend(0, synthetic.user_items, filter_items=np.array([-1]))
    with pytest.raises(InvalidInputError, match="columns"):
        model.recommend_history(sp.csr_matrix((1, synthetic.n_items + 1), dtype=np.float32))
    with pytest.raises(InvalidInputError, match="N must be positive"):
        model.recommend(0, synthetic.user_items, N=0)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_unfitted_model_is_not_ready(name: str, synthetic: Synthetic, tmp_path: Path) -> None:
    model = get_algorithm(name)(**TEST_PARAMS.get(name, {}))
    with pytest.raises(NotReadyError):
        model.recommend(0, synthetic.user_items)
    with pytest.raises(NotReadyError):
        model.recommend_history(synthetic.history([1]))
    with pytest.raises(NotReadyError):
        model.similar_items(0)
    with pytest.raises(NotReadyError):
        model.save(tmp_path)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_config_rejects_unknown_and_invalid_parameters(name: str) -> None:
    algo = get_algorithm(name)
    with pytest.raises(InvalidInputError, match="not_a_parameter: unknown hyperparameter"):
        algo(not_a_parameter=1)
    field = next(iter(algo.Config.model_fields), None)
    if field is not None:
        invalid: dict[str, Any] = {field: -1}
        with pytest.raises(InvalidInputError, match=f"{field}: .*got -1"):
            algo(**invalid)
        with pytest.raises(InvalidInputError, match=field):
            algo(algo.Config(), **invalid)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_empty_matrix_is_refused(name: str) -> None:
    with pytest.raises(InvalidInputError, match="empty"):
        get_algorithm(name)().fit(sp.csr_matrix((3, 4), dtype=np.float32))


# ------------------------------------------------------------------------ algorithm specific
def test_als_records_a_decreasing_loss_per_iteration(synthetic: Synthetic) -> None:
    reported: list[tuple[int, float | None]] = []
    model = ALS(**TEST_PARAMS["als"]).fit(
        synthetic.user_items, progress=lambda i, loss: reported.append((i, loss))
    )
    iterations = model.config.iterations  # type: ignore[attr-defined]
    assert len(model.training_loss) == iterations
    assert [i for i, _ in reported] == list(range(1, iterations + 1))
    assert [loss for _, loss in reported] == model.training_loss
    losses = np.asarray(model.training_loss)
    assert losses[-1] < 0.9 * losses[0]
    assert (np.diff(losses) <= 1e-3 * losses[0]).all()


def test_als_fold_in_of_a_training_user_reproduces_their_ranking(
    fitted: Fitted, synthetic: Synthetic
) -> None:
    model = fitted("als")
    users = np.arange(synthetic.n_users)
    trained, _ = model.recommend(users, synthetic.user_items, N=10)
    folded, _ = model.recommend(users, synthetic.user_items, N=10, recalculate_user=True)
    overlap = [len(set(a) & set(b)) / 10 for a, b in zip(trained, folded, strict=True)]
    assert np.mean(overlap) >= 0.9


def test_als_fold_in_solves_implicits_least_squares(synthetic: Synthetic) -> None:
    params: dict[str, Any] = {"factors": 8, "regularization": 0.1, "alpha": 3.0}
    model = ALS(**params, iterations=5).fit(synthetic.user_items)
    history = synthetic.user_items[:6].copy()
    history.data[::4] = -1.0  # implicit reads negative values as confident dislikes
    reference = AlternatingLeastSquares(**params)
    reference.item_factors = model.item_factors
    expected = reference.recalculate_user(np.arange(6), history)
    np.testing.assert_allclose(model.fold_in(history), expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["als", "bpr", "lmf"])
def test_factor_scores_are_the_factor_product(name: str, fitted: Fitted) -> None:
    model = fitted(name)
    users = np.array([0, 7])
    expected = model.user_factors[users] @ model.item_factors.T  # type: ignore[attr-defined]
    np.testing.assert_allclose(model.score_users(users, sp.csr_matrix((2, 60))), expected)


@pytest.mark.parametrize("name", ["itemknn", "bm25"])
def test_neighbour_models_keep_at_most_k_neighbours(name: str, synthetic: Synthetic) -> None:
    model = get_algorithm(name)(K=5).fit(synthetic.user_items)
    assert isinstance(model, ItemKNN)
    assert np.diff(model.similarity.indptr).max() <= 5


def test_ease_weights_have_a_zero_diagonal(fitted: Fitted) -> None:
    model = fitted("ease")
    assert isinstance(model, EASE)
    assert model.weights.dtype == np.float32
    assert (np.diag(model.weights) == 0).all()
    assert model.weights.any()


def test_ease_refuses_a_catalog_over_the_memory_budget(synthetic: Synthetic) -> None:
    model = EASE(max_memory_gb=1e-5)
    needed = estimate_memory_gb(synthetic.n_items)
    # float32 Gram, inverse and LAPACK work space
    assert needed == pytest.approx(synthetic.n_items**2 * 4 * 3 / 1e9)
    with pytest.raises(ModelTooLargeError) as info:
        model.fit(synthetic.user_items)
    message = str(info.value)
    assert f"{needed:.2f} GB" in message
    assert "max_memory_gb=1e-05" in message
    assert not model.is_fitted
