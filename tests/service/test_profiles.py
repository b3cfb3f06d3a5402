"""``GetUserProfile`` and ``affinity users show`` end to end: ``affinity segments`` writes the
segments, profile aggregates and cut points into a real event store (SQLite and PostgreSQL), a
real server merges them with the events logged since, and every number is checked against a
hand computation; a generated log is checked against an independent pandas computation.

Times are days before "today" (yesterday, UTC, so that every event lies in the past): ``at(k,
h)`` is hour ``h`` of the day ``k`` days before today; the segments are computed as of the end of
the day 10 days before today; profiles are computed at the end of today (``profiles.clock``).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from affinity.cli import main
from affinity.segments import run_segments
from models.lifecycle import cut_points, quantile_scores
from models.ranking import RankingPipeline
from protos.affinity.v1 import recommender_pb2 as pb
from protos.affinity.v1 import recommender_pb2_grpc as pb_grpc
from service import profiles
from service.client import AffinityClient, Event
from service.events import EventStore
from service.loader import ModelHolder
from tests.service.conftest import (
    N_ITEMS,
    client_for,
    cluster_of,
    loaded_model,
    running,
    settings_for,
    status_of,
)
from training.generate import generate

DAY = 86_400
TODAY = int(time.time() // DAY) - 1
NOW = (TODAY + 1) * DAY - 1
AS_OF = (TODAY - 9) * DAY - 1
ADMIN = "admin-token"


def at(k: int, hour: int = 9) -> int:
    return (TODAY - k) * DAY + hour * 3600


def when(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


LOG = [
    # user, item, event, time, value, price
    ("alice", "i00", "view", at(100), 1.0, ""),
    ("alice", "i01", "view", at(40), 1.0, ""),
    ("alice", "i02", "purchase", at(20), 2.0, 5.0),
    ("alice", "i21", "click", at(12), 1.0, ""),
    ("bob", "i05", "view", at(60), 1.0, ""),
    ("bob", "i06", "purchase", at(55), 1.0, ""),  # no price: the value is the amount
    ("carol", "i10", "view", at(90), 1.0, ""),
    ("erin", "i30", "purchase", at(10), 1.0, 20.0),
    ("gina", "i11", "view", at(30), 1.0, ""),
]
LIVE = [
    # event id, user, item, event, time, value, price
    ("a1", "alice", "i03", "view", at(5), None, None),
    ("a2", "alice", "i22", "purchase", at(1), 1.0, 3.0),
    ("a3", "alice", "i04", "dislike", at(1, 10), None, None),
    ("a4", "alice", "i31", "impression", at(1, 11), None, None),
    ("b1", "bob", "i07", "click", at(3), None, None),
    ("c1", "carol", "i13", "view", at(2), None, None),
    ("d1", "dave", "i08", "view", at(2), None, None),
    ("d2", "dave", "i09", "click", at(1, 10), None, None),
    ("f1", "frank", "i12", "purchase", at(2, 10), 2.0, 7.5),
    ("g1", "gina", "i14", "view", at(4), None, None),
]


def write_log(path: Path) -> Path:
    pd.DataFrame(
        [
            {
                "user_id": u,
                "item_id": i,
                "event": e,
                "timestamp": when(t).isoformat(),
                "value": v,
                "price": p,
            }
            for u, i, e, t, v, p in LOG
        ]
    ).to_csv(path, index=False)
    return path


def write_catalog(path: Path) -> Path:
    """The served model's catalog (tests/service/conftest.py) as a file."""
    ids = [f"i{i:02d}" for i in range(N_ITEMS)]
    pd.DataFrame(
        {
            "item_id": ids,
            "item_type": ["content" if i % 2 == 0 else "product" for i in range(N_ITEMS)],
            "category": [cluster_of(i) for i in ids],
        }
    ).to_csv(path, index=False)
    return path


@pytest.fixture(autouse=True)
def _today(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profiles, "clock", lambda: float(NOW))


@contextlib.contextmanager
def serving(
    events_db: str, tmp_path: Path, pipeline: RankingPipeline
) -> Iterator[tuple[AffinityClient, int]]:
    holder = ModelHolder()
    holder.swap(loaded_model(pipeline))
    settings = settings_for(tmp_path, tmp_path, admin_token=ADMIN)
    with (
        EventStore.open(events_db) as store,
        running(settings, holder, store=store) as port,
        client_for(port) as client,
    ):
        yield client, port


