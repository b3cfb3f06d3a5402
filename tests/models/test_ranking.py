"""The ranking pipeline in external ids: source selection, filters, exclusions and backfill.

The pipeline serves a bundle that wraps ALS fitted on the two-cluster synthetic data (items
``i0..i29`` vs ``i30..i59``); the catalog alternates content/product, cycles news/sport/music
and marks i0 and i30, the most popular item of each cluster, unavailable (see ``conftest.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import scipy.sparse as sp

from models.artifact import ModelBundle
from models.base import Recommender
from models.errors import InvalidInputError, NotFoundError, NotReadyError
from models.ranking import ItemFilter, ListKind, ListRequest, RankingPipeline, Source
from tests.models.conftest import HALF, Synthetic

UNAVAILABLE = {"i0", f"i{HALF}"}


@pytest.fixture(scope="module")
def pipeline(pipeline_for: Callable[[str], RankingPipeline]) -> RankingPipeline:
    return pipeline_for("als")


def number(item_id: str) -> int:
    return int(item_id[1:])


def cluster_of(item_ids: list[str]) -> list[int]:
    return [number(i) // HALF for i in item_ids]


def seen_of(synthetic: Synthetic, user: int) -> set[str]:
    return {f"i{i}" for i in synthetic.user_items[user].indices}


def test_known_user_gets_unseen_items_of_their_taste(
    pipeline: RankingPipeline, synthetic: Synthetic
) -> None:
    recs = pipeline.recommend("u4", 10)
    assert recs.source is Source.PERSONALIZED
    assert len(recs) == 10
    assert not set(recs.item_ids) & seen_of(synthetic, 4)
    assert cluster_of(recs.item_ids) == [0] * 10
    assert recs.scores == sorted(recs.scores, reverse=True)


def test_include_seen_lets_seen_items_back(pipeline: RankingPipeline, synthetic: Synthetic) -> None:
    recs = pipeline.recommend("u4", 10, include_seen=True)
    assert recs.source is Source.PERSONALIZED
    assert set(recs.item_ids) & seen_of(synthetic, 4)


def test_recent_items_move_a_known_user_toward_them(
    pipeline: RankingPipeline, synthetic: Synthetic
) -> None:
    recent = [f"i{HALF + j}" for j in (1, 2, 3, 4)]
    before = pipeline.recommend("u4", 10)
    after = pipeline.recommend("u4", 10, recent_item_ids=recent)
    assert after.source is Source.PERSONALIZED
    assert sum(cluster_of(after.item_ids)) > sum(cluster_of(before.item_ids))
    assert not set(after.item_ids) & (seen_of(synthetic, 4) | set(recent))


def test_unknown_user_with_recent_items_is_folded_in(pipeline: RankingPipeline) -> None:
    recent = ["i31", "i33", "i35", "no-such-item"]
    recs = pipeline.recommend("stranger", 6, recent_item_ids=recent)
    assert recs.source is Source.FOLD_IN
    assert len(recs) == 6
    assert cluster_of(recs.item_ids) == [1] * 6
    assert not set(recs.item_ids) & set(recent)


def test_unknown_user_without_history_gets_popular_items(pipeline: RankingPipeline) -> None:
    recs = pipeline.recommend("stranger", 5, recent_item_ids=["no-such-item"])
    assert recs.source is Source.POPULAR
    assert recs.item_ids == pipeline.popular(5).item_ids


@pytest.mark.parametrize(
    ("flt", "holds"),
    [
        (ItemFilter.of(item_types=["product"]), lambda i: i % 2 == 1),
        (ItemFilter.of(categories=["sport"]), lambda i: i % 3 == 1),
        (ItemFilter.of(categories=["sport", "music"]), lambda i: i % 3 != 0),
        (ItemFilter.of(item_types=["content"], categories=["news"]), lambda i: i % 6 == 0),
    ],
)
def test_filters_hold_on_every_path(
    pipeline: RankingPipeline, flt: ItemFilter, holds: Callable[[int], bool]
) -> None:
    answers = [
        pipeline.recommend("u4", 8, item_filter=flt),
        pipeline.recommend("u5", 8, item_filter=flt, include_seen=True),
        pipeline.recommend("stranger", 8, recent_item_ids=["i31", "i32"], item_filter=flt),
        pipeline.recommend("stranger", 8, item_filter=flt),
        pipeline.similar_items(["i7", "i8"], 8, item_filter=flt),
        pipeline.popular(8, item_filter=flt, trending=True),
    ]
    for recs in answers:
        assert len(recs) == 8
        assert all(holds(number(i)) for i in recs.item_ids), (recs.source, recs.item_ids)


def test_unknown_item_type_names_the_field(pipeline: RankingPipeline) -> None:
    with pytest.raises(InvalidInputError, match="'video'") as info:
        pipeline.recommend("u4", 5, item_filter=ItemFilter.of(item_types=["video"]))
    assert info.value.field == "item_types"


def test_unavailable_items_are_never_returned(pipeline: RankingPipeline) -> None:
    everything = 2 * HALF
    answers = [
        pipeline.recommend("u4", everything, include_seen=True),
        pipeline.recommend("u5", everything, recent_item_ids=["i30", "i0"], include_seen=True),
        pipeline.recommend("stranger", everything, recent_item_ids=["i30"]),
        pipeline.similar_items(["i1", "i31"], everything),
        pipeline.popular(everything),
        pipeline.popular(everything, trending=True),
    ]
    for recs in answers:
        assert not set(recs.item_ids) & UNAVAILABLE
        assert len(recs) == len(set(recs.item_ids))
    assert len(answers[0]) == everything - len(UNAVAILABLE)


def test_exactly_the_filtered_catalog_comes_back(
    pipeline: RankingPipeline, synthetic: Synthetic
) -> None:
    flt = ItemFilter.of(item_types=["product"], categories=["music"])  # i5, i11, ..., i59
    catalog = {f"i{i}" for i in range(5, 2 * HALF, 6)}
    candidates = catalog - seen_of(synthetic, 4)
    recs = pipeline.recommend("u4", len(candidates), item_filter=flt)
    assert set(recs.item_ids) == candidates
    # Asking for more never pads the list with items outside the filter.
    recs = pipeline.recommend("u4", 50, item_filter=flt)
    assert set(recs.item_ids) == candidates


class FirstClusterOnly:
    """A scorer that ranks only the first cluster, in index order; the rest cannot be ranked."""

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items

    def _rows(self, n: int) -> np.ndarray:
        scores = np.full((n, self.n_items), -np.inf, dtype=np.float32)
        scores[:, :HALF] = -np.arange(HALF, dtype=np.float32)
        return scores

    def score_users(self, userids: np.ndarray, user_items: sp.csr_matrix) -> np.ndarray:
        return self._rows(len(userids))

    def score_history(self, history: sp.csr_matrix) -> np.ndarray:
        return self._rows(history.shape[0])

    def score_similar(self, itemids: np.ndarray) -> np.ndarray:
        return self._rows(len(itemids))


def test_starved_lists_are_backfilled_from_popular_items(
    bundle_for: Callable[[str], ModelBundle],
) -> None:
    bundle = bundle_for("als")
    pipeline = RankingPipeline(
        FirstClusterOnly(len(bundle.items)),
        seen=bundle.seen,
        popularity=bundle.popularity,
        catalog=bundle.catalog,
        users=bundle.users,
        items=bundle.items,
    )
    flt = ItemFilter.of(item_types=["product"])
    for recs in (
        pipeline.recommend("u4", 25, item_filter=flt, exclude_item_ids=["i59"], include_seen=True),
        pipeline.recommend(
            "new", 25, recent_item_ids=["i3"], item_filter=flt, exclude_item_ids=["i59"]
        ),
    ):
        assert len(recs) == 25
        ids = [number(i) for i in recs.item_ids]
        assert all(i % 2 == 1 for i in ids)
        assert 59 not in ids
        ranked = [i for i in ids if i < HALF]
        assert ranked == sorted(ranked)  # the model's own order comes first ...
        backfill = ids[len(ranked) :]
        assert len(backfill) >= 25 - HALF // 2
        assert all(i >= HALF for i in backfill)  # ... then popular items fill the rest
        assert (np.diff(pipeline.popularity[backfill]) <= 0).all()
    # Evaluation's batches backfill the same way.
    exclude = sp.csr_matrix(([1.0], ([0], [59])), shape=(1, len(bundle.items)))
    batch = pipeline.rank_users(
        np.array([4]), 25, exclude=exclude, include_seen=True, item_filter=flt
    )
    first = pipeline.recommend(
        "u4", 25, item_filter=flt, exclude_item_ids=["i59"], include_seen=True
    )
    np.testing.assert_array_equal(batch[0], first.indices)


def test_exclusions_hold(pipeline: RankingPipeline) -> None:
    first = pipeline.recommend("u4", 5)
    excluded = [*first.item_ids[:3], "not-an-item"]
    again = pipeline.recommend("u4", 5, exclude_item_ids=excluded)
    assert len(again) == 5
    assert not set(again.item_ids) & set(excluded)
    popular = pipeline.popular(5, exclude_item_ids=pipeline.popular(2).item_ids)
    assert popular.item_ids == pipeline.popular(7).item_ids[2:]
    similar = pipeline.similar_items(["i5"], 5, exclude_item_ids=["i1", "i2", "i3"])
    assert not {"i1", "i2", "i3", "i5"} & set(similar.item_ids)


def test_similar_items_never_returns_the_query(pipeline: RankingPipeline) -> None:
    query = ["i3", "i4", "i5"]
    recs = pipeline.similar_items(query, 10)
    assert len(recs) == 10
    assert not set(recs.item_ids) & set(query)
    assert cluster_of(recs.item_ids) == [0] * 10


def test_similar_items_rejects_unknown_and_empty_queries(pipeline: RankingPipeline) -> None:
    with pytest.raises(NotFoundError, match="'nope'"):
        pipeline.similar_items(["i3", "nope"], 5)
    with pytest.raises(InvalidInputError) as info:
        pipeline.similar_items([], 5)
    assert info.value.field == "item_ids"


def test_k_must_be_positive(pipeline: RankingPipeline) -> None:
    for call in (
        lambda: pipeline.recommend("u4", 0),
        lambda: pipeline.similar_items(["i1"], -1),
        lambda: pipeline.popular(0),
    ):
        with pytest.raises(InvalidInputError) as info:
            call()
        assert info.value.field == "k"


@pytest.mark.parametrize("trending", [False, True])
def test_popular_and_trending_rank_within_the_filter(
    pipeline: RankingPipeline, trending: bool
) -> None:
    flt = ItemFilter.of(categories=["news"])
    recs = pipeline.popular(6, item_filter=flt, trending=trending)
    assert recs.source is Source.POPULAR
    scores = pipeline.trending if trending else pipeline.popularity
    eligible = [i for i in range(0, 2 * HALF, 3) if f"i{i}" not in UNAVAILABLE]
    expected = sorted(eligible, key=lambda i: (-scores[i], i))[:6]
    assert [number(i) for i in recs.item_ids] == expected
    assert recs.scores == pytest.approx(scores[expected].tolist())


def test_trending_differs_from_popular(pipeline: RankingPipeline) -> None:
    # Trending counts only recent users, so on this data its order is not the all-time order.
    assert pipeline.popular(10, trending=True).item_ids != pipeline.popular(10).item_ids


def test_lists_carry_their_model_indices(pipeline: RankingPipeline) -> None:
    for recs in (
        pipeline.recommend("u4", 6),
        pipeline.recommend("stranger", 6, recent_item_ids=["i40"]),
        pipeline.similar_items(["i9"], 6),
        pipeline.popular(6),
    ):
        assert recs.indices.tolist() == [number(i) for i in recs.item_ids]


def test_a_pipeline_without_id_maps_ranks_only_model_indices(
    fitted: Callable[[str], Recommender], synthetic: Synthetic
) -> None:
    pipeline = RankingPipeline.for_training(fitted("als"), synthetic.user_items)
    with pytest.raises(NotReadyError, match="no id maps"):
        pipeline.recommend("u4", 5)
    with pytest.raises(NotReadyError, match="no id maps"):
        pipeline.similar_items(["i1"], 5)
    ranked = pipeline.rank(ListRequest(ListKind.USER, 5, user=4))
    assert len(ranked.ids) == 5


@pytest.mark.parametrize("trending", [False, True])
def test_popular_items_read_in_chunks_equal_the_whole_order_filtered(trending: bool) -> None:
    """``_popular`` stops reading the popular order once it has ``k`` items; the answer is the
    one the whole order, filtered, gives (any k, mask and blocked items, several chunks deep:
    a popularity model over 20,000 items)."""
    from models.algorithms import get_algorithm

    rng = np.random.default_rng(3)
    n, n_users = 20_000, 50
    seen = sp.random(n_users, n, density=0.01, format="csr", random_state=4, dtype=np.float32)
    model = get_algorithm("popularity")().fit(seen)
    popularity = rng.random(n).astype(np.float32)
    pipeline = RankingPipeline(
        model, seen=seen, popularity=popularity, trending=rng.random(n).astype(np.float32)
    )
    order = pipeline._trending_order if trending else pipeline._popular_order
    for _ in range(200):
        k = int(rng.choice([0, 1, 10, 100, 3000, n, n + 5]))
        mask = rng.random(n) < rng.choice([0.01, 0.2, 0.9, 1.0])
        blocked = rng.choice(n, size=int(rng.integers(0, 30)), replace=True).astype(np.int64)
        ids, scores = pipeline._popular(k, mask, blocked, trending=trending)
        keep = mask[order] & ~np.isin(order, blocked)
        expected = order[keep][: max(k, 0)]
        assert np.array_equal(ids, expected)
        source = pipeline.trending if trending else pipeline.popularity
        assert np.array_equal(scores, source[expected])
