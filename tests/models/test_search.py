"""The norm-ordered index returns the exact top k of a brute-force ranking, and scans less.

Every case compares :meth:`NormOrderedIndex.search` with a plain ``item_factors @ u`` ranking
(blocked and filtered items removed, ties broken by item id): factors with skewed norms (as
trained models have, where the scan stops early), equal norms (where it must scan everything),
batches mixing different ``k``, blocked items and filters, and broken inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.search import NormOrderedIndex, Query


def skewed_factors(rng: np.random.Generator, n: int, f: int) -> np.ndarray:
    """Item factors whose lengths follow a heavy tail, like a trained model's."""
    directions = rng.standard_normal((n, f))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    lengths = rng.pareto(1.2, size=n) + 0.01
    return (directions * lengths[:, None]).astype(np.float32)


def brute(
    factors: np.ndarray,
    vector: np.ndarray,
    k: int,
    blocked: np.ndarray,
    disallowed_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    scores = (factors @ vector).astype(np.float32)
    scores[blocked] = -np.inf
    if disallowed_ids is not None:
        scores[disallowed_ids] = -np.inf
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    order = order[np.isfinite(scores[order])]
    return order, scores[order]


def assert_same_ranking(got_ids, got_scores, want_ids, want_scores) -> None:
    assert len(got_ids) == len(want_ids)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-6)
    # Identical lists except where two scores are equal to float32 precision.
    distinct = np.abs(np.diff(want_scores)) > 1e-5 * np.abs(want_scores[1:]).max(initial=1e-6)
    if len(got_ids):
        same = got_ids == want_ids
        movable = np.zeros(len(want_ids), dtype=bool)
        movable[:-1] |= ~distinct
        movable[1:] |= ~distinct
        movable[-1] = True  # the last place may go to any item tied with it
        assert (same | movable).all(), (got_ids, want_ids)


@pytest.mark.parametrize("k", [1, 10, 100])
def test_skewed_norms_give_the_exact_top_k_after_a_short_scan(k: int) -> None:
    rng = np.random.default_rng(k)
    factors = skewed_factors(rng, 20_000, 32)
    index = NormOrderedIndex(factors, first_block=256)
    users = rng.standard_normal((40, 32)).astype(np.float32)
    scanned = []
    for u in users:
        blocked = np.unique(rng.integers(0, len(factors), 30))
        (hits,) = index.search([Query(u, k, index.positions(blocked))])
        want_ids, want_scores = brute(factors, u, k, blocked)
        assert_same_ranking(hits.ids, hits.scores, want_ids, want_scores)
        scanned.append(hits.scanned)
    # The point of the index: a typical request scores a small part of the catalog.
    assert np.median(scanned) < len(factors) / 4


def test_equal_norms_scan_everything_and_stay_exact() -> None:
    rng = np.random.default_rng(1)
    factors = rng.standard_normal((5_000, 16)).astype(np.float32)
    factors /= np.linalg.norm(factors, axis=1, keepdims=True)
    index = NormOrderedIndex(factors, first_block=128)
    u = rng.standard_normal(16).astype(np.float32)
    (hits,) = index.search([Query(u, 10, np.empty(0, np.int64))])
    want_ids, want_scores = brute(factors, u, 10, np.empty(0, np.int64))
    assert_same_ranking(hits.ids, hits.scores, want_ids, want_scores)
    # The norm bound cuts nothing off; only the principal-direction bound thins the range a
    # little before the int8 screen, and without it every position is examined.
    assert hits.scanned > 0.8 * len(factors)
    (plain,) = NormOrderedIndex(factors, first_block=128, projection=False).search(
        [Query(u, 10, np.empty(0, np.int64))]
    )
    assert plain.scanned == len(factors)
    assert_same_ranking(plain.ids, plain.scores, want_ids, want_scores)


def test_a_batch_answers_each_query_with_its_own_k_blocks_and_filter() -> None:
    rng = np.random.default_rng(2)
    factors = skewed_factors(rng, 8_000, 24)
    index = NormOrderedIndex(factors, first_block=100)
    queries, wanted = [], []
    for i in range(12):
        u = rng.standard_normal(24).astype(np.float32)
        k = [1, 5, 10, 50][i % 4]
        blocked = np.unique(rng.integers(0, len(factors), i * 20))
        disallowed_ids = None
        disallowed = None
        if i % 3 == 0:  # a filter that keeps only a fifth of the catalog
            keep = rng.random(len(factors)) < 0.2
            disallowed_ids = np.flatnonzero(~keep)
            disallowed = (~keep)[index.order]
        queries.append(Query(u, k, index.positions(blocked), disallowed))
        wanted.append(brute(factors, u, k, blocked, disallowed_ids))
    hits = index.search(queries)
    assert len(hits) == len(queries)
    for got, (want_ids, want_scores) in zip(hits, wanted, strict=True):
        assert_same_ranking(got.ids, got.scores, want_ids, want_scores)