def log_live(client: AffinityClient, rows: list[tuple[Any, ...]] = LIVE) -> None:
    result = client.log_events(
        [
            Event(
                event_id=eid,
                user_id=u,
                item_id=i,
                event=e,
                timestamp=when(t),
                value=v,
                price=p,
            )
            for eid, u, i, e, t, v, p in rows
        ]
    )
    assert result.accepted == len(rows), result.outcomes


@pytest.fixture
def world(
    events_db: str, tmp_path: Path, pipeline: RankingPipeline
) -> Iterator[tuple[AffinityClient, int]]:
    """Segments of LOG (with the catalog) as of AS_OF, then a server and the LIVE events."""
    run_segments(
        interactions=[write_log(tmp_path / "log.csv")],
        store_uri=events_db,
        as_of=float(AS_OF),
        items=write_catalog(tmp_path / "items.csv"),
        mlflow_run=False,
    )
    with serving(events_db, tmp_path, pipeline) as (client, port):
        log_live(client)
        yield client, port


# --- hand-computed profiles -----------------------------------------------------------------


def test_a_stored_user_merges_the_events_since_the_computation(
    world: tuple[AffinityClient, int],
) -> None:
    client, _ = world
    p = client.user_profile("alice")
    assert p.segments_as_of == when(AS_OF)
    assert p.first_seen == when(at(100))
    assert p.last_seen == when(at(1, 10))  # the dislike; never the impression
    # Days kept: 40, 20 and 12 days ago (100 is past the computation's 90 days); live: 5 and 1.
    assert (p.active_days_7, p.active_days_30, p.active_days_90) == (2, 4, 5)
    assert p.event_counts == {"view": 3, "purchase": 2, "click": 1, "dislike": 1}
    assert list(p.event_counts) == ["view", "purchase", "click", "dislike"]
    assert p.orders == 2
    assert p.monetary == pytest.approx(2 * 5.0 + 1 * 3.0)
    # Six interactions (the dislike is not one): a = i00 i01 i02 i03, b = i21 i22;
    # content = i00 i02 i22, product = i01 i03 i21.
    assert p.top_categories == pytest.approx({"a": 4 / 6, "b": 2 / 6})
    assert list(p.top_categories) == ["a", "b"]
    assert p.item_types == pytest.approx({"content": 0.5, "product": 0.5})
    assert p.recent_item_ids == ["i22", "i03", "i21", "i02", "i01", "i00"]
    assert p.activated_at == when(at(20))
    # Activated as of the computation (first purchase 10.6 days before); the 14 days are over
    # and they were seen yesterday: active since the activated period ended.
    assert (p.stage, p.stage_since) == ("active", when(at(20) + 14 * DAY))
    # The stored scores: recency days at the computation alice 2, bob 45, carol 80, erin 0,
    # gina 20 (quintiles: R4); one order among 0,0,1,1,1 (F ceil(5 * 3.5 / 5) = 4); monetary 10
    # among 0,0,1,10,20 (M ceil(5 * 3.5 / 5) = 4).
    assert (p.recency_score, p.frequency_score, p.monetary_score, p.tier) == (4, 4, 4, "champions")
    assert p.live_events == 3  # the impression is not counted


def test_returning_users_change_stage(world: tuple[AffinityClient, int]) -> None:
    client, _ = world
    bob = client.user_profile("bob")
    # at_risk as of the computation (last seen 45 days before), clicked 3 days ago: active,
    # since that click (at_risk is not dormant, so not a reactivation).
    assert (bob.stage, bob.stage_since) == ("active", when(at(3)))
    assert bob.monetary == pytest.approx(1.0) and bob.orders == 1
    carol = client.user_profile("carol")
    # dormant (80 days) and back 2 days ago: reactivated since.
    assert (carol.stage, carol.stage_since) == ("reactivated", when(at(2)))
    # The view 90 days ago is stored but outside today's 90 days (today and the 89 before).
    assert (carol.active_days_7, carol.active_days_30, carol.active_days_90) == (1, 1, 1)


def test_a_stored_user_without_new_events_keeps_the_stored_stage(
    world: tuple[AffinityClient, int],
) -> None:
    client, _ = world
    erin = client.user_profile("erin")
    # Bought on the computation's day (activated since), still within 14 days at the end of today.
    assert (erin.stage, erin.stage_since) == ("activated", when(at(10)))
    assert erin.live_events == 0 and erin.monetary == pytest.approx(20.0)
    assert (erin.active_days_7, erin.active_days_30, erin.active_days_90) == (0, 1, 1)
    assert (erin.recency_score, erin.frequency_score, erin.monetary_score) == (5, 4, 5)


