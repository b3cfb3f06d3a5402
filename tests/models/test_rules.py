"""Ranking rules (``models/rules.py``): each rule's effect, how they compose with filters,
exclusions, dislikes and one another, one list and a batch of them alike, validation, and that
requests without rules are untouched.

Most effects are checked on a hand-built model whose scores and item similarities are chosen
(:class:`FixedScorer`), so the expected lists can be worked out by hand; the compositions and
the agreement of ``rank`` with ``rank_users`` also run on the fitted models of ``conftest.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp

from models.algorithms import algorithm_names
from models.artifact import ItemCatalog
from models.base import Recommender
from models.errors import InvalidInputError
from models.ranking import (
    ItemFilter,
    ListKind,
    ListRequest,
    Ranked,
    RankingPipeline,
    Reason,
    external_user_key,
)
from models.rules import (
    Boost,
    Diversity,
    Exploration,
    Promotion,
    Rotation,
    Rules,
    draw_keys,
    slot_count,
    slot_positions,
)
from models.vocabulary import MISSING
from tests.models.conftest import HALF, Synthetic, make_catalog

Fitted = Callable[[str], Recommender]
Pipelines = Callable[[str], RankingPipeline]
ALGORITHMS = algorithm_names()
DAY = 86_400.0
NOW = 1.7e9


# --------------------------------------------------------------------------- a hand-built model
N = 40
CATEGORY = np.array(["a"] * 30 + ["b"] * 5 + ["c"] * 5)
"""Items 0-29 are "a", 30-34 "b", 35-39 "c"."""
GROUP = np.arange(N) // 10
"""Near-duplicates: items of one group of ten are alike (similarity 1), others unlike (0)."""
UNAVAILABLE = 2


@dataclass
class FixedScorer:
    """A model whose scores are given: user ``u`` scores item ``i`` ``scores[u, i]``."""

    scores: np.ndarray
    similarity: np.ndarray
    is_fitted: bool = True

    @property
    def n_items(self) -> int:
        return int(self.scores.shape[1])

    def score_users(self, userids: np.ndarray, user_items: sp.csr_matrix) -> np.ndarray:
        return np.array(self.scores[np.asarray(userids)], dtype=np.float32)

    def score_history(self, history: sp.csr_matrix) -> np.ndarray:
        return np.asarray(sp.csr_matrix(history) @ self.similarity, dtype=np.float32)

    def score_similar(self, itemids: np.ndarray) -> np.ndarray:
        return np.array(self.similarity[np.asarray(itemids)], dtype=np.float32)


def hand_pipeline(**options: Any) -> RankingPipeline:
    """Three users over 40 items: user 0 likes low indices best (scores 40..1), user 1 the
    same order shifted to half negative scores (20..-19), user 2 has scores only for items
    0-4 (the rest NaN: no candidates). Popularity ranks the items the other way round."""
    idx = np.arange(N, dtype=np.float32)
    scores = np.stack([N - idx, N / 2 - idx, np.where(idx < 5, N - idx, np.nan)])
    similarity = (GROUP[:, None] == GROUP[None, :]).astype(np.float32)
    catalog = ItemCatalog(
        item_type=np.where(np.arange(N) % 2 == 0, "content", "product"),
        category=CATEGORY.copy(),
        title=np.array([f"Item {i}" for i in range(N)]),
        available=np.arange(N) != UNAVAILABLE,
        first_seen=np.where(np.arange(N) % 10 == 9, NOW - DAY, NOW - 100 * DAY),
    )
    return RankingPipeline(
        FixedScorer(scores.astype(np.float32), similarity),
        seen=sp.csr_matrix((3, N), dtype=np.float32),
        popularity=idx + 1,
        catalog=catalog,
        **options,
    )


@pytest.fixture(scope="module")
def hand() -> RankingPipeline:
    return hand_pipeline()


def ranked(pipeline: RankingPipeline, k: int, rules: Rules | None, **options: Any) -> Ranked:
    options.setdefault("user", 0)
    return pipeline.rank(ListRequest(ListKind.USER, k, rules=rules, **options))


def plain_scores(pipeline: RankingPipeline, user: int) -> np.ndarray:
    """Every item's score for ``user`` (NaN where none)."""
    model = pipeline.model
    assert isinstance(model, FixedScorer)
    return model.scores[user]


def reasons_of(got: Ranked) -> list[Reason]:
    return [Reason(int(r)) for r in got.reason_codes()]


