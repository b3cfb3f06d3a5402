"""GF-CF's two forms: the dense filter and the factored one large sparse catalogs get.

The factored form keeps ``R̃`` and the thin ideal filter instead of the ``n_items²`` matrix; it
must rank exactly as the dense form (trained users, folded-in histories, similar items), survive
a save and load, refuse a fit over its memory budget with an estimate that grows linearly, and
reject artifacts whose arrays do not fit together.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from models.errors import ArtifactError, ModelTooLargeError
from models.gfcf import GFCF, estimate_factored_memory_gb, sharpening
from models.npz import read_npz, write_npz
from models.ranking import RankingPipeline
from models.vocabulary import MISSING
from tests.models.conftest import Synthetic

PARAMS = {"factors": 8, "alpha": 0.5, "beta": 0.4}


@pytest.fixture(scope="module")
def forms(synthetic: Synthetic) -> tuple[GFCF, GFCF]:
    dense = GFCF(form="dense", **PARAMS).fit(synthetic.user_items)
    factored = GFCF(form="factored", **PARAMS).fit(synthetic.user_items)
    return dense, factored


def test_the_forms_score_identically(forms: tuple[GFCF, GFCF], synthetic: Synthetic) -> None:
    dense, factored = forms
    assert not dense.factored and factored.factored
    assert factored.weights is None
    users = np.arange(synthetic.n_users)
    np.testing.assert_allclose(
        factored.score_users(users, synthetic.user_items),
        dense.score_users(users, synthetic.user_items),
        atol=1e-5,
    )
    # Weighted histories are scored as 0/1 rows by both forms.
    history = synthetic.history([1, 2, 40], [33, 34], weight=3.0)
    np.testing.assert_allclose(
        factored.score_history(history), dense.score_history(history), atol=1e-5
    )
    items = np.array([0, 5, 45])
    np.testing.assert_allclose(factored.score_similar(items), dense.score_similar(items), atol=1e-5)
    # The factored rows are rows of the dense filter, computed on demand.
    np.testing.assert_allclose(factored.score_similar(items), dense.weights[items], atol=1e-5)


def test_the_forms_make_the_same_lists(forms: tuple[GFCF, GFCF], synthetic: Synthetic) -> None:
    dense, factored = (RankingPipeline.for_training(m, synthetic.user_items) for m in forms)
    users = np.arange(40)
    np.testing.assert_array_equal(factored.rank_users(users, 10), dense.rank_users(users, 10))
    history = synthetic.history([1, 2, 40], [33])
    missing = np.array([MISSING, MISSING])
    np.testing.assert_array_equal(
        factored.rank_users(missing, 10, history=history),
        dense.rank_users(missing, 10, history=history),
    )


def test_auto_keeps_small_catalogs_dense_and_factors_large_ones(synthetic: Synthetic) -> None:
    assert not GFCF(**PARAMS).fit(synthetic.user_items).factored
    large = GFCF(dense_max_items=synthetic.n_items - 1, **PARAMS).fit(synthetic.user_items)
    assert large.factored


def test_a_factored_model_round_trips_without_a_square_array(
    forms: tuple[GFCF, GFCF], synthetic: Synthetic, tmp_path: Path
) -> None:
    _, factored = forms
    arrays = factored.to_arrays()
    assert "weights" not in arrays
    assert all(
        array.size < synthetic.n_items**2 or name == "graph_data" for name, array in arrays.items()
    )
    write_npz(tmp_path / "model.npz", arrays)
    loaded = GFCF.from_arrays(
        factored.config.model_dump(mode="json"), read_npz(tmp_path / "model.npz")
    )
    assert loaded.factored
    users = np.arange(synthetic.n_users)
    np.testing.assert_array_equal(
        loaded.score_users(users, synthetic.user_items),
        factored.score_users(users, synthetic.user_items),
    )


def test_without_the_ideal_filter_the_factored_form_is_the_linear_filter(
    synthetic: Synthetic,
) -> None:
    linear = GFCF(form="factored", alpha=0.0).fit(synthetic.user_items)
    dense = GFCF(form="dense", alpha=0.0).fit(synthetic.user_items)
    items = np.arange(synthetic.n_items)
    np.testing.assert_allclose(linear.score_similar(items), dense.weights, atol=1e-6)
    assert linear.to_arrays()["ideal_left"].shape == (synthetic.n_items, 0)


def test_the_factored_form_refuses_a_fit_over_its_budget(synthetic: Synthetic) -> None:
    model = GFCF(form="factored", max_memory_gb=1e-6, **PARAMS)
    needed = estimate_factored_memory_gb(
        synthetic.n_users, synthetic.n_items, synthetic.user_items.nnz, PARAMS["factors"]
    )
    with pytest.raises(ModelTooLargeError) as info:
        model.fit(synthetic.user_items)
    message = str(info.value)
    assert "factored" in message and f"{needed:.2f} GB" in message
    assert "max_memory_gb=1e-06" in message
    assert not model.is_fitted


def test_the_factored_estimate_grows_linearly_not_with_the_catalog_squared() -> None:
    # Gowalla's shape: 29,858 users, 40,981 places, 810,128 check-ins, 256 singular vectors.
    gowalla = estimate_factored_memory_gb(29_858, 40_981, 810_128, 256)
    assert gowalla < 0.5  # the dense filter would need 13.4 GB
    doubled = estimate_factored_memory_gb(2 * 29_858, 2 * 40_981, 2 * 810_128, 256)
    assert doubled == pytest.approx(2 * gowalla)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda a: a.pop("ideal_right"), "ideal_right"),
        (lambda a: a.update(graph_indptr=a["graph_indptr"][:-1]), "inconsistent"),
        (lambda a: a.update(ideal_left=a["ideal_left"][:-1]), "shapes"),
    ],
)
def test_damaged_factored_arrays_are_refused(forms: tuple[GFCF, GFCF], damage, reason: str) -> None:
    _, factored = forms
    arrays = dict(factored.to_arrays())
    damage(arrays)
    with pytest.raises(ArtifactError, match=reason):
        GFCF.from_arrays(factored.config.model_dump(mode="json"), arrays)


def test_a_sparse_graph_hop_never_densifies_the_user_axis(forms: tuple[GFCF, GFCF]) -> None:
    """Scoring one user touches the users who share their items, through sparse products."""
    _, factored = forms
    one = sp.csr_matrix(
        (np.ones(2, np.float32), np.array([1, 2]), np.array([0, 2])), shape=(1, factored.n_items)
    )
    assert factored._graph_t is not None
    hop = one @ factored._graph_t
    assert sp.issparse(hop)
    assert hop.nnz == len(np.unique(factored._graph_t[[1, 2]].indices))


def test_sharpening_damps_the_leading_spectrum_as_one_runge_kutta_step() -> None:
    """Sharpening adds ``V diag(λ (p(Tλ) - 1)) Vᵀ``: with every singular vector kept, the linear
    filter's eigenvalues become exactly ``λ p(Tλ)``, the RK4 step of ``dy/dt = -y P`` over T."""
    rng = np.random.default_rng(7)
    binary = (rng.random((40, 12)) < 0.3).astype(np.float32)
    binary[np.arange(12), np.arange(12)] = 1.0  # every item and user has an interaction
    matrix = sp.csr_matrix(binary)
    strength = 1.5
    plain = GFCF(form="dense", alpha=0.0, beta=0.5).fit(matrix)
    sharp = GFCF(form="dense", alpha=0.0, beta=0.5, factors=12, sharpen=strength).fit(matrix)
    filter_ = plain.weights.astype(np.float64)
    step = filter_ * strength
    taylor = np.eye(12) - step + step @ step / 2 - step @ step @ step / 6
    taylor += step @ step @ step @ step / 24
    np.testing.assert_allclose(sharp.weights, filter_ @ taylor, atol=2e-5)
    # Both forms agree with sharpening on too.
    factored = GFCF(form="factored", alpha=0.3, beta=0.5, factors=6, sharpen=strength).fit(matrix)
    dense = GFCF(form="dense", alpha=0.3, beta=0.5, factors=6, sharpen=strength).fit(matrix)
    np.testing.assert_allclose(factored.score_similar(np.arange(12)), dense.weights, atol=1e-5)
    # The change per eigenvalue: none at 0, a damping that grows with λ.
    values = np.array([0.0, 0.2, 0.6, 1.0])
    change = sharpening(values, strength)
    assert change[0] == 0.0 and np.all(np.diff(change) < 0)
