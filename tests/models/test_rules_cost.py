"""What keeps the ranking rules cheap gives the lists the plain way gives: a promotion's items
found in the search for the candidates, the compiled sort and claims of the pipeline, the plans
kept per ``Rules`` object and the tables the rules' stages share (``docs/benchmarks.md``,
"Ranking rules: cost")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from models.errors import InvalidInputError
from models.kernels import by_score, claim_reasons
from models.ranking import (
    NO_FILTER,
    ItemFilter,
    ItemMask,
    ListKind,
    ListRequest,
    RankingPipeline,
    Reason,
)
from models.rules import Boost, Diversity, Promotion, Rules
from models.search import NormOrderedIndex, Query

Pipelines = Callable[[str], RankingPipeline]


# ------------------------------------------------------------------ one search, two answers
@pytest.mark.parametrize("first_block", [64, 10_000])  # pruned, and every item scored
def test_the_items_beyond_an_answer_are_those_a_second_search_finds(first_block: int) -> None:
    rng = np.random.default_rng(4)
    n, f = 3_000, 16
    factors = (rng.standard_normal((n, f)) * rng.gamma(1.0, 1.0, (n, 1))).astype(np.float32)
    index = NormOrderedIndex(factors, first_block=first_block)
    filtered = rng.random(n) < 0.3
    outside = rng.random(n) < 0.85  # the second filter lets about 15% through
    for trial in range(30):
        vector = rng.standard_normal(f).astype(np.float32)
        blocked = np.unique(rng.integers(0, n, trial * 5))
        disallowed = filtered[index.order] if trial % 2 else None
        more_disallowed = (outside | (filtered if trial % 2 else False))[index.order]
        query = Query(vector, 40, index.positions(blocked), disallowed, 3, more_disallowed)
        (hits,) = index.search([query])
        (alone,) = index.search([Query(vector, 40, index.positions(blocked), disallowed)])
        assert hits.ids.tobytes() == alone.ids.tobytes()
        assert hits.scores.tobytes() == alone.scores.tobytes()
        again = Query(vector, 3, index.positions(np.concatenate([blocked, hits.ids])))
        again.disallowed = more_disallowed
        (second,) = index.search([again])
        assert hits.beyond is not None
        assert hits.beyond[0].tobytes() == second.ids.tobytes()
        assert hits.beyond[1].tobytes() == second.scores.tobytes()
        assert len(second.ids) == 3 and not np.isin(second.ids, hits.ids).any()
        # The same search with the second filter as the list of what it allows.
        query.more_allowed = np.flatnonzero(~more_disallowed)
        (listed,) = index.search([query])
        assert listed.ids.tobytes() == hits.ids.tobytes()
        assert listed.beyond is not None
        assert listed.beyond[0].tobytes() == second.ids.tobytes()
        assert listed.beyond[1].tobytes() == second.scores.tobytes()


def test_a_promotion_found_in_the_candidates_search_gives_the_same_list(
    pipeline_for: Pipelines, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = pipeline_for("als")
    rules = Rules(
        diversity=Diversity(2, 0.3),
        boosts=(Boost(ItemFilter.of(categories=["news"]), 1.5),),
        promotion=Promotion(ItemFilter.of(categories=["music"]), 0.2),
    )
    requests = [
        ListRequest(ListKind.USER, k, user=u, rules=rules) for u in range(40) for k in (5, 10)
    ]
    fused = [pipeline.rank(r) for r in requests]
    assert all(r.beyond is not None for r in requests)  # found in one search ...
    searches: list[Any] = []
    index_search = pipeline._index.search  # type: ignore[union-attr]
    monkeypatch.setattr(
        pipeline._index, "search", lambda qs: searches.append(qs) or index_search(qs)
    )
    again = [pipeline.rank(ListRequest(r.kind, r.k, user=r.user, rules=rules)) for r in requests]
    queries = [q for qs in searches for q in qs]
    assert sum(q.more > 0 for q in queries) == len(requests)
    promoted = pipeline._filter_positions((NO_FILTER, rules.promotion.item_filter))  # type: ignore[union-attr]
    assert not any(q.disallowed is promoted for q in queries)  # ... not a search of their own
    candidates = pipeline._candidates

    def separately(*args: Any) -> Any:  # the promotion's own search, as before
        return candidates(*args[:5])

    monkeypatch.setattr(pipeline, "_candidates", separately)
    plain = [pipeline.rank(ListRequest(r.kind, r.k, user=r.user, rules=rules)) for r in requests]
    for a, b, c in zip(fused, again, plain, strict=True):
        for x, y in ((a, c), (b, c)):
            assert x.ids.tobytes() == y.ids.tobytes()
            assert x.scores.tobytes() == y.scores.tobytes()
            assert x.reason_codes().tobytes() == y.reason_codes().tobytes()


# ------------------------------------------------------------------ the compiled helpers
def test_by_score_orders_as_the_top_k_rule() -> None:
    rng = np.random.default_rng(5)
    values = np.array([0.0, -0.0, 1.0, 0.5, np.nan, -2.0, 3.0], np.float32)
    for trial in range(400):
        n = int(rng.integers(0, 150))  # short lists sort by insertion, long ones by merging
        if trial % 3:
            ids = rng.choice(10_000, n, replace=False).astype(np.int64)
        else:
            ids = rng.integers(0, 40, n).astype(np.int64)  # repeats keep their order
        scores = rng.choice(values, n) if trial % 2 else rng.standard_normal(n).astype(np.float32)
        k = int(rng.integers(0, n + 2))
        order = np.lexsort((ids, -scores))[:k]
        got_ids, got_scores = by_score(ids, scores, k)
        assert got_ids.tobytes() == ids[order].tobytes()
        assert got_scores.tobytes() == scores[order].tobytes()


def test_later_claims_replace_earlier_ones_and_model_claims_nothing() -> None:
    ids = np.array([7, 3, 9, 5], np.int64)
    reasons = np.zeros(4, np.uint8)
    boosted = np.array([3, 9, 11, 7], np.int64)
    assert claim_reasons(reasons, ids, boosted, np.array([1, 1, 1, 0], np.uint8))
    assert reasons.tolist() == [0, 1, 1, 0]
    promoted = np.array([9, 5, 3], np.int64)
    assert claim_reasons(reasons, ids, promoted, np.array([2, 0, 0], np.uint8))
    assert reasons.tolist() == [0, 1, Reason.PROMOTED, 0]
    assert not claim_reasons(reasons, ids, ids, np.zeros(4, np.uint8))
    assert reasons.tolist() == [0, 1, Reason.PROMOTED, 0]


# ------------------------------------------------------------------ plans and tables
def test_rules_are_checked_and_planned_once_per_rules_object(pipeline_for: Pipelines) -> None:
    pipeline = pipeline_for("als")
    stages = pipeline._rules
    rules = Rules(diversity=Diversity(2), promotion=Promotion(ItemFilter.of(["product"]), 0.2))
    plan = stages.plan(rules)
    assert stages.plan(rules) is plan
    assert stages.plan(Rules(diversity=Diversity(2))) is not plan
    # The stages one by one where the pipeline has stages of its own between them, and one
    # composed call where it has none.
    assert [type(s).__name__ for s in plan.before + plan.after] == ["GatherStage", "ArrangeStage"]
    assert [type(s).__name__ for s in plan.stages] == ["ComposedStage"]
    assert plan.promoted is not None and plan.promoted.sum() > 0
    bad = Rules(boosts=(Boost(ItemFilter.of(["gadget"]), 2.0),))
    for _ in range(2):  # a failed check is not kept: the same rules fail again
        with pytest.raises(InvalidInputError, match=r"rules\.boosts\.item_filter"):
            pipeline.rank(ListRequest(ListKind.USER, 5, user=1, rules=bad))


def test_boost_factors_multiply_in_the_order_of_the_boosts(pipeline_for: Pipelines) -> None:
    pipeline = pipeline_for("als")
    boosts = (
        Boost(ItemFilter.of(categories=["news"]), 1.7),
        Boost(ItemFilter.of(["content"]), 0.3),
        Boost(ItemFilter.of(categories=["news", "music"]), 2.9),
    )
    factors = pipeline._rules.boost_factors(boosts)
    assert pipeline._rules.boost_factors(boosts) is factors
    for item in range(pipeline.n_items):
        want = 1.0
        for boost in boosts:
            if pipeline.candidate_mask(boost.item_filter)[item]:
                want *= boost.factor
        assert factors[item] == want


def test_the_open_categories_are_one_kept_mask_the_candidates_honour(
    pipeline_for: Pipelines,
) -> None:
    pipeline = pipeline_for("als")
    stages = pipeline._rules
    codes = stages.category_codes()
    full = np.unique(codes[codes >= 0])[:1]
    mask = stages.open_categories(full)
    assert isinstance(mask, ItemMask) and stages.open_categories(full.copy()) is mask
    request = ListRequest(ListKind.USER, 10, user=3)
    got, scores = pipeline.candidates(request, 12, within=mask, skip=np.array([1, 2]))
    assert len(got) == 12 and mask.mask[got].all() and not np.isin(got, [1, 2]).any()
    everything, all_scores = pipeline.candidates(request, 60, skip=np.array([1, 2]))
    open_ones = everything[mask.mask[everything]][:12]  # the best of the open categories
    np.testing.assert_array_equal(got, open_ones)
    np.testing.assert_array_equal(scores, all_scores[mask.mask[everything]][:12])


def test_compiled_boosts_give_the_scores_of_the_formula() -> None:
    """``s * f ** sign(s)`` in float64, as float32: the compiled stage and numpy agree to the
    bit (negative, zero and positive scores; factors across their whole range)."""
    from models.rules import _boosted

    rng = np.random.default_rng(6)
    scores = np.concatenate(
        [rng.standard_normal(5_000) * 10.0 ** rng.integers(-3, 4, 5_000), [0.0, -0.0]]
    ).astype(np.float32)
    factors = np.exp(rng.uniform(np.log(1e-6), np.log(1e6), len(scores)))
    factors[::7] = 1.0
    values = scores.astype(np.float64)
    want = (values * factors ** np.sign(values)).astype(np.float32)
    got, raised = _boosted(values, factors)
    assert got.tobytes() == want.tobytes()
    np.testing.assert_array_equal(raised, (factors > 1).view(np.uint8))


# ------------------------------------------------------------------ the composed stage
@pytest.mark.parametrize("algorithm", ["als", "ease"])  # unit vectors, and a model without
def test_the_composed_stage_gives_the_lists_of_the_stages_run_one_by_one(
    pipeline_for: Pipelines, monkeypatch: pytest.MonkeyPatch, algorithm: str
) -> None:
    from models.rules import ComposedStage

    pipeline = pipeline_for(algorithm)
    news, music = ItemFilter.of(categories=["news"]), ItemFilter.of(categories=["music"])

    def cases() -> list[Rules]:  # fresh objects: plans are kept per Rules object
        return [
            Rules(diversity=Diversity(2)),
            Rules(diversity=Diversity(0, 0.4)),
            Rules(diversity=Diversity(1, 0.8), boosts=(Boost(news, 1.5),)),
            Rules(promotion=Promotion(music, 0.3)),
            Rules(boosts=(Boost(news, 2.0),), promotion=Promotion(music, 0.2)),
            Rules(
                diversity=Diversity(2, 0.3),
                boosts=(Boost(news, 1.5),),
                promotion=Promotion(music, 0.2),
            ),
        ]

    def lists(rules: list[Rules]) -> list[tuple[list[int], bytes, list[int]]]:
        out = []
        for r in rules:
            for user in range(30):
                for k in (3, 10):
                    got = pipeline.rank(ListRequest(ListKind.USER, k, user=user, rules=r))
                    reasons = got.reasons if got.reasons is not None else np.zeros(0)
                    out.append((got.ids.tolist(), got.scores.tobytes(), reasons.tolist()))
        return out

    composed = cases()
    kinds = {type(s).__name__ for r in composed for s in pipeline._rules.plan(r).stages}
    assert "ComposedStage" in kinds  # the composed path ran
    fused = lists(composed)
    monkeypatch.setattr(ComposedStage, "fits", staticmethod(lambda rules: False))
    plain = cases()
    assert {type(s).__name__ for r in plain for s in pipeline._rules.plan(r).stages}.isdisjoint(
        {"ComposedStage"}
    )
    one_by_one = lists(plain)
    # Reasons: the stages one by one give an array of zeros where a boost raised an item the
    # list did not keep; the composed stage claims nothing there. Both mean "the model's".
    for (ids, scores, why), (ids2, scores2, why2) in zip(fused, one_by_one, strict=True):
        assert ids == ids2 and scores == scores2
        assert (why or [0] * len(ids)) == (why2 or [0] * len(ids2))


def test_a_cap_alone_is_one_capped_search_giving_the_list_the_stage_lays_out(
    pipeline_for: Pipelines, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.rules import ComposedStage

    pipeline = pipeline_for("als")
    # A first block of 16 makes the small test catalog one whose searches skip items, as a
    # served catalog's do (the capped search applies only there).
    index = NormOrderedIndex(pipeline.model.item_factors, first_block=16)  # type: ignore[attr-defined]
    assert index.prunes
    monkeypatch.setattr(pipeline, "_index", index)
    queries: list[Query] = []
    search = index.search
    monkeypatch.setattr(index, "search", lambda qs: queries.extend(qs) or search(qs))
    sport = ItemFilter.of(categories=["sport", "music"])

    def lists() -> list[tuple[list[int], np.ndarray, Any, Any]]:
        out = []
        for cap in (1, 2, 3):
            rules = Rules(diversity=Diversity(cap))
            for flt in (NO_FILTER, sport):
                for user in range(25):
                    for k in (3, 5, 10):
                        request = ListRequest(ListKind.USER, k, user=user, rules=rules)
                        request.item_filter = flt
                        got = pipeline.rank(request)
                        out.append((got.ids.tolist(), got.scores, got.reasons, got.source))
        return out

    capped = lists()
    answered = [q for q in queries if q.cap > 0]
    assert answered  # the capped search ran ...
    # ... and some lists it could not fill (3 categories: cap 1 cannot make 5) went the long way.
    assert any(q.more == 0 and q.cap == 0 and q.k > 10 for q in queries)
    monkeypatch.setattr(ComposedStage, "search_cap", lambda self, request: None)
    queries.clear()
    laid_out = lists()
    assert not any(q.cap for q in queries)
    for (ids, scores, why, source), (ids2, scores2, why2, source2) in zip(
        capped, laid_out, strict=True
    ):
        assert ids == ids2 and source == source2
        np.testing.assert_allclose(scores, scores2, rtol=1e-6)  # float32 rounding, at most
        assert (why is None or not why.any()) and (why2 is None or not why2.any())
        categories = np.asarray(pipeline.catalog.category)[ids]
        assert max(np.unique(categories, return_counts=True)[1], default=0) <= 3
