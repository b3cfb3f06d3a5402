"""The contract every registered algorithm honours through the ranking pipeline, plus the few
algorithm-specific promises.

Each algorithm is fitted once on the synthetic two-cluster data (see ``conftest.py``) and ranked
by :class:`models.ranking.RankingPipeline`, the one path every list Affinity makes takes: the
shared tests check what serving, batch recommendation and evaluation rely on, for every model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares

import models.gfcf
from models.algorithms import algorithm_names, get_algorithm
from models.base import Recommender
from models.ease import EASE, estimate_memory_gb
from models.errors import InvalidInputError, ModelTooLargeError, NotReadyError
from models.factorization import ALS
from models.gfcf import GFCF, top_right_singular_vectors
from models.gfcf import estimate_memory_gb as gfcf_memory_gb
from models.neighbors import ItemKNN
from models.npz import read_npz, write_npz
from models.ranking import ItemFilter, ListKind, ListRequest, Ranked, RankingPipeline, Source
from models.vocabulary import MISSING
from tests.models.conftest import (
    HALF,
    NON_PERSONALIZED,
    TEST_PARAMS,
    Synthetic,
    make_bundle,
)

ALGORITHMS = algorithm_names()
PERSONALIZED = [name for name in ALGORITHMS if name not in NON_PERSONALIZED]
UNAVAILABLE = frozenset({0, HALF})
"""Items the served bundles' catalog marks unavailable (see ``conftest.make_catalog``)."""

Fitted = Callable[[str], Recommender]
Pipelines = Callable[[str], RankingPipeline]


def seen_of(matrix: sp.csr_matrix, user: int) -> set[int]:
    return set(matrix[user].indices.tolist())


def for_user(pipeline: RankingPipeline, user: int, k: int, **options: Any) -> Ranked:
    return pipeline.rank(ListRequest(ListKind.USER, k, user=user, **options))


def similar_to(pipeline: RankingPipeline, items: list[int], k: int, **options: Any) -> Ranked:
    return pipeline.rank(ListRequest(ListKind.SIMILAR, k, items=np.array(items), **options))


def recent_weight(synthetic: Synthetic) -> float:
    """The weight the pipeline gives one recent item: the median training confidence."""
    return float(np.median(synthetic.user_items.data))


def rows_of(items: list[np.ndarray], n_items: int) -> sp.csr_matrix:
    """A 0/1 matrix with one row per entry of ``items``."""
    data = np.ones(sum(len(r) for r in items), dtype=np.float32)
    rows = np.repeat(np.arange(len(items)), [len(r) for r in items])
    cols = np.concatenate(items) if items else np.empty(0, np.int64)
    return sp.csr_matrix((data, (rows, cols)), shape=(len(items), n_items))


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
def test_lists_are_the_exact_top_k_best_first_without_seen_items(
    name: str, fitted: Fitted, training_pipeline: Pipelines, synthetic: Synthetic
) -> None:
    model, pipeline = fitted(name), training_pipeline(name)
    users = np.arange(0, 40, 3)
    dense = np.asarray(model.score_users(users, synthetic.user_items[users]), dtype=np.float32)
    for user, row in zip(users, dense, strict=True):
        ranked = for_user(pipeline, int(user), 7)
        ids, scores = ranked.ids.tolist(), ranked.scores
        seen = seen_of(synthetic.user_items, int(user))
        assert ranked.source is Source.PERSONALIZED
        assert len(ids) == len(set(ids)) == 7
        assert not seen & set(ids)
        assert (np.diff(scores) <= 0).all(), scores
        # The model's own scores, and no unseen item left out scores above the last one.
        np.testing.assert_allclose(scores, row[ids], rtol=1e-5, atol=1e-5)
        rest = np.setdiff1d(np.arange(synthetic.n_items), [*seen, *ids])
        assert row[rest].max() <= scores[-1] + 1e-5
        # Equal scores are ranked by item index.
        for a, b, sa, sb in zip(ids, ids[1:], scores, scores[1:], strict=False):
            assert sa > sb or a < b
    np.testing.assert_array_equal(
        pipeline.rank_users(users, 7), [for_user(pipeline, int(u), 7).ids for u in users]
    )


