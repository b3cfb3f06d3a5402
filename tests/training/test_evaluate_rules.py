"""Offline evaluation under ranking rules, and the beyond-accuracy metrics it reports.

A hand-built split where popularity ranks items 0 > 1 > ... > 5 and items 0-2 share a category,
so the effect of each rule on the lists and the metrics can be worked out by hand; then a factor
model, whose diversity is measured over its item vectors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from models.algorithms import get_algorithm
from models.artifact import ItemCatalog
from models.errors import InvalidInputError
from models.popularity import Popularity
from models.ranking import ItemFilter, RankingPipeline
from models.ranking_metrics import intra_list_diversity
from models.rules import Boost, Diversity, Exploration, Promotion, Rules
from training.evaluate import describe_rules, diversity_space, evaluate, evaluate_with_baseline

L3 = 1.0 / math.log2(3)
DAY = 86_400.0
NOW = 1.7e9
N_ITEMS = 6
CATEGORY = np.array(["a", "a", "a", "b", "b", ""])


def _csr(rows: list[list[int]], n_items: int = N_ITEMS) -> sp.csr_matrix:
    dense = np.zeros((len(rows), n_items), dtype=np.float32)
    for u, items in enumerate(rows):
        dense[u, items] = 1.0
    return sp.csr_matrix(dense)


# Users 0-4 train on items {0..4-u}: popularity 5, 4, 3, 2, 1, 0 users. Users 5 and 6 have no
# training item (nothing excluded) and are the only ones with held-out items: 5 wants {3}, 6 {1}.
TRAIN = _csr([[0, 1, 2, 3, 4], [0, 1, 2, 3], [0, 1, 2], [0, 1], [0], [], []])
TEST = _csr([[], [], [], [], [], [3], [1]])


def _catalog(first_seen: np.ndarray | None = None) -> ItemCatalog:
    blank = np.full(N_ITEMS, "", dtype=object)
    catalog = ItemCatalog(blank, CATEGORY.copy(), blank.copy(), np.zeros(N_ITEMS, dtype=bool))
    if first_seen is not None:
        catalog.first_seen = first_seen
    return catalog  # nothing available: evaluation must treat every item as available


def test_without_rules_lists_and_category_diversity() -> None:
    result = evaluate(Popularity().fit(TRAIN), TRAIN, TEST, k=3, catalog=_catalog())
    assert result.per_user is not None
    # Both users get [0, 1, 2] (all "a"): diversity 0; user 6 hits item 1 at rank 2.
    assert result.per_user.recommended.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert result.diversity_basis == "categories"
    assert result.metrics["diversity_at_3"] == 0.0
    assert result.metrics["ndcg_at_3"] == pytest.approx((0 + L3) / 2)
    assert result.metrics["coverage_at_3"] == pytest.approx(3 / 6)
    # A catalog without rules changes no list.
    plain = evaluate(Popularity().fit(TRAIN), TRAIN, TEST, k=3)
    assert plain.per_user is not None
    assert np.array_equal(plain.per_user.recommended, result.per_user.recommended)
    assert plain.diversity_basis == "" and "diversity_at_3" not in plain.to_flat_dict()


def test_a_category_cap_changes_lists_metrics_and_diversity() -> None:
    rules = Rules(diversity=Diversity(max_per_category=1))
    result = evaluate(Popularity().fit(TRAIN), TRAIN, TEST, k=3, rules=rules, catalog=_catalog())
    assert result.per_user is not None
    # One "a" (item 0), one "b" (item 3), and item 5, which has no category and is never capped.
    assert result.per_user.recommended.tolist() == [[0, 3, 5], [0, 3, 5]]
    # User 5 now hits item 3 at rank 2, user 6 loses item 1.
    assert result.metrics["ndcg_at_3"] == pytest.approx((L3 + 0) / 2)
    assert result.metrics["recall_at_3"] == pytest.approx(0.5)
    # Only the pair (0, 3) has two categories, and they differ.
    assert result.metrics["diversity_at_3"] == pytest.approx(1.0)
    flat = result.to_flat_dict()
    for name in ("diversity_at_3", "coverage_at_3", "novelty_at_3"):
        assert name in flat
    report = result.report_markdown()
    assert "at most 1 per category" in report and "pairs in different categories" in report


def test_evaluation_lists_are_the_pipelines_lists_under_the_same_rules() -> None:
    model = Popularity().fit(TRAIN)
    rules = Rules(
        diversity=Diversity(max_per_category=2, mmr=0.5),
        boosts=(Boost(ItemFilter.of(categories=["b"]), 3.0),),
        promotion=Promotion(ItemFilter.of(categories=["b"]), 0.34),
    )
    result = evaluate(model, TRAIN, TEST, k=3, rules=rules, catalog=_catalog(), batch_size=1)
    assert result.per_user is not None
    catalog = _catalog()
    catalog.available = np.ones(N_ITEMS, dtype=bool)
    popularity = np.asarray(TRAIN.astype(bool).sum(axis=0)).ravel()
    pipeline = RankingPipeline(model, seen=TRAIN, popularity=popularity, catalog=catalog)
    expected = pipeline.rank_users(np.array([5, 6]), 3, rules=rules)
    assert np.array_equal(result.per_user.recommended, expected)
    assert result.rules == rules


def test_exploration_uses_the_clock_it_is_given() -> None:
    first_seen = np.array([NOW - 400 * DAY] * 4 + [NOW - DAY, NOW - 2 * DAY])
    rules = Rules(exploration=Exploration(share=0.34, max_age_days=30, now=NOW))
    result = evaluate(
        Popularity().fit(TRAIN), TRAIN, TEST, k=3, rules=rules, catalog=_catalog(first_seen)
    )
    assert result.per_user is not None
    for row in result.per_user.recommended.tolist():
        assert len({4, 5} & set(row)) == 1  # one exploration slot of three, a new item in it
    # Ten years later nothing is new: the lists are popularity's.
    later = Rules(exploration=Exploration(share=0.34, max_age_days=30, now=NOW + 3650 * DAY))
    result = evaluate(
        Popularity().fit(TRAIN), TRAIN, TEST, k=3, rules=later, catalog=_catalog(first_seen)
    )
    assert result.per_user is not None
    assert result.per_user.recommended.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_the_baseline_takes_the_same_rules_and_diversity_measure() -> None:
    rng = np.random.default_rng(0)
    train = sp.random(80, 40, density=0.15, format="csr", random_state=1, dtype=np.float32)
    train.data[:] = 1.0
    test = sp.random(80, 40, density=0.05, format="csr", random_state=2, dtype=np.float32)
    test.data[:] = 1.0
    model = get_algorithm("als")(factors=8, iterations=3, random_state=0).fit(train)
    categories = rng.choice(["x", "y", "z"], size=40)
    blank = np.full(40, "", dtype=object)
    catalog = ItemCatalog(blank, categories, blank.copy(), np.ones(40, dtype=bool))
    rules = Rules(diversity=Diversity(max_per_category=2))
    both = evaluate_with_baseline(model, train, test, k=6, rules=rules, catalog=catalog)
    assert both.model.diversity_basis == both.baseline.diversity_basis == "item_vectors"
    for evaluation in both:
        assert evaluation.per_user is not None
        lists = evaluation.per_user.recommended
        for row in lists:
            _, counts = np.unique(categories[row[row >= 0]], return_counts=True)
            assert counts.max() <= 2
        # diversity_at_k averages the per-list cosine distance of the model's item vectors
        space = diversity_space(model)
        assert space is not None and space.unit_vectors is not None
        per_list = intra_list_diversity(lists, item_vectors=space.unit_vectors)
        assert evaluation.metrics["diversity_at_6"] == pytest.approx(np.nanmean(per_list), abs=1e-6)
    assert "baseline_diversity_at_6" in both.to_flat_dict()


def test_a_catalog_of_another_size_is_refused() -> None:
    catalog = ItemCatalog.empty(N_ITEMS + 1)
    with pytest.raises(InvalidInputError, match="catalog"):
        evaluate(Popularity().fit(TRAIN), TRAIN, TEST, k=3, catalog=catalog)


def test_rules_are_described_for_reports() -> None:
    assert describe_rules(None) == describe_rules(Rules()) == "none"
    text = describe_rules(
        Rules(
            diversity=Diversity(max_per_category=3, mmr=0.3),
            boosts=(Boost(ItemFilter.of(categories=["b"]), 1.5),),
            promotion=Promotion(ItemFilter.of(["product"]), 0.2),
            exploration=Exploration(share=0.1, max_age_days=30, seed=4),
        )
    )
    assert text == (
        "at most 3 per category, MMR 0.3, boost category b x1.5, promote type product 20%, "
        "explore 10% of items newer than 30 days (seed 4)"
    )
