"""Ranking metrics on hand-computed cases, plus a loop-by-loop reference on random lists."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from models.errors import InvalidInputError
from models.ranking_metrics import (
    METRIC_NAMES,
    ItemSpace,
    active_users,
    average_precision_at_k,
    catalog_coverage,
    category_codes,
    hit_rate_at_k,
    hits,
    intra_list_diversity,
    item_popularity,
    mean_metrics,
    ndcg_at_k,
    novelty,
    per_user_metrics,
    precision_at_k,
    recall_at_k,
    reciprocal_rank_at_k,
    summarize,
)

L3 = 1.0 / math.log2(3)  # discount at rank 2 = 0.6309...
L4 = 1.0 / math.log2(4)  # discount at rank 3 = 0.5


def _relevant(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    data, indices, indptr = [], [], [0]
    for items in rows:
        indices.extend(items)
        data.extend([1.0] * len(items))
        indptr.append(len(indices))
    return sp.csr_matrix((data, indices, indptr), shape=(len(rows), n_items))


# Four users, catalog of 8 items, k = 3.
#   user 0: list [0, 1, 2],  held out {1, 4}        -> hits [0, 1, 0]
#   user 1: list [3, 5, -1], held out {0, 2, 3, 5}  -> hits [1, 1, 0] (short list, padded)
#   user 2: list [7, 0, 1],  held out {}            -> not evaluable
#   user 3: list [4, 0, 1],  held out {5}           -> no hit
RECOMMENDED = np.array([[0, 1, 2], [3, 5, -1], [7, 0, 1], [4, 0, 1]])
RELEVANT = _relevant([[1, 4], [0, 2, 3, 5], [], [5]], n_items=8)


def test_hits_mark_held_out_items_and_never_padding() -> None:
    assert hits(RECOMMENDED, RELEVANT).astype(int).tolist() == [
        [0, 1, 0],
        [1, 1, 0],
        [0, 0, 0],
        [0, 0, 0],
    ]


def test_precision_divides_by_k_even_for_short_lists() -> None:
    # user 0: 1 hit / 3; user 1: 2 hits / 3 although only 2 items were listed; user 3: 0 / 3.
    got = precision_at_k(RECOMMENDED, RELEVANT)
    assert got[[0, 1, 3]] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert np.isnan(got[2])


def test_recall_divides_by_all_held_out_items_not_min_k() -> None:
    # user 1: 2 hits / 4 held-out items = 0.5 (min(k, |rel|) = 3 would give 0.667).
    got = recall_at_k(RECOMMENDED, RELEVANT)
    assert got[[0, 1, 3]] == pytest.approx([1 / 2, 2 / 4, 0.0])
    assert np.isnan(got[2])


def test_ndcg_uses_log2_discount_and_ideal_over_min_k_relevant() -> None:
    # user 0: DCG = 1/log2(3); ideal has min(3, 2) = 2 hits: 1 + 1/log2(3).
    # user 1: DCG = 1 + 1/log2(3); ideal has min(3, 4) = 3 hits: 1 + 1/log2(3) + 1/log2(4).
    got = ndcg_at_k(RECOMMENDED, RELEVANT)
    expected_0 = L3 / (1 + L3)  # 0.3869
    expected_1 = (1 + L3) / (1 + L3 + L4)  # 0.7654
    assert got[[0, 1, 3]] == pytest.approx([expected_0, expected_1, 0.0])
    assert np.isnan(got[2])


def test_average_precision_normalises_by_min_k_relevant() -> None:
    # user 0: the only hit is at rank 2 with precision@2 = 1/2; divided by min(3, 2) = 2 -> 0.25.
    # user 1: hits at ranks 1 and 2 with precision 1/1 and 2/2; divided by min(3, 4) = 3 -> 2/3.
    got = average_precision_at_k(RECOMMENDED, RELEVANT)
    assert got[[0, 1, 3]] == pytest.approx([0.25, 2 / 3, 0.0])


def test_reciprocal_rank_and_hit_rate() -> None:
    # first hits: user 0 at rank 2 -> 1/2, user 1 at rank 1 -> 1, user 3 never -> 0.
    assert reciprocal_rank_at_k(RECOMMENDED, RELEVANT)[[0, 1, 3]] == pytest.approx([0.5, 1, 0])
    assert hit_rate_at_k(RECOMMENDED, RELEVANT)[[0, 1, 3]].tolist() == [1.0, 1.0, 0.0]


def test_mean_metrics_skip_users_without_held_out_items() -> None:
    means = mean_metrics(per_user_metrics(RECOMMENDED, RELEVANT))
    assert list(means) == [f"{name}_at_3" for name in METRIC_NAMES]
    # averages over users 0, 1 and 3 only
    assert means["precision_at_3"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert means["recall_at_3"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert means["ndcg_at_3"] == pytest.approx((L3 / (1 + L3) + (1 + L3) / (1 + L3 + L4)) / 3)
    assert means["map_at_3"] == pytest.approx((0.25 + 2 / 3 + 0) / 3)
    assert means["mrr_at_3"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert means["hit_rate_at_3"] == pytest.approx(2 / 3)
    # lists of users 0, 1, 3 contain {0, 1, 2, 3, 4, 5}: 6 of 8 items. User 2's item 7 is not
    # counted because user 2 is not evaluated.
    assert means["coverage_at_3"] == pytest.approx(6 / 8)
    # no popularity given -> novelty cannot be computed
    assert math.isnan(means["novelty_at_3"])


def test_metric_names_follow_k() -> None:
    means = mean_metrics(per_user_metrics(np.array([[1] + [-1] * 9]), _relevant([[1]], 4)))
    assert means["precision_at_10"] == pytest.approx(0.1)
    assert means["ndcg_at_10"] == pytest.approx(1.0)


def test_repeated_item_counts_once() -> None:
    # [1, 1, 2] against {1}: one hit, not two -> precision 1/3, recall 1.
    rec = np.array([[1, 1, 2]])
    rel = _relevant([[1]], 4)
    assert precision_at_k(rec, rel) == pytest.approx([1 / 3])
    assert hits(rec, rel).tolist() == [[True, False, False]]


def test_only_positive_entries_are_relevant() -> None:
    # item 1 stored with a negative value (a dislike), item 2 with 0: neither is relevant.
    rel = sp.csr_matrix(([-1.0, 0.0, 2.0], [1, 2, 3], [0, 3]), shape=(1, 4))
    assert rel.nnz == 3  # the zero is stored explicitly
    rec = np.array([[1, 2, 3]])
    assert hits(rec, rel).tolist() == [[False, False, True]]
    assert recall_at_k(rec, rel) == pytest.approx([1.0])


def test_coverage_counts_distinct_items_without_padding() -> None:
    assert catalog_coverage(np.array([[0, 1], [1, -1]]), 10) == pytest.approx(0.2)
    with pytest.raises(InvalidInputError):
        catalog_coverage(np.array([[0]]), 0)


def test_item_popularity_counts_distinct_users_of_active_rows() -> None:
    # rows: {0, 1}, {0}, {0, 2}, {} -> item 0: 3 users, items 1, 2: 1 user; 3 active users.
    train = _relevant([[0, 1], [0], [0, 2], []], n_items=4)
    train[1, 0] = 5.0  # a repeated, heavier interaction still counts one user
    assert item_popularity(train).tolist() == [3, 1, 1, 0]
    assert active_users(train) == 3


def test_novelty_is_mean_self_information() -> None:
    # 8 users; counts 4, 2, 1, 8, 0 -> shares 1/2, 1/4, 1/8, 1, 0 (floored at 1 user = 1/8)
    counts = np.array([4, 2, 1, 8, 0])
    rec = np.array([[0, 1, -1], [2, 3, 0], [4, -1, -1], [-1, -1, -1]])
    got = novelty(rec, counts, 8)
    # user 0: (-log2 1/2 + -log2 1/4) / 2 = (1 + 2) / 2; user 1: (3 + 0 + 1) / 3
    # user 2: item 4 has no user -> 3 bits; user 3: empty list -> NaN
    assert got[:3] == pytest.approx([1.5, 4 / 3, 3.0])
    assert np.isnan(got[3])


def test_novelty_rejects_counts_above_the_user_total() -> None:
    with pytest.raises(InvalidInputError, match="between 0 and n_users"):
        novelty(np.array([[0]]), np.array([0.3, 0.2]) * 100, 10)
    with pytest.raises(InvalidInputError, match="positive number of users"):
        novelty(np.array([[0]]), np.array([0, 0]), 0)


def test_category_diversity_is_the_share_of_pairs_in_different_categories() -> None:
    categories = np.array(["a", "a", "b", "", "c"])
    rec = np.array(
        [
            [0, 1, 2],  # pairs a-a, a-b, a-b -> 2 of 3 differ
            [0, 2, 4],  # a-b, a-c, b-c -> all differ
            [0, 1, -1],  # one pair, same category -> 0
            [0, 3, 2],  # item 3 has no category: its pairs are left out -> a-b only
            [0, 0, 2],  # the repeat of item 0 is left out -> a-b
            [3, 0, -1],  # no pair of categorized items -> NaN
            [2, -1, -1],  # one item -> NaN
        ]
    )
    got = intra_list_diversity(rec, categories=categories)
    assert got[:5] == pytest.approx([2 / 3, 1.0, 0.0, 1.0, 1.0])
    assert np.isnan(got[5]) and np.isnan(got[6])
    # Codes work like names; a negative code is "no category".
    codes = np.array([7, 7, 8, -1, 9])
    named = category_codes(categories)
    assert named[0] == named[1] >= 0 and len({*named[[0, 2, 4]].tolist()}) == 3
    assert named[3] == -1
    assert np.array_equal(intra_list_diversity(rec, categories=codes), got, equal_nan=True)


def test_vector_diversity_is_the_mean_cosine_distance_of_pairs() -> None:
    vectors = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0], [0.0, 0.0]])
    rec = np.array([[0, 1, 2], [0, 3, -1], [2, 4, -1], [1, 1, -1]])
    got = intra_list_diversity(rec, item_vectors=vectors)
    c = 1 / math.sqrt(2)  # cos 45 degrees
    # [0, 1, 2]: orthogonal (1), and twice 45 degrees (1 - c); opposite vectors: 2;
    # the zero vector is orthogonal to everything: 1; a repeated item leaves no pair: NaN.
    assert got[:3] == pytest.approx([(1 + 2 * (1 - c)) / 3, 2.0, 1.0])
    assert np.isnan(got[3])
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-30)
    space = ItemSpace.of_unit_vectors(unit)
    got_unit = per_user_metrics(rec, _relevant([[0]] * 4, 5), item_space=space).diversity
    assert np.allclose(got_unit, got, equal_nan=True)
    with pytest.raises(InvalidInputError, match="exactly one"):
        intra_list_diversity(rec, item_vectors=vectors, categories=np.array(["a"] * 5))
    with pytest.raises(InvalidInputError, match="item index"):
        intra_list_diversity(np.array([[0, 5]]), item_vectors=vectors)


def test_diversity_matches_a_pair_by_pair_reference() -> None:
    rng = np.random.default_rng(3)
    n_items, k = 25, 6
    vectors = rng.normal(size=(n_items, 4))
    categories = rng.choice(["x", "y", "z", ""], size=n_items)
    rec = rng.integers(-1, n_items, size=(40, k))
    by_vectors = intra_list_diversity(rec, item_vectors=vectors)
    by_categories = intra_list_diversity(rec, categories=categories)
    for row in range(len(rec)):
        items = list(dict.fromkeys(int(i) for i in rec[row] if i >= 0))
        pairs = [(a, b) for n, a in enumerate(items) for b in items[n + 1 :]]
        cos = [
            vectors[a] @ vectors[b] / np.linalg.norm(vectors[a]) / np.linalg.norm(vectors[b])
            for a, b in pairs
        ]
        named = [(a, b) for a, b in pairs if categories[a] and categories[b]]
        differ = [categories[a] != categories[b] for a, b in named]
        want_v = np.mean([1 - c for c in cos]) if pairs else np.nan
        want_c = np.mean(differ) if named else np.nan
        assert by_vectors[row] == pytest.approx(want_v, rel=1e-5, nan_ok=True)
        assert by_categories[row] == pytest.approx(want_c, nan_ok=True)


def test_per_user_metrics_average_diversity_over_evaluable_users() -> None:
    space = ItemSpace.of_categories(np.array(["a", "a", "b", "b", "c", "c", "", "a"]))
    got = per_user_metrics(RECOMMENDED, RELEVANT, item_space=space)
    # user 0 [0, 1, 2] a a b: 2/3; user 1 [3, 5] b c: 1; user 2 (not evaluable) [7, 0, 1]: 0;
    # user 3 [4, 0, 1] c a a: 2/3
    assert got.diversity == pytest.approx([2 / 3, 1.0, 0.0, 2 / 3])
    means = mean_metrics(got)
    assert means["diversity_at_3"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    # coverage over the evaluable users' lists: items 0, 1, 2, 3, 4, 5 of 8
    assert means["coverage_at_3"] == pytest.approx(6 / 8)
    assert math.isnan(mean_metrics(per_user_metrics(RECOMMENDED, RELEVANT))["diversity_at_3"])
    with pytest.raises(InvalidInputError, match="item space"):
        per_user_metrics(RECOMMENDED, RELEVANT, item_space=ItemSpace.of_vectors(np.eye(3)))
    assert summarize(RECOMMENDED, RELEVANT, item_space=space)["diversity_at_3"] == pytest.approx(
        means["diversity_at_3"]
    )


def test_summarize_truncates_pads_and_names_by_k() -> None:
    # k=1: only [0] vs {1, 4} for user 0 -> miss; [3] for user 1 -> hit
    at1 = summarize(RECOMMENDED, RELEVANT, k=1, n_items=8)
    assert at1["precision_at_1"] == pytest.approx((0 + 1 + 0) / 3)
    # k=4 pads with -1: user 1 has 2 hits in 4 slots
    at4 = summarize(RECOMMENDED, RELEVANT, k=4, item_popularity=np.full(8, 2), n_users=4)
    assert at4["precision_at_4"] == pytest.approx((1 / 4 + 2 / 4 + 0) / 3)
    assert at4["novelty_at_4"] == pytest.approx(1.0)  # every item seen by 2 of 4 users
    with pytest.raises(InvalidInputError, match="catalog"):
        summarize(RECOMMENDED, RELEVANT, n_items=9)


def test_inputs_are_validated() -> None:
    with pytest.raises(InvalidInputError, match="align"):
        precision_at_k(RECOMMENDED[:2], RELEVANT)
    with pytest.raises(InvalidInputError, match="item index"):
        precision_at_k(np.array([[9]]), _relevant([[1]], 4))
    with pytest.raises(InvalidInputError, match="2-d"):
        precision_at_k(np.array([1, 2]), _relevant([[1]], 4))
    with pytest.raises(InvalidInputError, match="popularity"):
        per_user_metrics(RECOMMENDED, RELEVANT, item_popularity=np.ones(3), n_users=3)


def test_mean_of_nobody_is_nan() -> None:
    means = mean_metrics(per_user_metrics(np.array([[0, 1]]), _relevant([[]], 4)))
    assert all(math.isnan(v) for v in means.values())


def _reference(rec: list[int], rel: set[int], k: int) -> dict[str, float]:
    """Textbook definitions, one user at a time."""
    hit = [
        1 if (item >= 0 and item in rel and item not in rec[:i]) else 0
        for i, item in enumerate(rec)
    ]
    n_hits = sum(hit)
    dcg = sum(h / math.log2(i + 2) for i, h in enumerate(hit))
    idcg = sum(1 / math.log2(i + 2) for i in range(min(k, len(rel))))
    ap = sum(sum(hit[: i + 1]) / (i + 1) for i, h in enumerate(hit) if h) / min(k, len(rel))
    first = next((i + 1 for i, h in enumerate(hit) if h), None)
    return {
        "precision": n_hits / k,
        "recall": n_hits / len(rel),
        "ndcg": dcg / idcg,
        "ap": ap,
        "rr": 1 / first if first else 0.0,
        "hit": float(n_hits > 0),
    }


def test_matches_reference_on_random_lists() -> None:
    rng = np.random.default_rng(7)
    n_users, n_items, k = 60, 30, 10
    rec = np.stack([rng.choice(n_items, size=k, replace=False) for _ in range(n_users)])
    rec[rng.random(rec.shape) < 0.1] = -1  # some padding
    rel_rows = [
        sorted(rng.choice(n_items, size=rng.integers(1, 15), replace=False).tolist())
        for _ in range(n_users)
    ]
    got = per_user_metrics(rec, _relevant(rel_rows, n_items))
    for u in range(n_users):
        ref = _reference(rec[u].tolist(), set(rel_rows[u]), k)
        assert got.precision[u] == pytest.approx(ref["precision"])
        assert got.recall[u] == pytest.approx(ref["recall"])
        assert got.ndcg[u] == pytest.approx(ref["ndcg"])
        assert got.average_precision[u] == pytest.approx(ref["ap"])
        assert got.reciprocal_rank[u] == pytest.approx(ref["rr"])
        assert got.hit[u] == ref["hit"]