@pytest.mark.parametrize("name", ALGORITHMS)
def test_seen_items_come_back_with_include_seen(
    name: str, training_pipeline: Pipelines, synthetic: Synthetic
) -> None:
    pipeline = training_pipeline(name)
    users = np.arange(20)
    lists = [for_user(pipeline, int(u), 5, include_seen=True).ids for u in users]
    assert any(set(ids.tolist()) & seen_of(synthetic.user_items, u) for u, ids in enumerate(lists))
    np.testing.assert_array_equal(pipeline.rank_users(users, 5, include_seen=True), lists)
    # Without it, never.
    for u, ids in enumerate(pipeline.rank_users(users, 5)):
        assert not set(ids.tolist()) & seen_of(synthetic.user_items, u)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_allowed_items_and_exclusions(
    name: str, pipeline_for: Pipelines, synthetic: Synthetic
) -> None:
    pipeline = pipeline_for(name)
    users = np.arange(6)
    allowed = np.zeros(synthetic.n_items, dtype=bool)
    allowed[::4] = True
    k = int(allowed.sum()) + 3
    ids = pipeline.rank_users(users, k, allowed=allowed)
    assert ids.shape == (len(users), k)
    for user, row in zip(users, ids, strict=True):
        real = row[row >= 0]
        # Every allowed, available, unseen item, and nothing else: the rest of the row is -1.
        candidates = set(np.flatnonzero(allowed).tolist()) - UNAVAILABLE
        assert set(real.tolist()) == candidates - seen_of(synthetic.user_items, int(user))
        assert len(real) == len(set(real.tolist()))
        assert (row[len(real) :] == -1).all()

    denied = np.unique(pipeline.rank_users(users, 3))
    exclude = rows_of([denied] * len(users), synthetic.n_items)
    batch = pipeline.rank_users(users, 10, exclude=exclude)
    assert (batch >= 0).all()
    assert not set(batch.ravel().tolist()) & set(denied.tolist())
    for user in users:
        single = for_user(pipeline, int(user), 10, exclude=denied)
        assert len(single.ids) == 10
        assert not set(single.ids.tolist()) & set(denied.tolist())


@pytest.mark.parametrize(
    ("flt", "holds"),
    [
        (ItemFilter.of(item_types=["product"]), lambda i: i % 2 == 1),
        (ItemFilter.of(categories=["sport", "music"]), lambda i: i % 3 != 0),
        (ItemFilter.of(item_types=["content"], categories=["news"]), lambda i: i % 6 == 0),
    ],
)
@pytest.mark.parametrize("name", ALGORITHMS)
def test_item_filters_hold_on_every_list(
    name: str, pipeline_for: Pipelines, flt: ItemFilter, holds: Callable[[int], bool]
) -> None:
    pipeline = pipeline_for(name)
    users = np.arange(0, 200, 17)
    lists = [
        *pipeline.rank_users(users, 8, item_filter=flt),
        *(for_user(pipeline, int(u), 8, item_filter=flt).ids for u in users),
        for_user(pipeline, MISSING, 8, recent=np.array([31, 33]), item_filter=flt).ids,
        similar_to(pipeline, [7, 8], 8, item_filter=flt).ids,
    ]
    eligible = {i for i in range(pipeline.n_items) if holds(i)} - UNAVAILABLE
    for ids in lists:
        real = ids[ids >= 0]
        # content+news holds only 8 available items: a user who has seen some gets fewer.
        assert len(real) == 8 or (len(eligible) == 8 and len(real) > 0), ids
        assert (ids[len(real) :] == -1).all()
        assert set(real.tolist()) <= eligible, ids


@pytest.mark.parametrize("name", ALGORITHMS)
def test_fold_in_for_a_new_user(
    name: str, training_pipeline: Pipelines, synthetic: Synthetic
) -> None:
    pipeline = training_pipeline(name)
    first, second = synthetic.cluster_items(0), synthetic.cluster_items(1)
    told = [first[[1, 2, 3]].tolist(), second[[1, 2, 3]].tolist()]
    ids = pipeline.rank_users(np.array([MISSING, MISSING]), 5, history=synthetic.history(*told))
    assert ids.shape == (2, 5)
    assert (ids >= 0).all()
    singles = [for_user(pipeline, MISSING, 5, recent=np.array(items)) for items in told]
    assert all(r.source is Source.FOLD_IN for r in singles)
    for row, single, items in zip(ids, singles, told, strict=True):
        assert not set(row.tolist()) & set(items)
        assert not set(single.ids.tolist()) & set(items)
    if name in NON_PERSONALIZED:
        return
    # Each new user is recommended items of the cluster their history comes from.
    assert np.isin(ids[0], first).all(), ids[0]
    assert np.isin(ids[1], second).all(), ids[1]
    assert np.isin(singles[0].ids, first).all(), singles[0].ids
    assert np.isin(singles[1].ids, second).all(), singles[1].ids