# --------------------------------------------------------------------------- no rules
@pytest.mark.parametrize("name", ALGORITHMS)
def test_requests_without_rules_are_unchanged(name: str, pipeline_for: Pipelines) -> None:
    """No rules (or rules that ask for nothing) run no stage, fetch no extra candidates, and
    give the same ids and scores, with no reasons array."""
    pipeline = pipeline_for(name)
    request = ListRequest(ListKind.USER, 6, user=4)
    assert pipeline._stages_for(request) is pipeline.stages
    plain = pipeline.rank(request)
    assert plain.reasons is None
    assert plain.reason_codes().tolist() == [Reason.MODEL] * 6
    for rules in (Rules(), Rules(diversity=Diversity()), Rules(rotation=rotation_of([], []))):
        assert rules.empty
        request = ListRequest(ListKind.USER, 6, user=4, rules=rules)
        assert pipeline._stages_for(request) is pipeline.stages
        got = pipeline.rank(request)
        np.testing.assert_array_equal(got.ids, plain.ids)
        np.testing.assert_array_equal(got.scores, plain.scores)
        assert got.reasons is None
    users = np.array([1, 4, 9])
    np.testing.assert_array_equal(
        pipeline.rank_users(users, 6, rules=Rules()), pipeline.rank_users(users, 6)
    )
    recs = pipeline.recommend("u4", 6)
    assert recs.reasons is None and recs.reason_list() == [Reason.MODEL] * 6


