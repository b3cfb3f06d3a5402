"""Lifecycle-stage strategies (models/strategies.py): the configuration, and what each strategy
does to a list, checked by hand on a popularity model whose scores are the numbers below."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import scipy.sparse as sp

from models.artifact import ItemCatalog, ModelBundle
from models.errors import InvalidInputError
from models.lifecycle import STAGES
from models.popularity import Popularity
from models.ranking import ItemFilter, ListKind, ListRequest, RankingPipeline
from models.strategies import (
    DEFAULT_STAGE_STRATEGIES,
    NewUserParams,
    Strategy,
    StrategyConfig,
    WinBackParams,
)
from models.vocabulary import MISSING

DAY = 86_400.0
# Items 0-5 are category "a", 6-11 category "b"; "b" is more popular overall.
POPULARITY = np.array([10, 9, 8, 7, 6, 5, 21, 19, 18, 17, 16, 15], dtype=np.float32)
# Trending favours the end of each category (reversed within it).
TRENDING = np.array([1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5, 6], dtype=np.float32)


def _pipeline() -> RankingPipeline:
    n = len(POPULARITY)
    # User 0 has item 0 (category a); user 1 items 6 and 7 (category b).
    seen = sp.csr_matrix(
        (np.ones(3, np.float32), ([0, 1, 1], [0, 6, 7])), shape=(2, n), dtype=np.float32
    )
    model = Popularity().fit(seen)
    category = np.array(["a"] * 6 + ["b"] * 6, dtype=object)
    blank = np.full(n, "", dtype=object)
    catalog = ItemCatalog(blank, category, blank.copy(), np.ones(n, dtype=bool))
    first_seen = np.zeros(n)
    first_seen[[5, 11]] = 100 * DAY  # the newest two items; the rest 100 days older
    catalog.first_seen = first_seen
    pipeline = RankingPipeline(
        model, seen=seen, popularity=POPULARITY, trending=TRENDING, catalog=catalog
    )
    # The popularity model's own scores are the pipeline's popularity: rank by the numbers above.
    pipeline.model.shared_scores = lambda: POPULARITY  # type: ignore[method-assign]
    pipeline.model.score_users = lambda users, rows: np.tile(  # type: ignore[method-assign]
        POPULARITY, (len(users), 1)
    )
    return pipeline


def _list(
    pipeline: RankingPipeline, strategy: Strategy | None, user: int = 0, **kw: object
) -> list:
    request = ListRequest(ListKind.USER, 4, user=user, strategy=strategy, **kw)  # type: ignore[arg-type]
    return pipeline.rank(request).ids.tolist()


def new_user(**params: object) -> Strategy:
    return Strategy("new_user", NewUserParams(**params))  # type: ignore[arg-type]


def win_back(**params: object) -> Strategy:
    return Strategy("win_back", WinBackParams(**params))  # type: ignore[arg-type]


def test_personalized_is_the_plain_ranking() -> None:
    pipeline = _pipeline()
    assert StrategyConfig().strategy("personalized") is None
    # Popular order without the seen item 0.
    assert _list(pipeline, None) == [6, 7, 8, 9]


def test_new_user_takes_the_popular_items_of_the_users_categories() -> None:
    pipeline = _pipeline()
    # weight 1: only the popularity within category "a" (item 0's) counts: 1, 2, 3, 4.
    assert _list(pipeline, new_user(weight=1.0, new_share=0.0)) == [1, 2, 3, 4]
    # weight 0.5: the candidates are 6..11, 1, 2 (k * 2, popular order) and a's list 1..5.
    # model part (score - 5) / 16; popular part 1 - rank / 5 in a's list:
    # 1: .5*4/16 + .5*1 = .625; 6: .5*1 = .5; 2: .5*3/16 + .5*.8 = .49375; 7: .5*14/16 = .4375
    assert _list(pipeline, new_user(weight=0.5, new_share=0.0)) == [1, 6, 2, 7]
    # User 1 has items of "b": b's popular items come first, not a's.
    assert _list(pipeline, new_user(weight=1.0, new_share=0.0), user=1) == [8, 9, 10, 11]


def test_new_user_gives_a_share_of_the_places_to_new_items() -> None:
    pipeline = _pipeline()
    # One place of 4 (share .25) at place 2 (the middle of the list) for the best new item by
    # the blend: 11 (.5 * 10/16 = .3125) before 5 (.5 * 0 + .5 * .2 = .1).
    assert _list(pipeline, new_user(weight=0.5, new_share=0.25)) == [1, 6, 11, 2]
    # Half the places: 11 and 5 at places 1 and 3.
    assert _list(pipeline, new_user(weight=0.5, new_share=0.5)) == [1, 11, 6, 5]
    # A cold user (nothing known): the popular list with the new item 11 at place 2.
    cold = ListRequest(ListKind.USER, 4, user=MISSING, strategy=new_user(new_share=0.25))
    assert pipeline.rank(cold).ids.tolist() == [6, 7, 11, 8]


def test_a_strategy_never_escapes_the_requests_filters() -> None:
    pipeline = _pipeline()
    strategy = new_user(weight=1.0, new_share=0.5)
    only_b = ItemFilter.of(categories=["b"])
    got = _list(pipeline, strategy, item_filter=only_b, exclude=np.array([6, 11]))
    assert got == [7, 8, 9, 10]  # a's items filtered out, 6 and the new 11 excluded
    assert 0 not in _list(pipeline, win_back(trending_weight=1.0, near_weight=0.0))


def test_win_back_takes_what_trends_in_the_users_categories() -> None:
    pipeline = _pipeline()
    # Only trending within "a" counts: 5, 4, 3, 2 (trending rises along the category).
    assert _list(pipeline, win_back(near_weight=0.0, trending_weight=1.0)) == [5, 4, 3, 2]
    assert _list(pipeline, win_back(near_weight=0.0, trending_weight=1.0), user=1) == [
        11,
        10,
        9,
        8,
    ]


def test_win_back_pulls_up_the_items_nearest_the_favourites(
    bundle_for: Callable[[str], ModelBundle],
) -> None:
    pipeline = RankingPipeline.from_bundle(bundle_for("als"))
    user = 1
    strategy = win_back(near_weight=1.0, trending_weight=0.0, favourites=2)
    got = pipeline.rank(ListRequest(ListKind.USER, 5, user=user, strategy=strategy))
    # Independently: the user's two items of highest confidence (ties: lowest index), and every
    # candidate's highest cosine to them; the list is the candidates in that order.
    row = pipeline._seen[user]
    favourites = row.indices[np.lexsort((row.indices, -row.data))][:2]
    vectors = pipeline.model.item_factors  # type: ignore[attr-defined]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    closeness = np.clip((unit[got.ids] @ unit[favourites].T).max(axis=1), 0, 1)
    assert np.all(np.diff(closeness) <= 1e-5)  # best first
    assert np.allclose(got.scores, closeness, atol=1e-5)
    plain = pipeline.rank(ListRequest(ListKind.USER, 5, user=user))
    assert got.ids.tolist() != plain.ids.tolist()


@pytest.mark.parametrize("name", ["new_user", "win_back"])
def test_a_batch_ranks_each_user_as_one_request_does(
    name: str, bundle_for: Callable[[str], ModelBundle]
) -> None:
    pipeline = RankingPipeline.from_bundle(bundle_for("als"))
    strategy = StrategyConfig().strategy(name)
    users = np.arange(pipeline.n_users)
    batch = pipeline.rank_users(users, 10, strategy=strategy)
    for user in users:
        one = pipeline.rank(ListRequest(ListKind.USER, 10, user=int(user), strategy=strategy))
        assert batch[user].tolist() == one.ids.tolist()
    # And the strategy changed some lists.
    assert (batch != pipeline.rank_users(users, 10)).any()


def test_the_configuration_defaults_and_overrides() -> None:
    config = StrategyConfig()
    assert config.by_stage() == DEFAULT_STAGE_STRATEGIES
    assert set(config.by_stage()) == set(STAGES)
    assert StrategyConfig.parse("off") is None and StrategyConfig.parse("") is None
    assert StrategyConfig.parse("default") == config
    parsed = StrategyConfig.parse('{"at_risk": "win_back", "new_user": {"new_share": 0.1}}')
    assert parsed is not None
    assert parsed.at_risk == "win_back" and parsed.new_user.new_share == 0.1
    assert parsed.active == DEFAULT_STAGE_STRATEGIES["active"]
    strategy = parsed.strategy_of("at_risk")
    assert strategy is not None and strategy.name == "win_back"


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ('{"at_risk": "nope"}', "at_risk", "at_risk: Input should be"),
        ('{"new_user": {"new_share": 2}}', "new_user.new_share", "new_user.new_share"),
        (
            '{"win_back": {"near_weight": 0.7, "trending_weight": 0.5}}',
            "win_back.trending_weight",
            "at most 1",
        ),
        ('{"lapsed": "win_back"}', "lapsed", "lapsed: unknown setting"),
        ("[1]", "config", "JSON object"),
        ("{nope", "config", "not off, default or a JSON object"),
    ],
)
def test_a_bad_configuration_is_refused_naming_the_field(
    text: str, field: str, message: str
) -> None:
    with pytest.raises(InvalidInputError, match="stage strategies") as info:
        StrategyConfig.parse(text)
    assert info.value.field == field
    assert message in str(info.value)