@pytest.mark.parametrize("name", ALGORITHMS)
def test_a_known_user_with_recent_items_is_folded_in_again(
    name: str, training_pipeline: Pipelines, synthetic: Synthetic
) -> None:
    """The pipeline's form of implicit's ``recalculate_user``: a trained user who brings recent
    items is scored from their training row plus those items, not from their trained vector."""
    pipeline = training_pipeline(name)
    user = 4  # an even user: cluster 0
    seen = seen_of(synthetic.user_items, user)
    recent = [i for i in synthetic.cluster_items(0).tolist() if i not in seen][:3]
    ranked = for_user(pipeline, user, 5, recent=np.array(recent))
    assert ranked.source is Source.PERSONALIZED
    assert len(ranked.ids) == 5
    assert not set(ranked.ids.tolist()) & (seen | set(recent))
    # Exactly the list of a new user whose history is the training row plus the recent items.
    weight = recent_weight(synthetic)
    history = synthetic.user_items[user] + synthetic.history(recent, weight=weight)
    folded = pipeline.rank_users(np.array([MISSING]), 5, history=history)[0]
    np.testing.assert_array_equal(ranked.ids, folded)
    if name not in NON_PERSONALIZED:
        assert np.isin(ranked.ids, synthetic.cluster_items(0)).all(), ranked.ids


@pytest.mark.parametrize("name", ALGORITHMS)
def test_similar_items_never_returns_the_query(
    name: str, training_pipeline: Pipelines, synthetic: Synthetic
) -> None:
    pipeline = training_pipeline(name)
    query = np.arange(synthetic.n_items)
    ids = np.array([similar_to(pipeline, [int(q)], 5).ids for q in query])
    assert ids.shape == (synthetic.n_items, 5)
    assert (ids >= 0).all()
    assert (ids != query[:, None]).all()
    pair = similar_to(pipeline, [3, 40], 10)
    assert pair.source is Source.PERSONALIZED
    assert not {3, 40} & set(pair.ids.tolist())
    if name in NON_PERSONALIZED:
        return
    same = synthetic.item_cluster[ids] == synthetic.item_cluster[query][:, None]
    assert same.mean() >= 0.95


@pytest.mark.parametrize("name", ALGORITHMS)
def test_similar_items_honours_exclusions_and_filters(
    name: str, pipeline_for: Pipelines, synthetic: Synthetic
) -> None:
    pipeline = pipeline_for(name)
    allowed = set(range(10, 20))
    outside = np.array([i for i in range(synthetic.n_items) if i not in allowed])
    ranked = similar_to(pipeline, [12], 20, exclude=outside)
    assert set(ranked.ids.tolist()) == allowed - {12}
    ranked = similar_to(pipeline, [12], 20, exclude=np.arange(0, synthetic.n_items, 2))
    assert len(ranked.ids) == 20
    assert (ranked.ids % 2 == 1).all()
    ranked = similar_to(pipeline, [12], 20, item_filter=ItemFilter.of(item_types=["product"]))
    assert len(ranked.ids) == 20
    assert (ranked.ids % 2 == 1).all()


@pytest.mark.parametrize("name", ALGORITHMS)
def test_fitted_arrays_are_c_ordered_as_loaded_ones_are(name: str, fitted: Fitted) -> None:
    """A model scores in the process that fitted it (evaluation, tuning, the quality bench) as
    well as after loading; a Fortran-ordered matrix there makes every sparse-row product copy it
    first (GF-CF's dense filter once cost 400 ms a list that way instead of 0.4 ms)."""
    model = fitted(name)
    for key, array in model.to_arrays().items():
        if array.ndim == 2 and array.size > 1:
            assert array.flags.c_contiguous, f"{name}: {key} is not C-ordered"