def test_a_brand_new_user_is_scored_against_the_stored_cut_points(
    world: tuple[AffinityClient, int],
) -> None:
    client, _ = world
    dave = client.user_profile("dave")
    assert dave.segments_as_of is None
    assert (dave.stage, dave.stage_since) == ("new", when(at(2)))
    assert dave.first_seen == when(at(2)) and dave.last_seen == when(at(1, 10))
    assert dave.event_counts == {"click": 1, "view": 1}
    assert (dave.active_days_7, dave.active_days_30, dave.active_days_90) == (2, 2, 2)
    assert dave.top_categories == {"a": 1.0}
    assert dave.item_types == {"content": 0.5, "product": 0.5}
    assert dave.recent_item_ids == ["i09", "i08"]
    # Recency 1 day: 4 of the 5 stored users are further (ceil(5 * 4 / 5) = 4); no order and
    # no money tie with carol and gina (ceil(5 * 1 / 5) = 1): R4 F1 M1, new_customers.
    assert (dave.recency_score, dave.frequency_score, dave.monetary_score) == (4, 1, 1)
    assert dave.tier == "new_customers"
    frank = client.user_profile("frank")
    assert (frank.stage, frank.stage_since) == ("activated", when(at(2, 10)))
    assert frank.activated_at == when(at(2, 10))
    assert frank.monetary == pytest.approx(15.0) and frank.orders == 1
    # Recency 2 days ties alice (ceil(5 * 3.5 / 5) = 4); one order ties alice, bob and erin
    # (4); 15 lies above 0, 0, 1, 10 (ceil(5 * 4 / 5) = 4): champions.
    assert (frank.recency_score, frank.frequency_score, frank.monetary_score) == (4, 4, 4)
    assert frank.tier == "champions"


def test_unknown_bad_and_erased_users(world: tuple[AffinityClient, int]) -> None:
    client, _ = world
    assert status_of(lambda: client.user_profile("nobody")) == grpc.StatusCode.NOT_FOUND
    for bad in ("", "x" * 257, "a\x00b", "   "):
        with pytest.raises(grpc.RpcError) as info:
            client.user_profile(bad)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "user_id" in str(info.value.details())  # type: ignore[attr-defined]
    assert status_of(lambda: client.user_profile("x" * 256)) == grpc.StatusCode.NOT_FOUND
    gina = client.user_profile("gina")
    assert gina.event_counts == {"view": 2}
    client.delete_user("gina", admin_token=ADMIN)
    assert status_of(lambda: client.user_profile("gina")) == grpc.StatusCode.NOT_FOUND
    # Events after the erasure start a new profile, without anything from before.
    log_live(client, [("g2", "gina", "i15", "view", time.time() + 2, None, None)])
    again = client.user_profile("gina")
    assert again.event_counts == {"view": 1} and again.segments_as_of is None


def test_a_user_with_only_impressions_has_no_profile(world: tuple[AffinityClient, int]) -> None:
    client, _ = world
    log_live(client, [("h1", "hank", "i01", "impression", at(1), None, None)])
    assert status_of(lambda: client.user_profile("hank")) == grpc.StatusCode.NOT_FOUND


def test_without_a_catalog_the_served_models_catalog_maps_the_items(
    events_db: str, tmp_path: Path, pipeline: RankingPipeline
) -> None:
    run_segments(
        interactions=[write_log(tmp_path / "log.csv")],
        store_uri=events_db,
        as_of=float(AS_OF),
        mlflow_run=False,
    )
    with serving(events_db, tmp_path, pipeline) as (client, _):
        log_live(client)
        p = client.user_profile("alice")
    assert p.top_categories == pytest.approx({"a": 4 / 6, "b": 2 / 6})
    assert p.item_types == pytest.approx({"content": 0.5, "product": 0.5})