def test_negative_best_scores_still_give_the_exact_answer() -> None:
    # When every score is negative the bound never closes: the whole catalog is scanned.
    rng = np.random.default_rng(3)
    factors = np.abs(skewed_factors(rng, 3_000, 8))
    index = NormOrderedIndex(factors, first_block=64)
    u = -np.abs(rng.standard_normal(8)).astype(np.float32)
    (hits,) = index.search([Query(u, 10, np.empty(0, np.int64))])
    want_ids, want_scores = brute(factors, u, 10, np.empty(0, np.int64))
    assert_same_ranking(hits.ids, hits.scores, want_ids, want_scores)
    assert (hits.scores < 0).all()


def test_fewer_allowed_items_than_k_returns_all_of_them() -> None:
    rng = np.random.default_rng(4)
    factors = skewed_factors(rng, 2_000, 8)
    index = NormOrderedIndex(factors, first_block=64)
    allowed = np.array([3, 700, 1999])
    disallowed = np.ones(len(factors), dtype=bool)
    disallowed[allowed] = False
    u = rng.standard_normal(8).astype(np.float32)
    (hits,) = index.search([Query(u, 10, np.empty(0, np.int64), disallowed[index.order])])
    assert sorted(hits.ids.tolist()) == allowed.tolist()
    assert hits.scanned == len(factors)


def test_items_with_broken_factors_are_never_returned() -> None:
    rng = np.random.default_rng(5)
    factors = skewed_factors(rng, 1_000, 8)
    factors[[10, 20]] = np.nan
    factors[30, 0] = np.inf
    index = NormOrderedIndex(factors, first_block=64)
    assert sorted(index.order[index.broken].tolist()) == [10, 20, 30]
    for u in rng.standard_normal((20, 8)).astype(np.float32):
        (hits,) = index.search([Query(u, 50, index.positions(np.empty(0, np.int64)))])
        assert not {10, 20, 30} & set(hits.ids.tolist())
        assert np.isfinite(hits.scores).all()


def test_a_vector_that_is_not_finite_gets_no_items_and_does_not_spoil_its_batch() -> None:
    rng = np.random.default_rng(6)
    factors = skewed_factors(rng, 1_000, 8)
    index = NormOrderedIndex(factors, first_block=64)
    good = rng.standard_normal(8).astype(np.float32)
    bad = np.full(8, np.nan, dtype=np.float32)
    none = np.empty(0, np.int64)
    nan_hits, good_hits = index.search([Query(bad, 10, none), Query(good, 10, none)])
    assert len(nan_hits.ids) == 0
    want_ids, want_scores = brute(factors, good, 10, none)
    assert_same_ranking(good_hits.ids, good_hits.scores, want_ids, want_scores)


def test_a_zero_vector_scores_every_item_equal_and_breaks_ties_by_id() -> None:
    rng = np.random.default_rng(7)
    factors = skewed_factors(rng, 500, 4)
    index = NormOrderedIndex(factors, first_block=64)
    (hits,) = index.search([Query(np.zeros(4, np.float32), 5, np.empty(0, np.int64))])
    assert hits.ids.tolist() == [0, 1, 2, 3, 4]


def test_the_projection_bound_skips_most_of_a_long_tail_and_stays_exact() -> None:
    # Trained factors share a dominant direction (popularity); lengths are skewed but many
    # items are long enough that the norm bound alone would keep scanning.
    rng = np.random.default_rng(8)
    n, f = 30_000, 32
    common = rng.standard_normal(f)
    common /= np.linalg.norm(common)
    taste = rng.standard_normal((n, f)) * 0.04
    factors = ((common[None, :] + taste) * rng.uniform(0.2, 1.0, size=(n, 1))).astype(np.float32)
    index = NormOrderedIndex(factors, first_block=512)
    norm_only = NormOrderedIndex(factors, first_block=512, projection=False)
    users = (rng.standard_normal((30, f)) * 0.3 + common).astype(np.float32)
    pruned, full = [], []
    for u in users:
        blocked = np.unique(rng.integers(0, n, 40))
        (hits,) = index.search([Query(u, 10, index.positions(blocked))])
        (plain,) = norm_only.search([Query(u, 10, norm_only.positions(blocked))])
        want_ids, want_scores = brute(factors, u, 10, blocked)
        assert_same_ranking(hits.ids, hits.scores, want_ids, want_scores)
        assert_same_ranking(plain.ids, plain.scores, want_ids, want_scores)
        pruned.append(hits.scanned)
        full.append(plain.scanned)
    assert np.median(full) > n / 4  # the norm bound alone scans much of the catalog here
    assert np.median(pruned) < np.median(full) / 2