@dataclass
class Recording:
    """A stage that records how many candidates it gets."""

    candidates_per_slot: int = 1
    sizes: list[int] | None = None

    def __call__(
        self, ids: np.ndarray, scores: np.ndarray, request: ListRequest
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self.sizes is not None
        self.sizes.append(len(ids))
        return ids, scores


def test_only_requests_with_rules_fetch_more_candidates() -> None:
    sizes: list[int] = []
    pipeline = hand_pipeline(stages=[Recording(sizes=sizes)])
    ranked(pipeline, 5, None)
    ranked(pipeline, 5, Rules())
    ranked(pipeline, 5, Rules(boosts=(Boost(ItemFilter.of(categories=["b"]), 2.0),)))
    ranked(pipeline, 5, Rules(diversity=Diversity(mmr=0.5)))
    assert sizes == [5, 5, 15, 20]


# --------------------------------------------------------------------------- boosts
def test_a_boost_multiplies_matching_scores_sign_safely(hand: RankingPipeline) -> None:
    """``s * f`` for ``s >= 0``, ``s / f`` below 0: user 1's scores run from 20 down to -19."""
    boost = Boost(ItemFilter.of(categories=["b"]), 4.0)
    got = ranked(hand, 12, Rules(boosts=(boost,)), user=1)
    raw = plain_scores(hand, 1)
    expected = {}
    for item in range(N):
        if item == UNAVAILABLE:
            continue
        s = float(raw[item])
        if CATEGORY[item] == "b":
            s = s * 4.0 if s >= 0 else s / 4.0
        expected[item] = s
    # The boosted "b" items (raw -10..-14) rise to -2.5..-3.5, above many "a" items.
    for item, score, why in zip(
        got.ids.tolist(), got.scores.tolist(), reasons_of(got), strict=True
    ):
        assert score == pytest.approx(expected[item])
        assert why is (Reason.BOOSTED if CATEGORY[item] == "b" else Reason.MODEL)
    best = sorted(expected, key=lambda i: (-expected[i], i))
    # Only the top k * 3 candidates are rescored; here they reach the "b" items.
    assert got.ids.tolist() == best[:12]
    assert np.all(np.diff(got.scores) <= 0)  # a rescoring rule keeps the list sorted by score


def test_a_boost_keeps_the_order_within_and_boosts_multiply(hand: RankingPipeline) -> None:
    first = Boost(ItemFilter.of(categories=["a"]), 0.5)  # demotes "a"
    second = Boost(ItemFilter.of(item_types=["content"]), 3.0)
    got = ranked(hand, 8, Rules(boosts=(first, second)))
    raw = plain_scores(hand, 0)
    factor = np.where(CATEGORY == "a", 0.5, 1.0) * np.where(np.arange(N) % 2 == 0, 3.0, 1.0)
    for item, score in zip(got.ids.tolist(), got.scores.tolist(), strict=True):
        assert score == pytest.approx(raw[item] * factor[item])
    assert [why is Reason.BOOSTED for why in reasons_of(got)] == (factor[got.ids] > 1).tolist()


# --------------------------------------------------------------------------- rotation
def rotation_of(items: list[int], ages: list[float], **options: Any) -> Rotation:
    return Rotation(np.array(items, dtype=np.int64), np.array(ages, dtype=np.float64), **options)


def test_rotation_demotes_recently_shown_items_by_their_age(hand: RankingPipeline) -> None:
    """Shown a moment ago at rate 1: the item falls by the whole spread of the candidates'
    scores; shown one half-life ago: half that; the latest showing of an item counts."""
    rotation = rotation_of(
        [0, 1, 1, 3], [0.0, 7200.0, 3600.0, 1e9], rate=1.0, half_life_seconds=3600
    )
    got = ranked(hand, 10, Rules(rotation=rotation))
    raw = plain_scores(hand, 0)
    pool = [i for i in range(N) if i != UNAVAILABLE][:30]  # k * 3 candidates
    spread = raw[pool].max() - raw[pool].min()
    assert spread == pytest.approx(30.0)
    expected = {i: float(raw[i]) for i in pool}
    expected[0] -= spread * 1.0
    expected[1] -= spread * 0.5  # its latest showing, an hour (one half-life) ago
    expected[3] -= spread * 2.0 ** (-1e9 / 3600)
    best = sorted(expected, key=lambda i: (-expected[i], i))[:10]
    assert got.ids.tolist() == best
    assert 0 not in got.ids and 1 not in got.ids and 3 in got.ids
    for item, score in zip(got.ids.tolist(), got.scores.tolist(), strict=True):
        assert score == pytest.approx(expected[item], abs=1e-4)
    assert got.reasons is None  # rotation claims nothing: still the model's ranking


def test_a_rotation_is_made_from_external_ids(pipeline_for: Pipelines) -> None:
    pipeline = pipeline_for("als")
    _, items = pipeline.vocabularies()
    rotation = Rotation.from_ids(items, ["i3", "nope", "i7"], [10.0, 20.0, 30.0], rate=1.0)
    assert rotation.shown_items.tolist() == [3, 7]
    assert rotation.shown_ages_seconds.tolist() == [10.0, 30.0]
    plain = pipeline.recommend("u4", 6)
    shown = Rotation.from_ids(items, plain.item_ids[:2], [0.0, 0.0], rate=1.0)
    got = pipeline.recommend("u4", 6, rules=Rules(rotation=shown))
    assert not set(plain.item_ids[:2]) & set(got.item_ids)
    with pytest.raises(InvalidInputError) as info:
        Rotation.from_ids(items, ["i3"], [1.0, 2.0])
    assert info.value.field == "rules.rotation.shown_ages_seconds"


def test_rotation_at_rate_zero_changes_nothing(hand: RankingPipeline) -> None:
    rules = Rules(rotation=rotation_of([0, 1], [0.0, 0.0], rate=0.0))
    assert rules.empty
    np.testing.assert_array_equal(ranked(hand, 5, rules).ids, ranked(hand, 5, None).ids)


# --------------------------------------------------------------------------- diversity
def test_a_category_cap_fetches_deeper_candidates(hand: RankingPipeline) -> None:
    """User 0's top 24 candidates are all "a": with at most two per category the list takes
    two "a", then the best "b" and "c" items from beyond the candidates."""
    got = ranked(hand, 6, Rules(diversity=Diversity(max_per_category=2)))
    assert got.ids.tolist() == [0, 1, 30, 31, 35, 36]
    np.testing.assert_array_equal(got.scores, plain_scores(hand, 0)[got.ids])
    batch = hand.rank_users(np.array([0]), 6, rules=Rules(diversity=Diversity(max_per_category=2)))
    assert batch[0].tolist() == got.ids.tolist()


def test_a_category_cap_is_hard_and_the_list_may_come_back_short(hand: RankingPipeline) -> None:
    """Three categories at two items each make six: the other places stay empty rather than
    break the cap (and no backfill is added after the rules)."""
    rules = Rules(diversity=Diversity(max_per_category=2))
    got = ranked(hand, 10, rules)
    assert len(got.ids) == 6
    assert sorted(CATEGORY[got.ids].tolist()) == ["a", "a", "b", "b", "c", "c"]
    batch = hand.rank_users(np.array([0]), 10, rules=rules)[0]
    assert batch[:6].tolist() == got.ids.tolist() and (batch[6:] == -1).all()


def test_a_category_cap_holds_over_the_backfill(hand: RankingPipeline) -> None:
    """User 2 has scores for items 0-4 only: the rest of the list is popular items (highest
    indices first), and the cap counts both."""
    plain = ranked(hand, 8, None, user=2)
    assert plain.ids[:4].tolist() == [0, 1, 3, 4] and plain.ids[4:].tolist() == [39, 38, 37, 36]
    got = ranked(hand, 8, Rules(diversity=Diversity(max_per_category=2)), user=2)
    assert got.ids.tolist() == [0, 1, 39, 38, 34, 33]  # two "a", two "c", two "b"
    counts = np.unique(CATEGORY[got.ids], return_counts=True)[1]
    assert counts.max() <= 2
    np.testing.assert_array_equal(
        hand.rank_users(np.array([2]), 8, rules=Rules(diversity=Diversity(max_per_category=2)))[0][
            :6
        ],
        got.ids,
    )


@pytest.mark.parametrize("mmr", [0.0, 0.5])
def test_a_list_with_no_candidates_is_made_from_the_backfill(
    hand: RankingPipeline, mmr: float
) -> None:
    """User 2 has no score for any "b" item: every place comes from the popular items, under
    the cap, as the plain pipeline's backfill would give them."""
    only_b = ItemFilter.of(categories=["b"])
    plain = ranked(hand, 4, None, user=2, item_filter=only_b)
    assert plain.ids.tolist() == [34, 33, 32, 31]
    got = ranked(
        hand, 4, Rules(diversity=Diversity(max_per_category=2, mmr=mmr)), user=2, item_filter=only_b
    )
    assert got.ids.tolist() == [34, 33]
    np.testing.assert_array_equal(got.scores, hand.popularity[got.ids])
    uncapped = ranked(hand, 4, Rules(diversity=Diversity(mmr=0.5)), user=2, item_filter=only_b)
    assert sorted(uncapped.ids.tolist()) == [31, 32, 33, 34]


def reference_mmr(
    ids: np.ndarray, scores: np.ndarray, sims: np.ndarray, mmr: float, k: int
) -> list[int]:
    """Greedy maximal marginal relevance, written out plainly."""
    relevance = (scores - scores.min()) / (scores.max() - scores.min())
    chosen: list[int] = []
    left = list(range(len(ids)))
    while left and len(chosen) < k:

        def value(row: int) -> float:
            nearest = max((sims[row, c] for c in chosen), default=0.0)
            return (1 - mmr) * relevance[row] - mmr * nearest

        best = max(left, key=lambda row: (value(row), -row))
        chosen.append(best)
        left.remove(best)
    return [int(ids[row]) for row in chosen]


@pytest.mark.parametrize("mmr", [0.2, 0.5, 0.8, 1.0])
def test_mmr_trades_relevance_for_diversity(hand: RankingPipeline, mmr: float) -> None:
    k = 6
    got = ranked(hand, k, Rules(diversity=Diversity(mmr=mmr)))
    pool = np.array([i for i in range(N) if i != UNAVAILABLE][: 4 * k])
    raw = plain_scores(hand, 0)[pool].astype(np.float64)
    sims = (GROUP[pool][:, None] == GROUP[pool][None, :]).astype(np.float64)
    assert got.ids.tolist() == reference_mmr(pool, raw, sims, mmr, k)
    assert got.ids[0] == 0  # the best item first, whatever the trade-off
    # Groups 0, 1 and 2 are among the candidates: an even trade-off or more takes all three
    # first; a light one only after the near-duplicates of the best items.
    if mmr >= 0.5:
        assert set(GROUP[got.ids[:3]].tolist()) == {0, 1, 2}
    else:
        assert got.ids[:2].tolist() == [0, 1] and len(set(GROUP[got.ids].tolist())) > 1
    np.testing.assert_array_equal(got.scores, plain_scores(hand, 0)[got.ids])  # model scores
    assert (got.reason_codes() == Reason.MODEL).all()


@pytest.mark.parametrize("name", ["als", "ease", "itemknn"])
def test_more_mmr_gives_less_similar_lists(name: str, pipeline_for: Pipelines) -> None:
    pipeline = pipeline_for(name)
    users = [1, 4, 9, 16, 25]

    def mean_similarity(mmr: float) -> float:
        rules = None if mmr == 0 else Rules(diversity=Diversity(mmr=mmr))
        values = []
        for user in users:
            got = pipeline.rank(ListRequest(ListKind.USER, 8, user=user, rules=rules))
            sims = pipeline.pairwise_similarity(got.ids)
            values.append((sims.sum() - len(got.ids)) / (len(got.ids) * (len(got.ids) - 1)))
        return float(np.mean(values))

    means = [mean_similarity(m) for m in (0.0, 0.5, 1.0)]
    assert means[0] > means[1] >= means[2] - 1e-6, means


def test_similar_items_take_diversity_too(pipeline_for: Pipelines) -> None:
    pipeline = pipeline_for("als")
    plain = pipeline.similar_items(["i5"], 6)
    capped = pipeline.similar_items(["i5"], 6, rules=Rules(diversity=Diversity(max_per_category=1)))
    assert len(capped) == 3  # three categories
    assert len(set(pipeline.catalog.category[capped.indices].tolist())) == 3
    assert capped.item_ids[0] == plain.item_ids[0]
    assert "i5" not in capped.item_ids


# --------------------------------------------------------------------------- promotions
def test_slots_are_spread_through_the_list() -> None:
    assert slot_count(10, 0.3) == 3 and slot_count(10, 0.25) == 3 and slot_count(10, 0.01) == 1
    assert slot_count(4, 1.0) == 4
    assert slot_positions(10, 1) == [5]
    assert slot_positions(10, 2) == [2, 7]
    assert slot_positions(10, 3) == [1, 5, 8]
    assert slot_positions(4, 4) == [0, 1, 2, 3]


def test_a_promotion_places_the_filters_best_items_in_spread_slots(
    hand: RankingPipeline,
) -> None:
    promotion = Promotion(ItemFilter.of(categories=["c"]), 0.3)
    got = ranked(hand, 10, Rules(promotion=promotion))
    why = reasons_of(got)
    promoted = [i for i, r in enumerate(why) if r is Reason.PROMOTED]
    assert promoted == [1, 5, 8]
    # The best "c" items for this user (far beyond its first 20 candidates), best first.
    assert got.ids[promoted].tolist() == [35, 36, 37]
    np.testing.assert_array_equal(got.scores, plain_scores(hand, 0)[got.ids])
    # The other places: the regular list, in order.
    regular = [i for i in range(N) if i != UNAVAILABLE][:7]
    assert [int(i) for i, r in zip(got.ids, why, strict=True) if r is Reason.MODEL] == regular


def test_a_promotion_with_too_few_items_leaves_its_places_to_the_others(
    hand: RankingPipeline,
) -> None:
    """Only two "b" content items are left after exclusions: they take the first two slots,
    the regular candidates fill the rest."""
    promotion = Promotion(ItemFilter.of(item_types=["content"], categories=["b"]), 0.5)
    got = ranked(hand, 8, Rules(promotion=promotion), exclude=np.array([30]))
    why = reasons_of(got)
    assert len(got.ids) == 8
    promoted = [i for i, r in enumerate(why) if r is Reason.PROMOTED]
    assert got.ids[promoted].tolist() == [32, 34]
    assert promoted == slot_positions(8, 4)[:2]
    assert 30 not in got.ids


def test_a_promotion_never_brings_back_what_the_request_rules_out(
    pipeline_for: Pipelines, synthetic: Synthetic
) -> None:
    """Promoted items pass the request's filter and are never excluded, disliked, seen or
    unavailable, however good they are for the user."""
    pipeline = RankingPipeline.from_bundle(pipeline_for("als").bundle, dislike_weight=0.5)
    user = 4  # the first cluster: items 0..29
    music = ItemFilter.of(categories=["music"])
    best_music = pipeline.rank(ListRequest(ListKind.USER, 6, user=user, item_filter=music)).ids
    exclude, disliked = best_music[:2], best_music[2:4]
    flt = ItemFilter.of(item_types=["content"])
    rules = Rules(promotion=Promotion(music, 0.5))
    got = pipeline.rank(
        ListRequest(
            ListKind.USER,
            8,
            user=user,
            exclude=exclude,
            disliked=disliked,
            item_filter=flt,
            rules=rules,
        )
    )
    assert len(got.ids) == 8
    promoted = got.ids[got.reason_codes() == Reason.PROMOTED]
    assert len(promoted) == 4
    assert (pipeline.catalog.category[promoted] == "music").all()
    assert (pipeline.catalog.item_type[got.ids] == "content").all()
    seen = set(synthetic.user_items[user].indices.tolist())
    forbidden = seen | set(exclude.tolist()) | set(disliked.tolist()) | {0, HALF}
    assert not forbidden & set(got.ids.tolist())
    # With include_seen, seen items may come back, still never excluded or disliked ones.
    again = pipeline.rank(
        ListRequest(
            ListKind.USER,
            8,
            user=user,
            exclude=exclude,
            disliked=disliked,
            include_seen=True,
            rules=rules,
        )
    )
    assert not (set(exclude.tolist()) | set(disliked.tolist()) | {0, HALF}) & set(
        again.ids.tolist()
    )


def test_a_promotion_over_unknown_item_types_names_its_field(hand: RankingPipeline) -> None:
    rules = Rules(promotion=Promotion(ItemFilter.of(item_types=["service"]), 0.2))
    with pytest.raises(InvalidInputError) as info:
        ranked(hand, 5, rules)
    assert info.value.field == "rules.promotion.item_filter"
    rules = Rules(boosts=(Boost(ItemFilter.of(item_types=["service"]), 2.0),))
    with pytest.raises(InvalidInputError) as info:
        ranked(hand, 5, rules)
    assert info.value.field == "rules.boosts.item_filter"


# --------------------------------------------------------------------------- exploration
def exploring(**options: Any) -> Rules:
    settings: dict[str, Any] = {"share": 0.2, "max_age_days": 7.0, "seed": 11, "now": NOW}
    settings.update(options)
    return Rules(exploration=Exploration(**settings))


NEW = [i for i in range(N) if i % 10 == 9]
"""The hand-built catalog's items first seen a day before NOW (the rest 100 days before)."""


def test_exploration_places_new_items_by_a_seeded_draw(hand: RankingPipeline) -> None:
    got = ranked(hand, 10, exploring())
    why = reasons_of(got)
    explored = [i for i, r in enumerate(why) if r is Reason.EXPLORED]
    assert explored == slot_positions(10, 2)
    items = got.ids[explored]
    assert set(items.tolist()) <= set(NEW)
    # The draw: the new items in increasing order of their keys for (seed, user, day).
    keys = draw_keys(11, 0, int(NOW // DAY), np.array(NEW))
    assert items.tolist() == np.array(NEW)[np.argsort(keys, kind="stable")][:2].tolist()
    # Their scores are the model's for this user, like everybody's.
    np.testing.assert_array_equal(got.scores, plain_scores(hand, 0)[got.ids])
    # Reproducible, and the same in a batch.
    np.testing.assert_array_equal(ranked(hand, 10, exploring()).ids, got.ids)
    assert hand.rank_users(np.array([0]), 10, rules=exploring())[0].tolist() == got.ids.tolist()


def test_the_draw_changes_with_seed_user_and_day(hand: RankingPipeline) -> None:
    def picks(**options: Any) -> tuple[int, ...]:
        user = options.pop("user", 0)
        got = ranked(hand, 10, exploring(share=0.1, **options), user=user)
        return tuple(got.ids[got.reason_codes() == Reason.EXPLORED].tolist())

    by_seed = {picks(seed=seed) for seed in range(12)}
    by_day = {picks(now=NOW + d * DAY, max_age_days=30.0) for d in range(12)}
    by_user = {picks(user_key=key) for key in range(12)}
    for draws in (by_seed, by_day, by_user):
        assert len(draws) > 1 and all(len(d) == 1 and d[0] in NEW for d in draws)


def test_exploration_respects_age_interactions_and_the_request(hand: RankingPipeline) -> None:
    # Nothing new enough: the plain list.
    old = ranked(hand, 10, exploring(max_age_days=0.5))
    np.testing.assert_array_equal(old.ids, ranked(hand, 10, None).ids)
    assert (old.reason_codes() == Reason.MODEL).all()
    # Popularity here is index + 1: at most 20 interactions leaves only items 9 and 19.
    few = ranked(hand, 10, exploring(share=0.3, max_interactions=20))
    assert set(few.ids[few.reason_codes() == Reason.EXPLORED].tolist()) == {9, 19}
    # Excluded and filtered-out items are never explored.
    got = ranked(
        hand,
        10,
        exploring(share=0.4),
        exclude=np.array([19, 29]),
        item_filter=ItemFilter.of(item_types=["product"]),
    )
    explored = got.ids[got.reason_codes() == Reason.EXPLORED]
    assert set(explored.tolist()) == {9, 39}  # 19 and 29 excluded
    assert (got.ids % 2 == 1).all()


def test_exploration_without_first_seen_explores_nothing(pipeline_for: Pipelines) -> None:
    pipeline = pipeline_for("als")  # the fixtures' catalog has no first_seen
    got = pipeline.recommend("u4", 8, rules=exploring())
    assert got.item_ids == pipeline.recommend("u4", 8).item_ids
    assert got.reason_list() == [Reason.MODEL] * 8


def test_recommend_draws_for_the_external_user_id(pipeline_for: Pipelines) -> None:
    """A known user draws with its id's key, so rank (by index) and recommend (by id) agree,
    and an unknown user gets a draw of its own."""
    bundle = pipeline_for("als").bundle
    assert bundle is not None
    first_seen = np.where(np.arange(60) % 3 == 0, NOW - DAY, NOW - 100 * DAY)
    pipeline = RankingPipeline.from_bundle(
        replace(bundle, catalog=replace(bundle.catalog, first_seen=first_seen))
    )
    rules = exploring(share=0.3)
    by_id = pipeline.recommend("u4", 10, rules=rules)
    by_index = pipeline.rank(ListRequest(ListKind.USER, 10, user=4, rules=rules))
    assert by_id.indices.tolist() == by_index.ids.tolist()
    assert by_id.reasons is not None and (by_id.reasons == Reason.EXPLORED).sum() == 3
    assert pipeline.user_key(4) == external_user_key("u4")
    a = pipeline.recommend("stranger-a", 10, recent_item_ids=["i4"], rules=rules)
    b = pipeline.recommend("stranger-a", 10, recent_item_ids=["i4"], rules=rules)
    assert a.item_ids == b.item_ids


# --------------------------------------------------------------------------- composition
def everything(k_user: int = 0) -> Rules:
    return Rules(
        diversity=Diversity(max_per_category=4, mmr=0.3),
        boosts=(Boost(ItemFilter.of(categories=["b"]), 2.0),),
        promotion=Promotion(ItemFilter.of(categories=["c"]), 0.2),
        exploration=Exploration(0.1, 7.0, seed=5, now=NOW),
        rotation=rotation_of([1, 3, 4], [0.0, 60.0, 3600.0], rate=0.8, half_life_seconds=600),
    )


def test_all_rules_together_keep_every_promise(hand: RankingPipeline) -> None:
    exclude = np.array([35, 9])
    got = ranked(hand, 10, everything(), exclude=exclude)
    why = reasons_of(got)
    assert len(got.ids) == 10 and len(set(got.ids.tolist())) == 10
    assert not {UNAVAILABLE, 35, 9} & set(got.ids.tolist())
    assert np.unique(CATEGORY[got.ids], return_counts=True)[1].max() <= 4
    promoted = [i for i, r in enumerate(why) if r is Reason.PROMOTED]
    assert promoted == slot_positions(10, 2)
    assert (CATEGORY[got.ids[promoted]] == "c").all()
    explored = [i for i, r in enumerate(why) if r is Reason.EXPLORED]
    assert len(explored) == 1 and got.ids[explored[0]] in NEW
    assert 1 not in got.ids[:3]  # just shown: rotated down
    boosted = [int(got.ids[i]) for i, r in enumerate(why) if r is Reason.BOOSTED]
    assert all(CATEGORY[i] == "b" for i in boosted)
    assert (
        hand.rank_users(
            np.array([0]),
            10,
            exclude=sp.csr_matrix((np.ones(2), (np.zeros(2), exclude)), shape=(1, N)),
            rules=everything(),
        )[0].tolist()
        == got.ids.tolist()
    )


def test_rules_compose_with_dislikes(pipeline_for: Pipelines) -> None:
    bundle = pipeline_for("als").bundle
    assert bundle is not None
    pipeline = RankingPipeline.from_bundle(bundle, dislike_weight=1.0)
    plain = pipeline.rank(ListRequest(ListKind.USER, 8, user=4))
    disliked = plain.ids[:1]
    rules = Rules(
        diversity=Diversity(max_per_category=3),
        promotion=Promotion(ItemFilter.of(categories=["sport"]), 0.25),
    )
    got = pipeline.rank(ListRequest(ListKind.USER, 8, user=4, disliked=disliked, rules=rules))
    assert disliked[0] not in got.ids
    assert np.unique(pipeline.catalog.category[got.ids], return_counts=True)[1].max() <= 3
    without = pipeline.rank(ListRequest(ListKind.USER, 8, user=4, rules=rules))
    assert got.ids.tolist() != without.ids.tolist()


RULE_SETS: dict[str, Rules] = {
    "cap": Rules(diversity=Diversity(max_per_category=2)),
    "mmr": Rules(diversity=Diversity(mmr=0.6)),
    "boost": Rules(boosts=(Boost(ItemFilter.of(categories=["sport"]), 1.5),)),
    "promotion": Rules(promotion=Promotion(ItemFilter.of(categories=["music"]), 0.3)),
    "exploration": Rules(exploration=Exploration(0.25, 7.0, seed=2, now=NOW)),
    "rotation": Rules(rotation=rotation_of([3, 5, 33, 35], [0.0, 100.0, 10.0, 5000.0], rate=1.0)),
    "everything": Rules(
        diversity=Diversity(max_per_category=3, mmr=0.3),
        boosts=(Boost(ItemFilter.of(item_types=["product"]), 2.0),),
        promotion=Promotion(ItemFilter.of(categories=["news"]), 0.2),
        exploration=Exploration(0.2, 7.0, seed=9, now=NOW),
        rotation=rotation_of([3, 33], [0.0, 10.0], rate=0.7),
    ),
}


@pytest.mark.parametrize("rules_name", list(RULE_SETS))
@pytest.mark.parametrize("name", ALGORITHMS)
def test_rank_and_rank_users_agree_with_rules(
    name: str, rules_name: str, fitted: Fitted, synthetic: Synthetic
) -> None:
    """The batch path gives every row the list rank gives that request, rules included, for
    trained users, a folded-in stranger and a cold start, with exclusions and a filter."""
    rules = RULE_SETS[rules_name]
    n_items = synthetic.n_items
    catalog = make_catalog(n_items)
    catalog.first_seen = np.where(np.arange(n_items) % 5 == 0, NOW - DAY, NOW - 90 * DAY)
    pipeline = RankingPipeline(
        fitted(name),
        seen=synthetic.user_items,
        popularity=np.bincount(synthetic.user_items.indices, minlength=n_items).astype(np.float32),
        catalog=catalog,
    )
    users = np.array([1, 4, MISSING, 9, MISSING, 16])
    stranger = [3, 4, 33]
    weight = float(np.median(synthetic.user_items.data))
    history = sp.csr_matrix(
        (np.full(3, weight, np.float32), (np.full(3, 2), stranger)), shape=(len(users), n_items)
    )
    rng = np.random.default_rng(7)
    exclude = [np.sort(rng.choice(n_items, size=4, replace=False)) for _ in users]
    exclude_matrix = sp.csr_matrix(
        (
            np.ones(sum(map(len, exclude))),
            (np.repeat(np.arange(len(users)), 4), np.concatenate(exclude)),
        ),
        shape=(len(users), n_items),
    )
    flt = ItemFilter.of(item_types=["content", "product"], categories=["news", "sport", "music"])
    k = 7
    batch = pipeline.rank_users(
        users, k, history=history, exclude=exclude_matrix, item_filter=flt, rules=rules
    )
    for row, user in enumerate(users.tolist()):
        single = pipeline.rank(
            ListRequest(
                ListKind.USER,
                k,
                user=user,
                recent=np.array(stranger) if row == 2 else np.empty(0, np.int64),
                exclude=exclude[row],
                item_filter=flt,
                rules=rules,
            )
        )
        got = batch[row][batch[row] >= 0]
        np.testing.assert_array_equal(got, single.ids, err_msg=f"row {row}, user {user}")
        assert not set(single.ids.tolist()) & (set(exclude[row].tolist()) | {0, HALF})


def test_an_ordering_stage_sets_the_order_until_a_scoring_stage_follows(
    hand: RankingPipeline,
) -> None:
    """The generic rule: an ``orders`` stage's order is kept (first k); a plain stage after it
    hands the order back to the scores."""

    class Reverse:
        candidates_per_slot = 2
        orders = True

        def __call__(
            self, ids: np.ndarray, scores: np.ndarray, request: ListRequest
        ) -> tuple[np.ndarray, np.ndarray]:
            return ids[::-1], scores[::-1]

    class Same:
        candidates_per_slot = 1

        def __call__(
            self, ids: np.ndarray, scores: np.ndarray, request: ListRequest
        ) -> tuple[np.ndarray, np.ndarray]:
            return ids, scores

    ordering = hand_pipeline(stages=[Reverse()])
    got = ranked(ordering, 4, None)
    pool = [i for i in range(N) if i != UNAVAILABLE][:8]
    assert got.ids.tolist() == pool[::-1][:4]
    resorted = hand_pipeline(stages=[Reverse(), Same()])
    assert ranked(resorted, 4, None).ids.tolist() == pool[:4]
    assert ordering.rank_users(np.array([0]), 4)[0].tolist() == got.ids.tolist()


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: Diversity(max_per_category=-1), "rules.diversity.max_per_category"),
        (lambda: Diversity(max_per_category=1.5), "rules.diversity.max_per_category"),
        (lambda: Diversity(mmr=1.5), "rules.diversity.mmr"),
        (lambda: Diversity(mmr=float("nan")), "rules.diversity.mmr"),
        (lambda: Boost(ItemFilter.of(categories=["a"]), 0.0), "rules.boosts.factor"),
        (lambda: Boost(ItemFilter.of(categories=["a"]), float("inf")), "rules.boosts.factor"),
        (lambda: Boost(ItemFilter(), 2.0), "rules.boosts.item_filter"),
        (lambda: Boost("sport", 2.0), "rules.boosts.item_filter"),  # type: ignore[arg-type]
        (lambda: Promotion(ItemFilter.of(categories=["a"]), 0.0), "rules.promotion.share"),
        (lambda: Promotion(ItemFilter.of(categories=["a"]), 1.2), "rules.promotion.share"),
        (lambda: Promotion(ItemFilter(), 0.2), "rules.promotion.item_filter"),
        (lambda: Exploration(0.0, 7.0), "rules.exploration.share"),
        (lambda: Exploration(0.2, 0.0), "rules.exploration.max_age_days"),
        (lambda: Exploration(0.2, 7.0, seed=1.5), "rules.exploration.seed"),  # type: ignore[arg-type]
        (lambda: Exploration(0.2, 7.0, max_interactions=-1), "rules.exploration.max_interactions"),
        (lambda: Exploration(0.2, 7.0, now=float("nan")), "rules.exploration.now"),
        (lambda: rotation_of([1], [1.0], rate=2.0), "rules.rotation.rate"),
        (
            lambda: rotation_of([1], [1.0], half_life_seconds=0.0),
            "rules.rotation.half_life_seconds",
        ),
        (lambda: rotation_of([1, 2], [1.0], rate=0.5), "rules.rotation.shown_ages_seconds"),
        (lambda: rotation_of([1], [-1.0]), "rules.rotation.shown_ages_seconds"),
        (
            lambda: Rotation(np.array([0.5]), np.array([1.0])),
            "rules.rotation.shown_items",
        ),
        (lambda: Rules(diversity=0.5), "rules.diversity"),  # type: ignore[arg-type]
        (lambda: Rules(boosts=Boost(ItemFilter.of(categories=["a"]), 2.0)), "rules.boosts"),  # type: ignore[arg-type]
        (
            lambda: Rules(
                promotion=Promotion(ItemFilter.of(categories=["a"]), 0.6),
                exploration=Exploration(0.5, 7.0),
            ),
            "rules.exploration.share",
        ),
    ],
)
def test_bad_rules_name_their_field(make: Callable[[], object], field: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        make()
    assert info.value.field == field
    assert field in str(info.value)


def test_shown_items_outside_the_catalog_name_their_field(hand: RankingPipeline) -> None:
    rules = Rules(rotation=rotation_of([N], [1.0]))
    with pytest.raises(InvalidInputError) as info:
        ranked(hand, 5, rules)
    assert info.value.field == "rules.rotation.shown_items"
    with pytest.raises(InvalidInputError) as info:
        hand.rank_users(np.array([0]), 5, rules=rules)
    assert info.value.field == "rules.rotation.shown_items"


def test_rules_are_values() -> None:
    flt = ItemFilter.of(categories=["a"])
    assert Rules(boosts=[Boost(flt, 2.0)]).boosts == (Boost(flt, 2.0),)  # type: ignore[arg-type]
    assert Rules(boosts=(Boost(flt, 2.0),)) == Rules(boosts=(Boost(flt, 2.0),))
    hash(Rules(diversity=Diversity(2, 0.5), promotion=Promotion(flt, 0.2)))
    settled = exploring(now=None).settled(now=NOW)
    assert settled.exploration is not None and settled.exploration.now == NOW
    assert settled.settled() is settled
    request = ListRequest(ListKind.USER, 5, rules=exploring(now=None))
    assert request.rules is not None and request.rules.exploration is not None
    assert request.rules.exploration.now is not None  # the clock is read once, at the request