@pytest.mark.parametrize("name", ALGORITHMS)
def test_arrays_round_trip_gives_identical_lists(
    name: str, fitted: Fitted, synthetic: Synthetic, tmp_path: Path
) -> None:
    model = fitted(name)
    write_npz(tmp_path / "model.npz", model.to_arrays())
    params = model.config.model_dump(mode="json")
    loaded = get_algorithm(name).from_arrays(params, read_npz(tmp_path / "model.npz"))
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    assert loaded.training_loss == pytest.approx(model.training_loss)
    before = RankingPipeline.for_training(model, synthetic.user_items)
    after = RankingPipeline.for_training(loaded, synthetic.user_items)
    users = np.arange(12)
    history = synthetic.history([1, 2, 40], [33])
    missing = np.array([MISSING, MISSING])
    np.testing.assert_array_equal(before.rank_users(users, 10), after.rank_users(users, 10))
    np.testing.assert_array_equal(
        before.rank_users(missing, 10, history=history),
        after.rank_users(missing, 10, history=history),
    )
    for ask in (
        lambda p: for_user(p, 3, 10),
        lambda p: for_user(p, MISSING, 10, recent=np.array([1, 2, 40])),
        lambda p: similar_to(p, [5], 10),
        lambda p: similar_to(p, [5, 45], 10),
    ):
        a, b = ask(before), ask(after)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.scores, b.scores)
        assert a.source is b.source


@pytest.mark.parametrize("name", ALGORITHMS)
def test_k_must_be_positive(name: str, pipeline_for: Pipelines) -> None:
    pipeline = pipeline_for(name)
    for call in (
        lambda: for_user(pipeline, 4, 0),
        lambda: for_user(pipeline, MISSING, -1, recent=np.array([3])),
        lambda: similar_to(pipeline, [3], 0),
        lambda: pipeline.rank(ListRequest(ListKind.POPULAR, 0)),
        lambda: pipeline.rank_users(np.array([1, 2]), 0),
        lambda: pipeline.recommend("u4", 0),
        lambda: pipeline.similar_items(["i1"], -1),
        lambda: pipeline.popular(0, trending=True),
    ):
        with pytest.raises(InvalidInputError) as info:
            call()
        assert info.value.field == "k"


@pytest.mark.parametrize("name", ALGORITHMS)
def test_malformed_requests_are_invalid_input(
    name: str, fitted: Fitted, pipeline_for: Pipelines, synthetic: Synthetic
) -> None:
    pipeline = pipeline_for(name)
    n_items = synthetic.n_items
    users = np.array([0, MISSING])
    with pytest.raises(InvalidInputError, match="history has shape") as info:
        pipeline.rank_users(users, 5, history=sp.csr_matrix((2, n_items + 1), dtype=np.float32))
    assert info.value.field == "history"
    with pytest.raises(InvalidInputError, match="exclude has shape") as info:
        pipeline.rank_users(np.array([0]), 5, exclude=sp.csr_matrix((2, n_items)))
    assert info.value.field == "exclude"
    with pytest.raises(InvalidInputError, match="'video'") as info:
        pipeline.rank_users(np.array([0]), 5, item_filter=ItemFilter.of(item_types=["video"]))
    assert info.value.field == "item_types"
    with pytest.raises(InvalidInputError, match="'video'"):
        similar_to(pipeline, [3], 5, item_filter=ItemFilter.of(item_types=["video"]))
    with pytest.raises(InvalidInputError, match="training matrix has 59 items"):
        RankingPipeline.for_training(fitted(name), synthetic.user_items[:, :-1])
    if name not in NON_PERSONALIZED:
        # A user the model never saw can only be folded in from a history.
        with pytest.raises(InvalidInputError, match="need a history"):
            pipeline.rank_users(users, 5)