def test_the_cli_shows_a_profile(
    world: tuple[AffinityClient, int], capsys: pytest.CaptureFixture[str]
) -> None:
    _, port = world
    target = ["--target", f"127.0.0.1:{port}"]
    assert main(["users", "show", "alice", *target, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["stage"] == "active" and shown["orders"] == 2
    assert shown["event_counts"] == {"view": 3, "purchase": 2, "click": 1, "dislike": 1}
    assert shown["first_seen"] == when(at(100)).isoformat()
    assert main(["users", "show", "alice", *target]) == 0
    text = capsys.readouterr().out
    assert "stage           active since" in text
    assert "active days     2 of 7, 4 of 30, 5 of 90" in text
    assert "categories      a 67%, b 33%" in text
    assert "tier            champions  (R4 F4 M4)" in text
    assert main(["users", "show", "nobody", *target]) != 0
    assert "NOT_FOUND" in capsys.readouterr().err


# --- a generated log against pandas ---------------------------------------------------------


def test_generated_log_profiles_match_pandas(
    events_db: str, tmp_path: Path, pipeline: RankingPipeline
) -> None:
    gen = generate(tmp_path / "gen", users=120, items=60, interactions=4_000, seed=11)
    run_segments(
        interactions=[gen.interactions_path],
        store_uri=events_db,
        items=gen.items_path,
        mlflow_run=False,
    )
    log = pd.read_parquet(gen.interactions_path)
    log = log.astype({"event": str, "user_id": str, "item_id": str})
    log = log[log["event"] != "impression"]
    catalog = pd.read_parquet(gen.items_path).set_index("item_id")
    users = sorted(log["user_id"].unique())[:: max(1, len(log["user_id"].unique()) // 12)]
    with serving(events_db, tmp_path, pipeline) as (client, _):
        for user in users:
            rows = log[log["user_id"] == user]
            p = client.user_profile(user)
            assert p.event_counts == rows["event"].value_counts().to_dict(), user
            buys = rows[rows["event"] == "purchase"]
            assert p.orders == buys["timestamp"].nunique()
            assert p.monetary == pytest.approx(float(buys["value"].sum()))
            taste = rows[rows["event"] != "dislike"]
            shares = (
                catalog.loc[taste["item_id"], "category"].value_counts() / len(taste)
            ).to_dict()
            top = dict(sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))[:10])
            assert p.top_categories == pytest.approx(top)
            assert p.first_seen == rows["timestamp"].min().to_pydatetime()
            assert p.live_events == 0
        # One more view: counted, and today is an active day.
        user = users[0]
        before = client.user_profile(user)
        log_live(client, [("gen-1", user, "i00001", "view", at(0), None, None)])
        after = client.user_profile(user)
        assert after.event_counts.get("view", 0) == before.event_counts.get("view", 0) + 1
        assert after.active_days_7 == 1 and after.live_events == 1
        assert after.recent_item_ids[0] == "i00001"


# --- cut points -----------------------------------------------------------------------------


@given(st.lists(st.integers(0, 12), min_size=1, max_size=60))
@settings(max_examples=200, deadline=None)
def test_cut_points_score_every_member_as_the_population_does(values: list[int]) -> None:
    cuts = cut_points(values)
    assert [cuts.score(v) for v in values] == quantile_scores(values).tolist()
    n = len(values)
    for x in np.arange(-1.5, 14.0, 0.5):  # values no member has score by the share below
        if x not in values:
            below = sum(v < x for v in values)
            assert cuts.score(x) == max(1, math.ceil(5 * below / n))


# --- fuzzing --------------------------------------------------------------------------------

odd_text = st.text(st.characters(codec="utf-8"), max_size=40)
huge_text = st.builds(lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(200, 5_000))
user_ids = st.one_of(
    st.sampled_from(["alice", "dave", "nobody", ""]), odd_text, huge_text, st.binary(max_size=64)
)


@pytest.mark.parametrize("events_db", ["sqlite"], indirect=True)
def test_fuzzed_user_ids_never_fail_inside(
    events_db: str, tmp_path: Path, pipeline: RankingPipeline
) -> None:
    run_segments(
        interactions=[write_log(tmp_path / "log.csv")],
        store_uri=events_db,
        as_of=float(AS_OF),
        mlflow_run=False,
    )
    with (
        serving(events_db, tmp_path, pipeline) as (client, port),
        grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        log_live(client)
        stub = pb_grpc.RecommenderStub(channel)
        raw = channel.unary_unary("/affinity.v1.Recommender/GetUserProfile")  # type: ignore[call-arg]

        @given(user_ids)
        @settings(
            max_examples=150,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        def one(user_id: str | bytes) -> None:
            try:
                if isinstance(user_id, bytes):
                    raw(user_id, timeout=10)  # the bytes on the wire as they are
                else:
                    stub.GetUserProfile(pb.GetUserProfileRequest(user_id=user_id), timeout=10)
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), exc

        one()
        assert client.user_profile("alice").orders == 2  # still answering
