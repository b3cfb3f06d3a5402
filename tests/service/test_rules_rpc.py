"""Ranking rules over real gRPC: each rule's effect, how it composes with filters and exclusions,
bad values (INVALID_ARGUMENT naming the field), the server's defaults and their per-request
override, rotation from the items a user was just shown (the same worker, and another worker
through the recorded answers, SQLite and PostgreSQL), recorded reasons, the client and the CLI.

The model is the shared synthetic one (``conftest.py``: category "a" is i00-i19, "b" i20-i39,
i39 unavailable) with a first appearance for every item: every fourth item (i00, i04, ..., i36)
appeared a day ago, the others 100 days ago, so exploration has new items to draw from.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from sqlalchemy import text

import service.events as events_module
from models.artifact import load_artifact, save_artifact
from models.ranking import RankingPipeline
from models.rules import slot_positions
from protos.affinity.v1 import recommender_pb2 as pb
from protos.affinity.v1 import recommender_pb2_grpc as pb_grpc
from service.client import AffinityClient, Item, Result
from service.config import ServeSettings
from service.events import EventStore, Response, Shown
from service.live import LiveActivity
from service.loader import ModelHolder
from service.recorder import ResponseRecorder
from service.rules import RuleDefaults, RuleResolver, parse_boosts, parse_filter, parse_weighted
from tests.service.conftest import (
    N_ITEMS,
    build_bundle,
    client_for,
    cluster_of,
    loaded_model,
    running,
    settings_for,
    status_of,
)

DAY = 86_400.0
NEW = [f"i{i:02d}" for i in range(0, N_ITEMS, 4)]
"""Items that first appeared a day ago (explorable); the others appeared 100 days ago."""
UNAVAILABLE = "i39"


@pytest.fixture(scope="module")
def rules_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = build_bundle(0)
    now = time.time()
    first_seen = np.where(np.arange(N_ITEMS) % 4 == 0, now - DAY, now - 100 * DAY)
    catalog = replace(bundle.catalog, first_seen=first_seen.astype(np.float64))
    directory = tmp_path_factory.mktemp("rules") / "affinity-rules"
    save_artifact(replace(bundle, catalog=catalog), directory)
    return directory


@pytest.fixture(scope="module")
def rules_pipeline(rules_artifact: Path) -> RankingPipeline:
    return RankingPipeline.from_bundle(load_artifact(rules_artifact))


@contextlib.contextmanager
def serving(
    pipeline: RankingPipeline, artifact: Path, tmp_path: Path, **settings: Any
) -> Iterator[AffinityClient]:
    """A server (no event store) with ``settings``, and a client of it."""
    holder = ModelHolder()
    holder.swap(loaded_model(pipeline, version="1"))
    with (
        running(settings_for(artifact, tmp_path, **settings), holder) as port,
        client_for(port, timeout=10) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def client(
    rules_pipeline: RankingPipeline,
    rules_artifact: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[AffinityClient]:
    """A server with the default settings: every rule off."""
    with serving(rules_pipeline, rules_artifact, tmp_path_factory.mktemp("srv")) as opened:
        yield opened


def categories(result: Result) -> list[str]:
    return [item.category for item in result.items]


def reasons(result: Result) -> list[str]:
    return [item.reason for item in result.items]


def per_category(result: Result) -> dict[str, int]:
    counts: dict[str, int] = {}
    for category in categories(result):
        counts[category] = counts.get(category, 0) + 1
    return counts


# ------------------------------------------------------------------ without rules
def test_a_list_without_rules_is_the_pipelines_and_every_reason_is_model(
    client: AffinityClient, rules_pipeline: RankingPipeline
) -> None:
    for user in ("u01", "u40", "nobody"):
        got = client.recommend(user, k=10)
        expected = rules_pipeline.recommend(user, 10)
        assert got.item_ids == expected.item_ids
        assert reasons(got) == ["model"] * len(got.items)
    # Rules that change nothing (an empty message, rules turned off) give the same list.
    for rules in ({}, {"diversity": {"max_per_category": 0, "mmr": 0}}, {"no_boosts": True}):
        assert client.recommend("u01", k=10, rules=rules).item_ids == (
            client.recommend("u01", k=10).item_ids
        )


# ------------------------------------------------------------------ each rule
def test_a_category_cap_holds_and_composes_with_filters(client: AffinityClient) -> None:
    plain = client.recommend("u01", k=10)
    assert max(per_category(plain).values()) > 2
    capped = client.recommend("u01", k=10, rules={"diversity": {"max_per_category": 2}})
    assert max(per_category(capped).values()) <= 2
    # Two categories, two each: the cap is hard, the list comes back short.
    assert len(capped.items) == 4
    products = client.recommend(
        "u01", k=10, item_types=["product"], rules={"diversity": {"max_per_category": 3}}
    )
    assert {item.item_type for item in products.items} == {"product"}
    assert max(per_category(products).values()) <= 3
    # The cap applies to item and popular lists too.
    for result in (
        client.similar_items(["i03"], k=8, rules={"diversity": {"max_per_category": 1}}),
        client.popular(8, rules={"diversity": {"max_per_category": 1}}),
    ):
        assert max(per_category(result).values()) == 1


def test_mmr_brings_the_other_category_up(client: AffinityClient) -> None:
    def other_in_top(result: Result, n: int = 5) -> int:
        return sum(category == "b" for category in categories(result)[:n])

    plain = client.recommend("u01", k=10)
    diverse = client.recommend("u01", k=10, rules={"diversity": {"mmr": 0.9}})
    assert len(diverse.items) == 10
    assert other_in_top(diverse) > other_in_top(plain)
    assert reasons(diverse) == ["model"] * 10


def test_a_boost_raises_matching_items_within_the_filters(client: AffinityClient) -> None:
    plain = client.recommend("u01", k=10)
    boosted = client.recommend(
        "u01", k=10, rules={"boosts": [{"categories": ["b"], "factor": 100.0}]}
    )
    assert categories(boosted)[0] == "b" and categories(plain)[0] == "a"
    assert all((item.reason == "boosted") == (item.category == "b") for item in boosted.items)
    # A boost never reaches past a filter: category "a" only, however strong the boost of "b".
    within = client.recommend(
        "u01",
        k=10,
        categories=["a"],
        rules={"boosts": [{"categories": ["b"], "factor": 100.0}]},
    )
    assert set(categories(within)) == {"a"}
    # A factor below 1 demotes: the user's own category falls behind the other.
    demoted = client.recommend(
        "u01", k=10, rules={"boosts": [{"categories": ["a"], "factor": 0.001}]}
    )
    assert categories(demoted)[0] == "b" and "boosted" not in reasons(demoted)


def test_a_promotion_fills_spread_slots_from_its_filter(client: AffinityClient) -> None:
    rules = {"promotion": {"categories": ["b"], "share": 0.3}}
    result = client.recommend("u01", k=10, rules=rules)
    promoted = [n for n, item in enumerate(result.items) if item.reason == "promoted"]
    assert promoted == slot_positions(10, 3)
    assert all(result.items[n].category == "b" for n in promoted)
    # The other places hold the model's list, in its order, less the promoted items.
    plain = client.recommend("u01", k=13).item_ids
    chosen = {result.items[n].item_id for n in promoted}
    rest = [item.item_id for item in result.items if item.reason == "model"]
    assert rest == [i for i in plain if i not in chosen][:7]


def test_a_promotion_never_brings_back_an_excluded_unavailable_seen_or_filtered_item(
    client: AffinityClient, rules_pipeline: RankingPipeline
) -> None:
    everything = {"promotion": {"categories": ["b"], "share": 1.0}}
    full = client.recommend("u01", k=30, rules=everything)
    assert UNAVAILABLE not in full.item_ids
    assert all(item.reason == "promoted" for item in full.items if item.category == "b")
    excluded = [i for i in full.item_ids if cluster_of(i) == "b"][:5]
    again = client.recommend("u01", k=30, exclude_item_ids=excluded, rules=everything)
    assert not set(excluded) & set(again.item_ids)
    assert UNAVAILABLE not in again.item_ids
    # A user of "b": their seen "b" items are never promoted back (unless include_seen).
    assert rules_pipeline.bundle is not None
    seen = set(rules_pipeline.items.decode(rules_pipeline.bundle.seen[40].indices))  # type: ignore[union-attr]
    theirs = client.recommend("u40", k=30, rules=everything)
    assert not seen & set(theirs.item_ids)
    assert seen & set(client.recommend("u40", k=30, include_seen=True, rules=everything).item_ids)
    # Within a filter: promoted items are products of "b", nothing else comes back.
    products = client.recommend("u01", k=10, item_types=["product"], rules=everything)
    assert {item.item_type for item in products.items} == {"product"}
    # Similar and popular lists promote too, within their own exclusions.
    similar = client.similar_items(
        ["i03"], k=6, exclude_item_ids=excluded, rules={"promotion": everything["promotion"]}
    )
    assert "i03" not in similar.item_ids and not set(excluded) & set(similar.item_ids)
    assert "promoted" in reasons(similar)


def test_exploration_places_new_items_by_a_seeded_draw(
    client: AffinityClient, rules_pipeline: RankingPipeline
) -> None:
    rules: dict[str, Any] = {"exploration": {"share": 0.2, "max_age_days": 7, "seed": 3}}
    result = client.recommend("u01", k=10, rules=rules)
    explored = [n for n, item in enumerate(result.items) if item.reason == "explored"]
    assert explored == slot_positions(10, 2)
    assert all(result.items[n].item_id in NEW for n in explored)
    # Reproducible: the same seed, user and day give the same list.
    assert client.recommend("u01", k=10, rules=rules).item_ids == result.item_ids
    # Some other seed draws other items.
    picks = {
        tuple(
            item.item_id
            for item in client.recommend(
                "u01", k=10, rules={"exploration": {"share": 0.2, "seed": seed}}
            ).items
            if item.reason == "explored"
        )
        for seed in range(8)
    }
    assert len(picks) > 1
    # Old items are never explored; excluded new ones never come back.
    gone = [result.items[n].item_id for n in explored]
    again = client.recommend("u01", k=10, exclude_item_ids=gone, rules=rules)
    assert not set(gone) & set(again.item_ids)
    assert all(item.item_id in NEW for item in again.items if item.reason == "explored")
    # A max age no item meets explores nothing; then the list is the model's.
    none_new = client.recommend(
        "u01", k=10, rules={"exploration": {"share": 0.2, "max_age_days": 0.5}}
    )
    assert none_new.item_ids == client.recommend("u01", k=10).item_ids


def test_all_rules_together_keep_the_filters_and_the_cap(client: AffinityClient) -> None:
    rules = {
        "diversity": {"max_per_category": 3, "mmr": 0.3},
        "boosts": [{"item_types": ["content"], "factor": 2.0}],
        "promotion": {"categories": ["b"], "share": 0.2},
        "exploration": {"share": 0.1},
    }
    result = client.recommend("u01", k=10, exclude_item_ids=["i02", "i23"], rules=rules)
    assert max(per_category(result).values()) <= 3
    assert not {"i02", "i23", UNAVAILABLE} & set(result.item_ids)
    assert "promoted" in reasons(result)


# ------------------------------------------------------------------ bad values
def _recommend(rules: dict[str, Any]) -> pb.RecommendRequest:
    from service.client import ranking_rules

    return pb.RecommendRequest(user_id="u01", k=10, rules=ranking_rules(rules))


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("mmr above 1", {"diversity": {"mmr": 2}}, "rules.diversity.mmr"),
    ("mmr not finite", {"diversity": {"mmr": "NaN"}}, "rules.diversity.mmr"),
    ("negative cap", {"diversity": {"max_per_category": -1}}, "rules.diversity.max_per_category"),
    ("boost factor 0", {"boosts": [{"categories": ["a"]}]}, "rules.boosts.factor"),
    ("boost factor inf", {"boosts": [{"categories": ["a"], "factor": "Infinity"}]}, "rules.boosts"),
    ("boost factor 1e300", {"boosts": [{"categories": ["a"], "factor": 1e300}]}, "rules.boosts"),
    ("boost factor 1e-300", {"boosts": [{"categories": ["a"], "factor": 1e-300}]}, "rules.boosts"),
    ("boost without filter", {"boosts": [{"factor": 2}]}, "rules.boosts"),
    (
        "boost of an unknown type",
        {"boosts": [{"item_types": ["gadget"], "factor": 2}]},
        "rules.boosts.item_types",
    ),
    (
        "boosts with no_boosts",
        {"no_boosts": True, "boosts": [{"categories": ["a"], "factor": 2}]},
        "rules.boosts",
    ),
    (
        "too many boosts",
        {"boosts": [{"categories": ["a"], "factor": 2}] * 33},
        "rules.boosts",
    ),
    ("promotion share 1.5", {"promotion": {"categories": ["b"], "share": 1.5}}, "rules.promotion"),
    ("promotion without share", {"promotion": {"categories": ["b"]}}, "rules.promotion.share"),
    ("promotion without filter", {"promotion": {"share": 0.2}}, "rules.promotion"),
    ("exploration share < 0", {"exploration": {"share": -0.1}}, "rules.exploration.share"),
    ("exploration without share", {"exploration": {"seed": 1}}, "rules.exploration.share"),
    (
        "exploration age 0",
        {"exploration": {"share": 0.1, "max_age_days": 0}},
        "rules.exploration.max_age_days",
    ),
    (
        "exploration limit < 0",
        {"exploration": {"share": 0.1, "max_interactions": -1}},
        "rules.exploration.max_interactions",
    ),
    (
        "shares above 1",
        {"promotion": {"categories": ["b"], "share": 0.7}, "exploration": {"share": 0.5}},
        "rules.exploration.share",
    ),
    ("rotation rate above 1", {"rotation": {"rate": 1.5}}, "rules.rotation.rate"),
    ("rotation half-life 0", {"rotation": {"half_life_seconds": 0}}, "rules.rotation"),
    ("rotation on a server without it", {"rotation": {"rate": 0.5}}, "rules.rotation.rate"),
]


@pytest.mark.parametrize(("rules", "field"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_rules_are_invalid_argument_naming_the_field(
    client: AffinityClient, rules: dict[str, Any], field: str
) -> None:
    stub = pb_grpc.RecommenderStub(client._channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Recommend(_recommend(rules), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    details = info.value.details()  # type: ignore[attr-defined]
    assert details.startswith(field), details


def test_user_rules_on_item_and_popular_lists_are_invalid_argument(
    client: AffinityClient,
) -> None:
    for part in ("exploration", "rotation"):
        rules = {part: {"share": 0.1} if part == "exploration" else {"rate": 0.5}}
        for call in (
            lambda r=rules: client.similar_items(["i01"], k=3, rules=r),
            lambda r=rules: client.popular(3, rules=r),
        ):
            assert status_of(call) == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------ the server's defaults
def test_settings_defaults_apply_and_each_field_is_overridden_per_request(
    rules_pipeline: RankingPipeline, rules_artifact: Path, tmp_path: Path
) -> None:
    defaults = {
        "rules_max_per_category": 2,
        "rules_boosts": "item_type=content:50",
        "rules_promotion": "category=b:0.2",
    }
    with serving(rules_pipeline, rules_artifact, tmp_path, **defaults) as client:
        plain = client.recommend("u01", k=10)
        assert max(per_category(plain).values()) <= 2
        assert {"boosted", "promoted"} <= set(reasons(plain))
        # Field by field: the cap lifted, the boosts and promotion still the defaults.
        uncapped = client.recommend("u01", k=10, rules={"diversity": {"max_per_category": 0}})
        assert len(uncapped.items) == 10 and max(per_category(uncapped).values()) > 2
        assert {"boosted", "promoted"} <= set(reasons(uncapped))
        assert "boosted" not in reasons(client.recommend("u01", k=10, rules={"no_boosts": True}))
        own_boost = client.recommend(
            "u01", k=10, rules={"boosts": [{"item_types": ["product"], "factor": 50}]}
        )
        assert all(
            item.item_type == "product" for item in own_boost.items if item.reason == "boosted"
        )
        off = client.recommend("u01", k=10, rules={"promotion": {"share": 0}})
        assert "promoted" not in reasons(off)
        # The default share with the request's own filter.
        other = client.recommend(
            "u01",
            k=10,
            rules={"diversity": {"max_per_category": 0}, "promotion": {"categories": ["a"]}},
        )
        promoted = [item for item in other.items if item.reason == "promoted"]
        assert len(promoted) == 2 and {item.category for item in promoted} == {"a"}
        # Item and popular lists take the defaults too.
        assert max(per_category(client.popular(10)).values()) <= 2
        assert max(per_category(client.similar_items(["i05"], k=10)).values()) <= 2


def test_rule_settings_are_validated_read_from_the_environment_and_serve_options(
    monkeypatch: pytest.MonkeyPatch, artifact_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from affinity.cli import main
    from service.config import load_settings

    monkeypatch.setenv("AFFINITY_RULES_MMR", "0.25")
    monkeypatch.setenv("AFFINITY_RULES_BOOSTS", "category=a|b,item_type=product:1.5;category=c:2")
    settings = load_settings(model_uri=str(artifact_dir), rules_promotion="category=b:0.1")
    defaults = RuleDefaults.from_settings(settings)
    assert defaults.mmr == 0.25 and len(defaults.boosts) == 2
    assert defaults.boosts[0].item_filter.categories == ("a", "b")
    assert defaults.promotion is not None and defaults.promotion.share == 0.1
    assert not defaults.keeps_shown and defaults.shown_keep_seconds == 0
    assert not RuleResolver(defaults).off and RuleResolver().off
    monkeypatch.delenv("AFFINITY_RULES_MMR")
    monkeypatch.delenv("AFFINITY_RULES_BOOSTS")
    for argv, field in [
        (["--rules-mmr", "1.5"], "rules_mmr"),
        (["--rules-boosts", "category=a"], "rules_boosts"),
        (["--rules-boosts", "colour=red:2"], "rules_boosts"),
        (["--rules-promotion", "category=b:2"], "rules_promotion"),
        (["--rules-explore-share", "-0.1"], "rules_explore_share"),
        (["--rules-rotation-half-life", "0"], "rules_rotation_half_life_seconds"),
        (["--rules-rotation-rate", "0.5", "--live", "false"], "live=true"),
        (["--rules-promotion", "category=b:0.6", "--rules-explore-share", "0.5"], "add up"),
    ]:
        base = ["serve", "--model", str(artifact_dir), "--workers", "1", "--port", "0"]
        assert main([*base, *argv]) == 1
        err = capsys.readouterr().err
        assert field in err, err


def test_the_text_form_of_filters() -> None:
    assert parse_filter("category=a|b, item_type=product", "x").categories == ("a", "b")
    flt, factor = parse_weighted("category=new:arrivals:1.5", "x")
    assert flt.categories == ("new:arrivals",) and factor == 1.5
    assert parse_boosts("") == ()
    for bad in ("category=a", "colour=red:2", "category=:2", "category=a:x", "category=a:inf"):
        with pytest.raises(Exception, match="x"):
            parse_boosts(bad, "x")


# ------------------------------------------------------------------ rotation
@pytest.fixture
def store(events_db: str) -> Iterator[EventStore]:
    with EventStore.open(events_db) as opened:
        yield opened


@contextlib.contextmanager
def worker(
    pipeline: RankingPipeline,
    artifact: Path,
    tmp_path: Path,
    store: EventStore,
    **settings: Any,
) -> Iterator[tuple[AffinityClient, LiveActivity, ResponseRecorder]]:
    """One server "worker" with its own live view (keeping shown items as its settings say)
    and recorder over the shared store, as ``service/event_side.py`` builds them."""
    config: ServeSettings = settings_for(artifact, tmp_path, **settings)
    holder = ModelHolder()
    holder.swap(loaded_model(pipeline, version="1"))
    live = LiveActivity(
        store,
        poll_seconds=0.05,
        shown_keep_seconds=RuleDefaults.from_settings(config).shown_keep_seconds,
    )
    live.start()
    recorder = ResponseRecorder(store, interval=0.05)
    recorder.start()
    try:
        with (
            running(config, holder, store=store, live=live, recorder=recorder) as port,
            client_for(port, timeout=10) as client,
        ):
            yield client, live, recorder
    finally:
        recorder.stop()
        live.stop()


def _wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.02)


def test_rotation_demotes_what_this_user_was_just_shown_on_the_same_worker(
    rules_pipeline: RankingPipeline, rules_artifact: Path, tmp_path: Path, store: EventStore
) -> None:
    with worker(rules_pipeline, rules_artifact, tmp_path, store, rules_rotation_rate=1.0) as (
        client,
        live,
        _,
    ):
        first = client.recommend("u03", k=5)
        shown = live.shown("u03")
        assert shown is not None and sorted(shown[0]) == sorted(first.item_ids)
        second = client.recommend("u03", k=5)
        assert not set(first.item_ids) & set(second.item_ids)
        assert reasons(second) == ["model"] * 5  # rotation moves items, it claims none
        # A request may turn it off, or ask for less; other users are untouched.
        unrotated = client.recommend("u03", k=5, rules={"rotation": {"rate": 0}})
        assert unrotated.item_ids == first.item_ids
        assert client.recommend("u04", k=5).item_ids == rules_pipeline.recommend("u04", 5).item_ids


def test_a_server_that_allows_rotation_rotates_only_when_asked(
    rules_pipeline: RankingPipeline, rules_artifact: Path, tmp_path: Path, store: EventStore
) -> None:
    with worker(rules_pipeline, rules_artifact, tmp_path, store, rules_rotation_allowed=True) as (
        client,
        _,
        _,
    ):
        first = client.recommend("u06", k=5)
        assert client.recommend("u06", k=5).item_ids == first.item_ids
        asked = client.recommend("u06", k=5, rules={"rotation": {"rate": 1.0}})
        assert not set(first.item_ids) & set(asked.item_ids)
        # A long-ago showing (a tiny half-life) weighs nothing.
        faded = client.recommend(
            "u06", k=5, rules={"rotation": {"rate": 1.0, "half_life_seconds": 1e-6}}
        )
        assert faded.item_ids == first.item_ids


def test_rotation_demotes_what_another_worker_showed_through_the_recorded_answers(
    rules_pipeline: RankingPipeline, rules_artifact: Path, tmp_path: Path, store: EventStore
) -> None:
    settings = {"rules_rotation_rate": 1.0}
    with (
        worker(rules_pipeline, rules_artifact, tmp_path / "a", store, **settings) as (a, _, _),
        worker(rules_pipeline, rules_artifact, tmp_path / "b", store, **settings) as (b, live_b, _),
    ):
        first = a.recommend("u07", k=5)
        _wait_for(lambda: live_b.shown("u07") is not None)
        shown = live_b.shown("u07")
        assert shown is not None and sorted(shown[0]) == sorted(first.item_ids)
        assert not set(first.item_ids) & set(b.recommend("u07", k=5).item_ids)
        # Erased: the user's shown items go with the rest.
        store.delete_user("u07")
        _wait_for(lambda: live_b.shown("u07") is None)
    assert live_b._answer_cursor == store.newest_response_id()


def test_a_new_worker_loads_the_recently_shown_items(store: EventStore) -> None:
    now = datetime.now(UTC)
    store.record_responses(
        [
            Response("r1", "Recommend", "u1", ("i1", "i2"), "personalized", "m", "1", now),
            Response("r2", "Popular", None, ("i3",), "popular", "m", "1", now),
            Response(
                "r3", "Recommend", "u2", ("i4",), "personalized", "m", "1", now - timedelta(days=9)
            ),
        ]
    )
    live = LiveActivity(store, poll_seconds=60, shown_keep_seconds=4 * DAY)
    live.bootstrap()
    shown = live.shown("u1")
    assert shown is not None and shown[0] == ["i1", "i2"] and (shown[1] < 60).all()
    assert live.shown("u2") is None  # served before the window
    assert live.shown_users == 1
    assert live._answer_cursor == store.newest_response_id()
    # Without rotation nothing is kept and the answers are not read.
    plain = LiveActivity(store, poll_seconds=60)
    plain.bootstrap()
    plain.showed("u1", ["i9"])
    assert plain.shown("u1") is None and plain._answer_cursor == 0


def test_the_event_side_keeps_shown_items_only_when_rotation_is_on_or_allowed(
    artifact_dir: Path, tmp_path: Path
) -> None:
    from service.event_side import EventSide

    for settings, keeps in (
        ({}, False),
        ({"rules_rotation_rate": 0.3, "rules_rotation_half_life_seconds": 600}, True),
        ({"rules_rotation_allowed": True}, True),
    ):
        uri = f"sqlite:///{tmp_path / f'side-{len(settings)}-{keeps}.db'}"
        side = EventSide(settings_for(artifact_dir, tmp_path, events_uri=uri, **settings))
        try:
            assert side.open() is True and side.live is not None
            assert side.live.keeps_shown is keeps
            if settings.get("rules_rotation_half_life_seconds"):
                assert side.live.shown_keep_seconds == 4 * 600
        finally:
            side.close()


class _ScriptedAnswers:
    """A store whose tail of the recorded answers is scripted (PostgreSQL's id gaps)."""

    def __init__(self, answers: list[list[Shown]]) -> None:
        self.answers = answers
        self.asked: list[tuple[int, list[int]]] = []

    def activity(self, **_: Any) -> list[Any]:
        return []

    def erasures(self, since: Any = None) -> dict[str, datetime]:
        return {}

    def newest_row_id(self) -> int:
        return 0

    def newest_response_id(self) -> int:
        return 0

    def shown(self, *, after_id: int = 0, ids: Any = (), **_: Any) -> list[Shown]:
        self.asked.append((after_id, list(ids)))
        return self.answers.pop(0) if self.answers else []


def _shown_row(row_id: int, user: str | None = "u1", item: str = "i1") -> Shown:
    return Shown(row_id, user, (item,) if user else (), datetime.now(UTC))


def test_the_answer_tail_rereads_gaps_and_gives_them_up() -> None:
    scripted = _ScriptedAnswers(
        [[_shown_row(1), _shown_row(3, None)], [_shown_row(2, item="late")]]
    )
    live = LiveActivity(
        scripted,  # type: ignore[arg-type]
        poll_seconds=60,
        gap_seconds=60,
        shown_keep_seconds=DAY,
    )
    live.poll()
    live.poll()
    assert scripted.asked == [(0, []), (3, [2])]
    shown = live.shown("u1")
    assert shown is not None and sorted(shown[0]) == ["i1", "late"]
    scripted = _ScriptedAnswers([[_shown_row(1), _shown_row(3)]])
    live = LiveActivity(
        scripted,  # type: ignore[arg-type]
        poll_seconds=60,
        gap_seconds=0.0,
        shown_keep_seconds=DAY,
    )
    live.poll()
    live.poll()
    assert scripted.asked[-1] == (3, [])


def test_shown_items_are_capped_per_user_and_by_age() -> None:
    live = LiveActivity(
        _ScriptedAnswers([]),  # type: ignore[arg-type]
        shown_keep_seconds=100.0,
        max_shown_per_user=5,
    )
    now = time.time()
    live.showed("u1", [f"i{n}" for n in range(8)], now - 10)
    shown = live.shown("u1", now)
    assert shown is not None and shown[0] == ["i3", "i4", "i5", "i6", "i7"]
    live.showed("u1", ["i3"], now)  # shown again: its latest showing counts, it stays
    live.showed("u1", ["i8"], now)
    shown = live.shown("u1", now)
    assert shown is not None and shown[0] == ["i5", "i6", "i7", "i3", "i8"]
    assert shown[1].tolist() == [10.0, 10.0, 10.0, 0.0, 0.0]
    assert live.shown("u1", now + 95) is not None
    later = live.shown("u1", now + 95)
    assert later is not None and later[0] == ["i3", "i8"]  # the others are older than 100 s
    assert live.shown("u1", now + 200) is None
    live._sweep_shown(now + 200)
    assert live.shown_users == 0


# ------------------------------------------------------------------ recording
def test_recorded_answers_keep_reasons_and_the_exploration_seed_and_day(
    rules_pipeline: RankingPipeline, rules_artifact: Path, tmp_path: Path, store: EventStore
) -> None:
    with worker(rules_pipeline, rules_artifact, tmp_path, store) as (client, _, recorder):
        rules = {
            "promotion": {"categories": ["b"], "share": 0.2},
            "exploration": {"share": 0.2, "seed": 11},
        }
        answer = client.recommend("u08", k=10, rules=rules)
        plain = client.recommend("u08", k=10)
        boosted_list = client.popular(5, rules={"boosts": [{"categories": ["b"], "factor": 100}]})
        recorder.flush()
    saved = store.response(answer.recommendation_id)
    assert saved is not None
    codes = {"model": 0, "boosted": 1, "promoted": 2, "explored": 3}
    assert saved.reasons == tuple(codes[r] for r in reasons(answer))
    assert {2, 3} <= set(saved.reasons)
    assert saved.exploration_seed == 11
    assert saved.exploration_day == int(time.time() // DAY)
    untouched = store.response(plain.recommendation_id)
    assert untouched is not None and untouched.reasons is None
    assert untouched.exploration_seed is None and untouched.exploration_day is None
    boosted = store.response(boosted_list.recommendation_id)
    assert boosted is not None and boosted.reasons is not None and 1 in boosted.reasons
    assert boosted.exploration_seed is None


def test_migration_3_adds_the_reason_columns_to_a_version_2_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'v2.db'}"
    with monkeypatch.context() as patch:
        patch.setattr(events_module, "MIGRATIONS", events_module.MIGRATIONS[:2])
        patch.setattr(events_module, "LATEST_VERSION", 2)
        with EventStore.open(uri) as old, old.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO responses (recommendation_id, method, user_id, item_ids, "
                    "source, model_name, model_version, served_at) VALUES ('old', 'Recommend', "
                    "'u1', '[\"i1\"]', 'personalized', 'm', '1', '2026-01-01 00:00:00.000000')"
                )
            )
    with EventStore.open(uri) as store:
        assert store.schema_version() == events_module.LATEST_VERSION
        before = store.response("old")
        assert before is not None and before.item_ids == ("i1",) and before.reasons is None
        store.record_responses(
            [
                Response(
                    "new",
                    "Recommend",
                    "u1",
                    ("i1", "i2"),
                    "personalized",
                    "m",
                    "1",
                    datetime.now(UTC),
                    reasons=(0, 3),
                    exploration_seed=-5,
                    exploration_day=20_000,
                )
            ]
        )
        after = store.response("new")
        assert after is not None and after.reasons == (0, 3)
        assert (after.exploration_seed, after.exploration_day) == (-5, 20_000)