OUT_OF_RANGE: dict[str, Callable[[RankingPipeline], object]] = {
    "user past the end": lambda p: for_user(p, p.model.n_users, 5),  # type: ignore[attr-defined]
    "negative user": lambda p: for_user(p, -2, 5),
    "batch user past the end": lambda p: p.rank_users(np.array([0, p.model.n_users]), 5),  # type: ignore[attr-defined]
    "negative batch user": lambda p: p.rank_users(np.array([0, -2]), 5),
    "query item past the end": lambda p: similar_to(p, [p.n_items], 5),
    "negative query item": lambda p: similar_to(p, [-1], 5),
    "excluded item past the end": lambda p: for_user(p, 0, 5, exclude=np.array([p.n_items])),
    "negative excluded item": lambda p: for_user(p, 0, 5, exclude=np.array([-1])),
    "recent item past the end": lambda p: for_user(p, MISSING, 5, recent=np.array([p.n_items])),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
@pytest.mark.parametrize("name", ["als", "ease"])
def test_out_of_range_indices_are_invalid_input(
    name: str, case: str, training_pipeline: Pipelines
) -> None:
    with pytest.raises(InvalidInputError, match="outside"):
        OUT_OF_RANGE[case](training_pipeline(name))


@pytest.mark.parametrize("name", ALGORITHMS)
def test_unfitted_model_is_not_ready(name: str, synthetic: Synthetic) -> None:
    model = get_algorithm(name)(**TEST_PARAMS.get(name, {}))
    popularity = np.ones(synthetic.n_items, dtype=np.float32)
    with pytest.raises(NotReadyError):
        RankingPipeline(model, seen=synthetic.user_items, popularity=popularity)
    with pytest.raises(NotReadyError):
        RankingPipeline.from_bundle(make_bundle(model, synthetic))
    with pytest.raises(NotReadyError):
        model.to_arrays()


def test_unfitted_model_is_not_ready_for_training(synthetic: Synthetic) -> None:
    with pytest.raises(NotReadyError):
        RankingPipeline.for_training(ALS(**TEST_PARAMS["als"]), synthetic.user_items)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_config_rejects_unknown_and_invalid_parameters(name: str) -> None:
    algo = get_algorithm(name)
    with pytest.raises(InvalidInputError, match="not_a_parameter: unknown hyperparameter"):
        algo(not_a_parameter=1)
    field_name = next(iter(algo.Config.model_fields), None)
    if field_name is not None:
        invalid: dict[str, Any] = {field_name: -1}
        with pytest.raises(InvalidInputError, match=f"{field_name}: .*got -1"):
            algo(**invalid)
        with pytest.raises(InvalidInputError, match=field_name):
            algo(algo.Config(), **invalid)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_empty_matrix_is_refused(name: str) -> None:
    with pytest.raises(InvalidInputError, match="empty"):
        get_algorithm(name)().fit(sp.csr_matrix((3, 4), dtype=np.float32))


# ------------------------------------------------------- one list, or many at once: the same
BATCH_USERS = np.array([0, 7, MISSING, 12, 33, MISSING, 58, 101, 150, 199])
BATCH_HISTORY = {2: [31, 35, 40, 41], 5: [2, 3, 5, 8, 13]}
"""The recent items of the ``MISSING`` rows of :data:`BATCH_USERS`."""
BATCH_CASES = ["plain", "item_filter", "exclude", "allowed", "include_seen", "everything"]


@pytest.mark.parametrize("strangers", [False, True], ids=["trained", "with-strangers"])
@pytest.mark.parametrize("case", BATCH_CASES)
@pytest.mark.parametrize("name", ALGORITHMS)
def test_rank_users_gives_each_user_the_list_rank_gives(
    name: str, case: str, strangers: bool, pipeline_for: Pipelines, synthetic: Synthetic
) -> None:
    """(a) Evaluation's batches rank every user exactly as serving ranks them one at a time.

    ``strangers`` adds ``MISSING`` users folded in from a history (whose rows of trained users
    hold items that would show if they were not ignored); without it there is no history, the
    batch path of models that give everyone the same scores.
    """
    pipeline = pipeline_for(name)
    n_items, k = synthetic.n_items, 8
    users = BATCH_USERS if strangers else BATCH_USERS[BATCH_USERS != MISSING]
    rng = np.random.default_rng(len(case))
    flt = ItemFilter()
    exclude: list[np.ndarray] | None = None
    allowed: np.ndarray | None = None
    include_seen = case in ("include_seen", "everything")
    if case in ("item_filter", "everything"):
        flt = ItemFilter.of(categories=["news", "music"])
    if case in ("exclude", "everything"):
        exclude = [np.sort(rng.choice(n_items, size=6, replace=False)) for _ in users]
    if case in ("allowed", "everything"):
        allowed = rng.random(n_items) < 0.7
    history_rows = [
        np.array(BATCH_HISTORY.get(row, [3, 4, 33, 34]), dtype=np.int64)
        for row in range(len(users))
    ]
    history = None
    if strangers:
        weight = np.float32(recent_weight(synthetic))
        history = sp.csr_matrix(rows_of(history_rows, n_items) * weight)

    batch = pipeline.rank_users(
        users,
        k,
        history=history,
        exclude=None if exclude is None else rows_of(exclude, n_items),
        include_seen=include_seen,
        allowed=allowed,
        item_filter=flt,
    )
    assert batch.shape == (len(users), k)
    for row, user in enumerate(users.tolist()):
        blocked = [] if exclude is None else [exclude[row]]
        if allowed is not None:  # one list's form of "allowed": exclude everything else
            blocked.append(np.flatnonzero(~allowed))
        single = pipeline.rank(
            ListRequest(
                ListKind.USER,
                k,
                user=user,
                recent=history_rows[row] if user == MISSING else np.empty(0, np.int64),
                exclude=np.concatenate(blocked) if blocked else np.empty(0, np.int64),
                item_filter=flt,
                include_seen=include_seen,
            )
        )
        assert len(single.ids) == k
        np.testing.assert_array_equal(batch[row], single.ids, err_msg=f"row {row}, user {user}")


def test_a_missing_user_with_an_empty_history_gets_the_popular_list(
    training_pipeline: Pipelines, synthetic: Synthetic
) -> None:
    pipeline = training_pipeline("als")
    empty = sp.csr_matrix((1, synthetic.n_items), dtype=np.float32)
    batch = pipeline.rank_users(np.array([MISSING]), 5, history=empty)[0]
    single = for_user(pipeline, MISSING, 5)
    assert single.source is Source.POPULAR
    np.testing.assert_array_equal(batch, single.ids)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_rank_users_folds_missing_users_in_from_their_history(
    name: str, training_pipeline: Pipelines, synthetic: Synthetic
) -> None:
    """(b) A user the model never saw, in a batch with trained users, gets their history's
    cluster; the trained users' lists do not change with the company they are ranked in."""
    pipeline = training_pipeline(name)
    first, second = synthetic.cluster_items(0), synthetic.cluster_items(1)
    users = np.array([MISSING, 4, MISSING, 5])
    history = synthetic.history(
        first[[0, 4, 6]].tolist(), [], second[[2, 3, 9]].tolist(), [], weight=2.0
    )
    ids = pipeline.rank_users(users, 6, history=history)
    assert (ids >= 0).all()
    np.testing.assert_array_equal(ids[[1, 3]], pipeline.rank_users(np.array([4, 5]), 6))
    assert not set(ids[0].tolist()) & set(first[[0, 4, 6]].tolist())
    assert not set(ids[2].tolist()) & set(second[[2, 3, 9]].tolist())
    if name in NON_PERSONALIZED:
        return
    assert np.isin(ids[0], first).all(), ids[0]
    assert np.isin(ids[2], second).all(), ids[2]


# ------------------------------------------------------------------------ re-ranking stages
@dataclass
class Recording:
    """A re-ranking stage that records what it gets and negates the scores (or zeroes them)."""

    candidates_per_slot: int = 1
    flatten: bool = False
    calls: list[tuple[np.ndarray, np.ndarray, ListRequest]] = field(default_factory=list)

    def __call__(
        self, ids: np.ndarray, scores: np.ndarray, request: ListRequest
    ) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append((np.array(ids), np.array(scores), request))
        return ids, np.zeros_like(scores) if self.flatten else -scores


STAGE_USERS = np.array([1, 4, 9, 16])


def negated_top(ids: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """The top ``k`` of ``ids`` scored ``-scores`` by the rule of :mod:`models.topk`."""
    return ids[np.lexsort((ids, scores))[:k]]


@pytest.mark.parametrize("per_slot", [1, 3])
@pytest.mark.parametrize("name", ALGORITHMS)
def test_a_rerank_stage_is_applied_to_its_candidates(
    name: str, per_slot: int, fitted: Fitted, synthetic: Synthetic
) -> None:
    """(d) A stage sees ``candidates_per_slot * k`` candidates, best first and filtered, and the
    list is the top ``k`` of what it returns: negated scores give the worst candidates first."""
    k = 5
    plain = RankingPipeline.for_training(fitted(name), synthetic.user_items)
    stage = Recording(candidates_per_slot=per_slot)
    staged = RankingPipeline.for_training(fitted(name), synthetic.user_items, stages=[stage])
    singles = []
    for user in STAGE_USERS.tolist():
        stage.calls.clear()
        got = for_user(staged, user, k)
        ((ids, scores, request),) = stage.calls
        assert request.user == user and request.k == k
        # What the pipeline without the stage ranks, k * per_slot of it, before the stage.
        wanted = for_user(plain, user, k * per_slot)
        assert len(wanted.ids) == k * per_slot
        np.testing.assert_array_equal(ids, wanted.ids)
        np.testing.assert_array_equal(scores, wanted.scores)
        assert not set(ids.tolist()) & seen_of(synthetic.user_items, user)
        # Negated, the last k candidates win, worst first (equal scores still by item index).
        np.testing.assert_array_equal(got.ids, negated_top(wanted.ids, wanted.scores, k))
        np.testing.assert_array_equal(np.sort(got.scores)[::-1], got.scores)
        if len(np.unique(wanted.scores)) == len(wanted.scores):
            np.testing.assert_array_equal(got.ids, wanted.ids[::-1][:k])
            np.testing.assert_array_equal(got.scores, -wanted.scores[::-1][:k])
        singles.append(got.ids)
    # More candidates per slot bring in items from beyond the plain top k.
    beyond = [
        not np.isin(got_ids, for_user(plain, user, k).ids).all()
        for user, got_ids in zip(STAGE_USERS.tolist(), singles, strict=True)
    ]
    assert all(beyond) if per_slot > 1 else not any(beyond)
    stage.calls.clear()
    batch = staged.rank_users(STAGE_USERS, k)
    assert len(stage.calls) == len(STAGE_USERS)
    for (ids, _, request), user in zip(stage.calls, STAGE_USERS.tolist(), strict=True):
        assert request.user == user
        np.testing.assert_array_equal(ids, for_user(plain, user, k * per_slot).ids)
    np.testing.assert_array_equal(batch, singles)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_scores_tied_by_a_stage_are_ranked_by_item_index(
    name: str, fitted: Fitted, synthetic: Synthetic
) -> None:
    """(c) in the pipeline: when a stage leaves every candidate the same score, the list is the
    lowest-indexed candidates, in rank and in rank_users alike."""
    k = 4
    stage = Recording(candidates_per_slot=3, flatten=True)
    staged = RankingPipeline.for_training(fitted(name), synthetic.user_items, stages=[stage])
    singles = []
    for user in STAGE_USERS.tolist():
        stage.calls.clear()
        got = for_user(staged, user, k)
        ((ids, _, _),) = stage.calls
        np.testing.assert_array_equal(got.ids, np.sort(ids)[:k])
        assert (got.scores == 0).all()
        singles.append(got.ids)
    np.testing.assert_array_equal(staged.rank_users(STAGE_USERS, k), singles)


def test_stages_run_in_order(fitted: Fitted, synthetic: Synthetic) -> None:
    first, second = Recording(), Recording()
    plain = RankingPipeline.for_training(fitted("als"), synthetic.user_items)
    staged = RankingPipeline.for_training(
        fitted("als"), synthetic.user_items, stages=[first, second]
    )
    got = for_user(staged, 4, 6)
    ((_, into_first, _),) = first.calls
    ((_, into_second, _),) = second.calls
    np.testing.assert_array_equal(into_second, -into_first)  # the second sees the first's output
    np.testing.assert_array_equal(got.ids, for_user(plain, 4, 6).ids)  # negated twice
    np.testing.assert_array_equal(got.scores, into_first)


def test_a_stage_runs_on_popular_and_similar_lists_too(pipeline_for: Pipelines) -> None:
    bundle_pipeline = pipeline_for("als")
    assert bundle_pipeline.bundle is not None
    stage = Recording()
    staged = RankingPipeline.from_bundle(bundle_pipeline.bundle, stages=[stage])
    for request in (
        ListRequest(ListKind.POPULAR, 5),
        ListRequest(ListKind.TRENDING, 5),
        ListRequest(ListKind.SIMILAR, 5, items=np.array([3])),
        ListRequest(ListKind.USER, 5),  # cold start: the popular list
    ):
        stage.calls.clear()
        got = staged.rank(request)
        want = bundle_pipeline.rank(request)
        assert len(stage.calls) == 1
        np.testing.assert_array_equal(got.ids, negated_top(want.ids, want.scores, 5))
        assert got.source is want.source


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
    training_pipeline: Pipelines, synthetic: Synthetic
) -> None:
    pipeline = training_pipeline("als")
    users = np.arange(synthetic.n_users)
    trained = pipeline.rank_users(users, 10)
    # The same users as strangers, folded in from their training rows.
    folded = pipeline.rank_users(
        np.full(len(users), MISSING), 10, history=synthetic.user_items[users]
    )
    assert (folded >= 0).all()
    overlap = [len(set(a) & set(b)) / 10 for a, b in zip(trained, folded, strict=True)]
    assert np.mean(overlap) >= 0.9
    assert not (trained == folded).all()  # two different paths, not one list twice


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


# --------------------------------------------------------------------------------- GF-CF
def _at_a_gap(values: np.ndarray, around: int) -> int:
    """A number of singular vectors near ``around`` after which the spectrum has a clear gap
    (a subspace cut inside a cluster of equal values is not unique)."""
    gaps = (values[:-1] - values[1:]) / values[0]
    candidates = [k for k in range(2, len(values) - 1) if gaps[k - 1] > 1e-3]
    return min(candidates, key=lambda k: abs(k - around))


def test_gfcf_filter_is_the_papers_formula(synthetic: Synthetic) -> None:
    """R̃ᵀR̃ + alpha D^-beta V Vᵀ D^beta, computed densely with an exact SVD, equals the fit."""
    binary = (synthetic.user_items.toarray() != 0).astype(np.float64)
    users, items = binary.sum(axis=1), binary.sum(axis=0)
    normalized = binary / np.sqrt(users)[:, None] / np.sqrt(items)[None, :]
    _, values, vt = np.linalg.svd(normalized, full_matrices=False)
    k = _at_a_gap(values, 6)
    model = GFCF(alpha=0.7, beta=0.5, factors=k).fit(synthetic.user_items)
    v = vt[:k].T
    expected = normalized.T @ normalized
    expected += 0.7 * (v / np.sqrt(items)[:, None]) @ (v * np.sqrt(items)[:, None]).T
    np.testing.assert_allclose(model.weights, expected, atol=1e-4)
    # A user's scores are the sum of the filter's rows of their items (binary, as in the paper).
    row = synthetic.user_items[3]
    np.testing.assert_allclose(
        model.score_users(np.array([3]), row)[0], model.weights[row.indices].sum(axis=0), rtol=1e-5
    )


@pytest.mark.parametrize("path", ["dense", "lanczos"])
def test_gfcf_svd_finds_the_leading_subspace(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both paths (dense for a short side, Lanczos for a large matrix) find the leading right
    singular vectors: each exact one lies in the found subspace."""
    if path == "lanczos":  # what a large catalog takes, on a matrix small enough to check
        monkeypatch.setattr(models.gfcf, "_DENSE_SIDE", 10)
    rng = np.random.default_rng(1)
    n_rows, n_cols = 600, 250
    # Low-rank structure plus sparse noise, as interaction data has: a decaying spectrum.
    left, right = rng.random((n_rows, 12)), rng.random((12, n_cols))
    dense = (left @ right) * (rng.random((n_rows, n_cols)) < 0.02)
    matrix = sp.csr_matrix(dense, dtype=np.float32)
    _, values, vt = np.linalg.svd(matrix.toarray().astype(np.float64), full_matrices=False)
    k = _at_a_gap(values, 10)
    found = top_right_singular_vectors(matrix, k)
    kept = np.linalg.norm(found.T @ vt[:k].T, axis=0)
    assert kept.min() > 0.999
    np.testing.assert_allclose(found.T @ found, np.eye(k), atol=1e-4)


def test_gfcf_refuses_a_catalog_over_the_memory_budget(synthetic: Synthetic) -> None:
    model = GFCF(max_memory_gb=1e-5)
    needed = gfcf_memory_gb(synthetic.n_items)
    assert needed == pytest.approx(synthetic.n_items**2 * 4 * 2 / 1e9)
    with pytest.raises(ModelTooLargeError) as info:
        model.fit(synthetic.user_items)
    assert f"{needed:.2f} GB" in str(info.value) and "max_memory_gb=1e-05" in str(info.value)
    assert not model.is_fitted


def test_gfcf_without_the_ideal_filter_is_the_linear_filter(synthetic: Synthetic) -> None:
    linear = GFCF(alpha=0.0).fit(synthetic.user_items)
    both = GFCF(alpha=0.3, factors=4).fit(synthetic.user_items)
    assert not np.allclose(linear.weights, both.weights)
    np.testing.assert_allclose(linear.weights, linear.weights.T, atol=1e-6)  # R̃ᵀR̃ is symmetric