def test_the_projection_bound_applies_below_zero_and_stays_exact() -> None:
    # A category cap's deeper fetch asks for a user's best items in the categories they like
    # least, whose scores are often below zero: there the norm bound prunes nothing (every
    # |u||v| >= 0), and the projection bound, which holds whatever the sign, still screens.
    rng = np.random.default_rng(9)
    n, f = 30_000, 32
    common = rng.standard_normal(f)
    common /= np.linalg.norm(common)
    side = np.where(rng.random(n) < 0.5, 1.0, -1.0)  # half the items point away from the user
    taste = rng.standard_normal((n, f)) * 0.15
    lengths = rng.lognormal(0.0, 0.5, size=(n, 1))
    factors = ((side[:, None] * common[None, :] + taste) * lengths).astype(np.float32)
    index = NormOrderedIndex(factors, first_block=512)
    norm_only = NormOrderedIndex(factors, first_block=512, projection=False)
    liked = side > 0  # the "full categories": filtered out
    for _ in range(20):
        u = (common + rng.standard_normal(f) * 0.2).astype(np.float32)
        blocked = np.unique(rng.integers(0, n, 40))
        (hits,) = index.search([Query(u, 10, index.positions(blocked), liked[index.order])])
        (plain,) = norm_only.search(
            [Query(u, 10, norm_only.positions(blocked), liked[norm_only.order])]
        )
        want_ids, want_scores = brute(factors, u, 10, blocked, np.flatnonzero(liked))
        assert want_scores[0] < 0.5 * np.abs(factors @ u).max()  # the user's best is far below
        assert_same_ranking(hits.ids, hits.scores, want_ids, want_scores)
        assert_same_ranking(plain.ids, plain.scores, want_ids, want_scores)
        assert hits.scanned <= plain.scanned


def test_the_int8_screen_keeps_every_item_whose_exact_score_could_win() -> None:
    """Rows whose int8 levels lose most of their detail (one large coordinate sets the scale, the
    others round to zero or one level) and queries whose k-th score is tiny, so that the screen
    decides nearly every item by its error bound: the answer must still be the exact ranking."""
    rng = np.random.default_rng(9)
    n, f = 6_000, 32
    factors = (rng.standard_normal((n, f)) * 0.004).astype(np.float32)
    spikes = rng.random(n) < 0.5
    factors[spikes, rng.integers(0, f, spikes.sum())] = rng.choice([-1.0, 1.0], spikes.sum())
    factors[:40] *= 30  # a few long items make the first block's threshold
    index = NormOrderedIndex(factors, first_block=64)
    for trial in range(40):
        if trial % 2:
            u = (rng.standard_normal(f) * rng.choice([0.01, 1.0, 100.0])).astype(np.float32)
        else:
            # Whole levels with one at 127: the query's int8 form is exact, so only the rows'
            # rounding error stands between the screen's estimate and the exact score.
            u = rng.integers(-127, 128, f).astype(np.float32)
            u[trial % f] = 127.0
        blocked = np.unique(rng.integers(0, n, trial * 7))
        (hits,) = index.search([Query(u, 10, index.positions(blocked))])
        want_ids, want_scores = brute(factors, u, 10, blocked)
        assert_same_ranking(hits.ids, hits.scores, want_ids, want_scores)


