"""The query engine in external ids: source selection, filters, exclusions and backfill.

The bundle wraps ALS fitted on the two-cluster synthetic data (items ``i0..i29`` vs ``i30..i59``);
the catalog alternates content/product, cycles news/sport/music and marks i0 and i30, the most
popular item of each cluster, unavailable (see ``conftest.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import scipy.sparse as sp

from models.artifact import ModelBundle
from models.engine import Engine, ItemFilter, Source
from models.errors import InvalidInputError, NotFoundError
from models.popularity import Popularity
from tests.models.conftest import HALF, Synthetic

UNAVAILABLE = {"i0", f"i{HALF}"}


@pytest.fixture(scope="module")
def engine(bundle_for: Callable[[str], ModelBundle]) -> Engine:
    return Engine(bundle_for("als"))


def number(item_id: str) -> int:
    return int(item_id[1:])


def cluster_of(item_ids: list[str]) -> list[int]:
    return [number(i) // HALF for i in item_ids]


def seen_of(synthetic: Synthetic, user: int) -> set[str]:
    return {f"i{i}" for i in synthetic.user_items[user].indices}


def test_known_user_gets_unseen_items_of_their_taste(engine: Engine, synthetic: Synthetic) -> None:
    recs = engine.recommend("u4", 10)
    assert recs.source is Source.PERSONALIZED
    assert len(recs) == 10
    assert not set(recs.item_ids) & seen_of(synthetic, 4)
    assert cluster_of(recs.item_ids) == [0] * 10
    assert recs.scores == sorted(recs.scores, reverse=True)


def test_include_seen_lets_seen_items_back(engine: Engine, synthetic: Synthetic) -> None:
    recs = engine.recommend("u4", 10, include_seen=True)
    assert recs.source is Source.PERSONALIZED
    assert set(recs.item_ids) & seen_of(synthetic, 4)


def test_recent_items_move_a_known_user_toward_them(engine: Engine, synthetic: Synthetic) -> None:
    recent = [f"i{HALF + j}" for j in (1, 2, 3, 4)]
    before = engine.recommend("u4", 10)
    after = engine.recommend("u4", 10, recent_item_ids=recent)
    assert after.source is Source.PERSONALIZED
    assert sum(cluster_of(after.item_ids)) > sum(cluster_of(before.item_ids))
    assert not set(after.item_ids) & (seen_of(synthetic, 4) | set(recent))


def test_unknown_user_with_recent_items_is_folded_in(engine: Engine) -> None:
    recent = ["i31", "i33", "i35", "no-such-item"]
    recs = engine.recommend("stranger", 6, recent_item_ids=recent)
    assert recs.source is Source.FOLD_IN
    assert len(recs) == 6
    assert cluster_of(recs.item_ids) == [1] * 6
    assert not set(recs.item_ids) & set(recent)


def test_unknown_user_without_history_gets_popular_items(engine: Engine) -> None:
    recs = engine.recommend("stranger", 5, recent_item_ids=["no-such-item"])
    assert recs.source is Source.POPULAR
    assert recs.item_ids == engine.popular(5).item_ids


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
    engine: Engine, flt: ItemFilter, holds: Callable[[int], bool]
) -> None:
    answers = [
        engine.recommend("u4", 8, item_filter=flt),
        engine.recommend("u5", 8, item_filter=flt, include_seen=True),
        engine.recommend("stranger", 8, recent_item_ids=["i31", "i32"], item_filter=flt),
        engine.recommend("stranger", 8, item_filter=flt),
        engine.similar_items(["i7", "i8"], 8, item_filter=flt),
        engine.popular(8, item_filter=flt, trending=True),
    ]
    for recs in answers:
        assert len(recs) == 8
        assert all(holds(number(i)) for i in recs.item_ids), (recs.source, recs.item_ids)


def test_unknown_item_type_names_the_field(engine: Engine) -> None:
    with pytest.raises(InvalidInputError, match="'video'") as info:
        engine.recommend("u4", 5, item_filter=ItemFilter.of(item_types=["video"]))
    assert info.value.field == "item_types"


def test_unavailable_items_are_never_returned(engine: Engine) -> None:
    everything = 2 * HALF
    answers = [
        engine.recommend("u4", everything, include_seen=True),
        engine.recommend("u5", everything, recent_item_ids=["i30", "i0"], include_seen=True),
        engine.recommend("stranger", everything, recent_item_ids=["i30"]),
        engine.similar_items(["i1", "i31"], everything),
        engine.popular(everything),
        engine.popular(everything, trending=True),
    ]
    for recs in answers:
        assert not set(recs.item_ids) & UNAVAILABLE
        assert len(recs) == len(set(recs.item_ids))
    assert len(answers[0]) == everything - len(UNAVAILABLE)


def test_exactly_the_filtered_catalog_comes_back(engine: Engine, synthetic: Synthetic) -> None:
    flt = ItemFilter.of(item_types=["product"], categories=["music"])  # i5, i11, ..., i59
    catalog = {f"i{i}" for i in range(5, 2 * HALF, 6)}
    candidates = catalog - seen_of(synthetic, 4)
    recs = engine.recommend("u4", len(candidates), item_filter=flt)
    assert set(recs.item_ids) == candidates
    # Asking for more never pads the list with items outside the filter.
    recs = engine.recommend("u4", 50, item_filter=flt)
    assert set(recs.item_ids) == candidates


def test_starved_lists_are_backfilled_from_popular_items(
    bundle_for: Callable[[str], ModelBundle],
) -> None:
    class FirstClusterOnly(Popularity):
        """Scores only the first cluster; the rest cannot be ranked (-inf)."""

        def score_users(self, userids: np.ndarray, user_items: sp.csr_matrix) -> np.ndarray:
            scores = np.full((len(userids), self.n_items), -np.inf, dtype=np.float32)
            scores[:, :HALF] = -np.arange(HALF, dtype=np.float32)
            return scores

    bundle = bundle_for("popularity")
    model = FirstClusterOnly().fit(bundle.seen)
    engine = Engine(ModelBundle(**{**bundle.__dict__, "model": model}))
    flt = ItemFilter.of(item_types=["product"])
    recs = engine.recommend("u4", 25, item_filter=flt, exclude_item_ids=["i59"], include_seen=True)
    assert len(recs) == 25
    ids = [number(i) for i in recs.item_ids]
    assert all(i % 2 == 1 for i in ids)
    assert 59 not in ids
    ranked = [i for i in ids if i < HALF]
    assert ranked == sorted(ranked)  # the model's own order comes first ...
    backfill = ids[len(ranked) :]
    assert all(i >= HALF for i in backfill)  # ... then popular items fill the rest
    popularity = engine.bundle.popularity[backfill]
    assert (np.diff(popularity) <= 0).all()


def test_exclusions_hold(engine: Engine) -> None:
    first = engine.recommend("u4", 5)
    excluded = [*first.item_ids[:3], "not-an-item"]
    again = engine.recommend("u4", 5, exclude_item_ids=excluded)
    assert len(again) == 5
    assert not set(again.item_ids) & set(excluded)
    popular = engine.popular(5, exclude_item_ids=engine.popular(2).item_ids)
    assert popular.item_ids == engine.popular(7).item_ids[2:]
    similar = engine.similar_items(["i5"], 5, exclude_item_ids=["i1", "i2", "i3"])
    assert not {"i1", "i2", "i3", "i5"} & set(similar.item_ids)


def test_similar_items_never_returns_the_query(engine: Engine) -> None:
    query = ["i3", "i4", "i5"]
    recs = engine.similar_items(query, 10)
    assert len(recs) == 10
    assert not set(recs.item_ids) & set(query)
    assert cluster_of(recs.item_ids) == [0] * 10


def test_similar_items_rejects_unknown_and_empty_queries(engine: Engine) -> None:
    with pytest.raises(NotFoundError, match="'nope'"):
        engine.similar_items(["i3", "nope"], 5)
    with pytest.raises(InvalidInputError) as info:
        engine.similar_items([], 5)
    assert info.value.field == "item_ids"


def test_k_must_be_positive(engine: Engine) -> None:
    for call in (
        lambda: engine.recommend("u4", 0),
        lambda: engine.similar_items(["i1"], -1),
        lambda: engine.popular(0),
    ):
        with pytest.raises(InvalidInputError) as info:
            call()
        assert info.value.field == "k"


@pytest.mark.parametrize("trending", [False, True])
def test_popular_and_trending_rank_within_the_filter(engine: Engine, trending: bool) -> None:
    flt = ItemFilter.of(categories=["news"])
    recs = engine.popular(6, item_filter=flt, trending=trending)
    assert recs.source is Source.POPULAR
    scores = engine.bundle.trending if trending else engine.bundle.popularity
    eligible = [i for i in range(0, 2 * HALF, 3) if f"i{i}" not in UNAVAILABLE]
    expected = sorted(eligible, key=lambda i: (-scores[i], i))[:6]
    assert [number(i) for i in recs.item_ids] == expected
    assert recs.scores == pytest.approx(scores[expected].tolist())


def test_trending_differs_from_popular(engine: Engine) -> None:
    # Trending counts only recent users, so on this data its order is not the all-time order.
    assert engine.popular(10, trending=True).item_ids != engine.popular(10).item_ids