def test_many_answers_with_reasons_record_in_multi_row_inserts(store: EventStore) -> None:
    now = datetime.now(UTC)
    answers = [
        Response(
            f"m{n}",
            "Recommend",
            f"u{n % 7}",
            ("i1", "i2", "i3"),
            "personalized",
            "m",
            "1",
            now,
            reasons=(2, 0, 3) if n % 2 else None,
            exploration_seed=n if n % 2 else None,
            exploration_day=19_000 if n % 2 else None,
        )
        for n in range(250)
    ]
    assert store.record_responses(answers) == 250
    assert store.record_responses(answers[:10]) == 0  # stored once
    odd, even = store.response("m17"), store.response("m18")
    assert odd is not None and odd.reasons == (2, 0, 3) and odd.exploration_seed == 17
    assert even is not None and even.reasons is None and even.exploration_day is None


# ------------------------------------------------------------------ client and CLI
def test_the_client_takes_a_message_or_a_mapping(client: AffinityClient) -> None:
    from service.client import ranking_rules

    message = pb.RankingRules()
    message.diversity.max_per_category = 2
    assert client.recommend("u01", k=10, rules=message).item_ids == (
        client.recommend("u01", k=10, rules={"diversity": {"max_per_category": 2}}).item_ids
    )
    with pytest.raises(Exception, match="no field named"):
        ranking_rules({"diversity": {"cap": 2}})
    assert Item("i1", 1.0).reason == "model"