def test_items_just_above_the_threshold_survive_the_int8_screen() -> None:
    """The true top k sit a hair above the first block's k-th score, where the int8 estimate
    alone would drop some of them: only the error bound keeps them."""
    rng = np.random.default_rng(10)
    f, n_head, n_tail = 16, 64, 2_000
    u = rng.integers(-127, 128, f).astype(np.float64)
    u[0] = 127.0  # whole levels with 127 the largest: the query's int8 form is exact
    unit = u / np.dot(u, u)
    t = 5.0
    # Long first-block items: score exactly t along u, plus a large orthogonal part.
    noise = rng.standard_normal((n_head, f))
    noise -= np.outer(noise @ u, u) / np.dot(u, u)
    head = t * unit + 50.0 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    # Short items along u plus a small random wiggle off u, scoring t + 6e-5 j for j from -1,980
    # to 19: the best ten (6e-5 apart, so no two tie) are the answer, all within int8 rounding
    # of t (about 0.02 here).
    wiggle = rng.standard_normal((n_tail, f)) * 1e-3
    wiggle -= np.outer(wiggle @ u, u) / np.dot(u, u)
    tail = np.outer(t + 6e-5 * (rng.permutation(n_tail) - (n_tail - 20)), unit) + wiggle
    factors = np.vstack([head, tail]).astype(np.float32)
    index = NormOrderedIndex(factors, first_block=n_head)
    query = u.astype(np.float32)
    (hits,) = index.search([Query(query, 10, np.empty(0, np.int64))])
    want_ids, want_scores = brute(factors, query, 10, np.empty(0, np.int64))
    assert (want_ids >= n_head).all()  # the answer lies beyond the first block
    assert_same_ranking(hits.ids, hits.scores, want_ids, want_scores)
    np.testing.assert_array_equal(np.sort(hits.ids), np.sort(want_ids))


def test_the_first_block_grows_with_the_list_and_the_answer_stays_exact() -> None:
    rng = np.random.default_rng(11)
    factors = skewed_factors(rng, 5_000, 16)
    index = NormOrderedIndex(factors, first_block=256)
    assert [index.first_for(k) for k in (1, 20, 40, 100, 1_000)] == [256, 256, 512, 1280, 5_000]
    u = rng.standard_normal(16).astype(np.float32)
    for k in (20, 40, 100):
        (hits,) = index.search([Query(u, k, np.empty(0, np.int64))])
        want_ids, want_scores = brute(factors, u, k, np.empty(0, np.int64))
        assert_same_ranking(hits.ids, hits.scores, want_ids, want_scores)


def capped_brute(
    factors: np.ndarray,
    vector: np.ndarray,
    k: int,
    blocked: np.ndarray,
    categories: np.ndarray,
    cap: int,
    disallowed_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The plain ranking taken in order while no category (-1: none) has ``cap`` items."""
    ids, scores = brute(factors, vector, len(factors), blocked, disallowed_ids)
    counts: dict[int, int] = {}
    keep = []
    for row, item in enumerate(ids):
        category = int(categories[item])
        if category >= 0 and counts.get(category, 0) >= cap:
            continue
        counts[category] = counts.get(category, 0) + 1
        keep.append(row)
        if len(keep) == k:
            break
    return ids[keep], scores[keep]


@pytest.mark.parametrize("first_block", [64, 256, 100_000])  # pruned, and every item scored
def test_a_capped_search_gives_the_plain_ranking_taken_under_the_cap(first_block: int) -> None:
    rng = np.random.default_rng(first_block)
    n, f = 5_000, 16
    factors = skewed_factors(rng, n, f)
    # Few categories, one of them large, and some items without one (never capped).
    categories = rng.choice([-1, 0, 1, 2, 3, 4], size=n, p=[0.1, 0.5, 0.1, 0.1, 0.1, 0.1])
    index = NormOrderedIndex(factors, first_block=first_block)
    codes = categories[index.order]
    filtered = rng.random(n) < 0.2
    short = 0
    for trial in range(60):
        vector = rng.standard_normal(f).astype(np.float32)
        k, cap = (5, 10, 20)[trial % 3], (1, 2, 3)[trial % 4 % 3]
        blocked = np.unique(rng.integers(0, n, trial * 3))
        disallowed = filtered[index.order] if trial % 2 else None
        query = Query(vector, k, index.positions(blocked), disallowed, cap=cap)
        query.codes, query.n_codes = codes, 5
        (hits,) = index.search([query])
        want_ids, want_scores = capped_brute(
            factors,
            vector,
            k,
            blocked,
            categories,
            cap,
            np.flatnonzero(filtered) if trial % 2 else None,
        )
        if len(hits.ids) < k:  # the first block could not fill the list: the caller's to do
            short += 1
            assert first_block < n and len(hits.ids) == 0
            continue
        assert_same_ranking(hits.ids, hits.scores, want_ids, want_scores)
        chosen = categories[hits.ids]
        assert all((chosen == c).sum() <= cap for c in range(5))
    # A block of 64 holds too few categories for many of these lists; 256 fills nearly all.
    assert short < (40 if first_block == 64 else 5)