def test_recommend_command_takes_rule_options_and_prints_reasons(
    client: AffinityClient, capsys: pytest.CaptureFixture[str]
) -> None:
    from affinity.cli import main

    target = ["--target", client.target]
    argv = ["recommend", *target, "--user", "u01", "-k", "10", "--diversity-cap", "3"]
    argv += ["--mmr", "0.2", "--boost", "category=b:3", "--promote", "category=b:0.2"]
    argv += ["--explore", "0.1", "--explore-seed", "4"]
    assert main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["#", "item_id", "score", "item_type", "category", "reason"]
    assert {"promoted", "explored"} <= {row.split()[-1] for row in table[2:]}
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert max(sum(item["category"] == c for item in data["items"]) for c in ("a", "b")) <= 3
    # Similar and popular take the list rules; a bad option names itself.
    assert main(["popular", *target, "-k", "4", "--diversity-cap", "1", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["items"]) == 2
    assert main(["similar", "i03", *target, "--promote", "category=b:0.5"]) == 0
    assert "promoted" in capsys.readouterr().out
    assert main(["recommend", *target, "--user", "u01", "--boost", "nonsense"]) == 1
    assert "--boost" in capsys.readouterr().err
    assert main(["recommend", *target, "--user", "u01", "--mmr", "3"]) == 1
    assert "INVALID_ARGUMENT: rules.diversity.mmr" in capsys.readouterr().err


# ------------------------------------------------------------------ the cost benchmark
def test_the_cost_benchmark_runs(tmp_path: Path) -> None:
    """Smoke run of ``bench/rules.py`` on the tiny model: both servers answer, the rule mix
    changes the lists (reasons in them), and the report holds the ratio."""
    from bench import rules as bench_rules

    results = tmp_path / "results"
    argv = ["--size", "tiny", "--duration", "1", "--rounds", "1", "--concurrency", "1"]
    argv += ["--requests", "50", "--workdir", str(tmp_path), "--results", str(results)]
    assert bench_rules.main(argv) == 0
    report = json.loads((results / "rules-cost.json").read_text())
    assert report["command"].startswith("python -m bench.rules --size tiny")
    assert len(report["ratios"]) == 1 and all(r > 0 for r in report["ratios"].values())
    assert report["check"]["reasons"].get("REASON_BOOSTED", 0) > 0
    assert set(report["inprocess_us"]) >= {"no rules", "the mix (on)"}
    assert not list((tmp_path / "rules").glob("*.db*"))  # the stores are removed
