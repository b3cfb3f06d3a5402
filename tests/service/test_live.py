"""The loop closed: events change a user's next list, dislikes push items down, answers are
recorded, and ``DeleteUser`` erases a user, over real gRPC and a real event store (SQLite, and
PostgreSQL when ``AFFINITY_TEST_POSTGRES_URI`` is set)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from models.artifact import load_artifact
from models.ranking import DislikeStage, ListKind, ListRequest, RankingPipeline
from service.client import AffinityClient
from service.events import Activity, Event, EventStore
from service.live import LiveActivity
from service.loader import ModelHolder
from service.recorder import ResponseRecorder
from tests.service.conftest import client_for, loaded_model, running, settings_for, status_of

ADMIN = "admin-secret"
READ = "read-secret"


def _now() -> datetime:
    return datetime.now(UTC)


def _event(event_id: str, user: str, item: str, name: str = "like", **kw: Any) -> Event:
    return Event(event_id=event_id, user_id=user, item_id=item, event=name, **kw)


def _wait_for(check: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until ``check()`` held (fails the test after ``timeout``)."""
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.01)
    return time.perf_counter() - start


# ----------------------------------------------------------------- the pipeline's dislikes
@pytest.fixture(scope="module")
def disliking(artifact_dir: Path) -> RankingPipeline:
    return RankingPipeline.from_bundle(load_artifact(artifact_dir), dislike_weight=1.0)


def test_a_disliked_item_never_returns_even_with_include_seen(
    disliking: RankingPipeline,
) -> None:
    top = disliking.recommend("u00", 10).item_ids[0]
    for include_seen in (False, True):
        got = disliking.recommend(
            "u00", 10, disliked_item_ids=[top], include_seen=include_seen
        ).item_ids
        assert top not in got
        assert len(got) == 10


def test_dislike_pushes_the_nearest_neighbours_down(
    pipeline: RankingPipeline, disliking: RankingPipeline
) -> None:
    base = pipeline.recommend("u00", 20).item_ids
    disliked = base[0]
    neighbour = next(i for i in pipeline.similar_items([disliked], 5).item_ids if i in base[1:])
    plain = pipeline.recommend("u00", 20, disliked_item_ids=[disliked]).item_ids
    pushed = disliking.recommend("u00", 20, disliked_item_ids=[disliked]).item_ids
    assert disliked not in plain and disliked not in pushed
    # Without the stage only the item goes; with it its neighbour falls (or leaves the list).
    position = pushed.index(neighbour) if neighbour in pushed else len(pushed)
    assert position > plain.index(neighbour)


def test_requests_without_dislikes_pay_nothing_and_match(
    pipeline: RankingPipeline, disliking: RankingPipeline
) -> None:
    for user in ("u00", "u31", "nobody"):
        a = pipeline.recommend(user, 10, recent_item_ids=["i03"])
        b = disliking.recommend(user, 10, recent_item_ids=["i03"])
        assert a.item_ids == b.item_ids and a.scores == b.scores
    request = ListRequest(ListKind.USER, 10, user=0)
    assert disliking._stages_for(request) == ()
    users = np.arange(10)
    assert np.array_equal(pipeline.rank_users(users, 10), disliking.rank_users(users, 10))


def test_dislike_stage_refuses_a_negative_weight() -> None:
    with pytest.raises(ValueError, match="weight"):
        DislikeStage(lambda ids, q: np.zeros(len(ids)), weight=-1)


def test_max_similarity_is_one_for_an_item_itself(pipeline: RankingPipeline) -> None:
    sims = pipeline.max_similarity(np.array([3, 25]), np.array([3]))
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    assert sims[1] < sims[0]


# -------------------------------------------------------------------- the live view
@pytest.fixture
def store(events_db: str) -> Iterator[EventStore]:
    with EventStore.open(events_db) as opened:
        yield opened


def test_live_view_bootstraps_tails_and_forgets(store: EventStore) -> None:
    store.append([_event("e1", "u01", "i01"), _event("e2", "u01", "i02", "dislike")])
    store.append([_event("old", "u02", "i05")], now=_now() - timedelta(days=30))
    live = LiveActivity(store, poll_seconds=60)
    live.bootstrap()
    u01 = live.get("u01")
    assert u01 is not None
    assert [item for _, item, _ in u01.positives] == ["i01"]
    assert u01.disliked_items() == ["i02"]
    assert live.get("u02") is None  # received before the window
    # Another worker stores more: the next poll brings it, once, even if applied locally too.
    store.append([_event("e3", "u01", "i03", "purchase"), _event("e4", "u03", "i04", "view")])
    live.apply([("e3", "u01", "i03", "purchase", _now())])
    assert live.poll() == 2
    u01 = live.get("u01")
    assert u01 is not None
    assert sorted(item for _, item, _ in u01.positives) == ["i01", "i03"]
    assert live.get("u03") is not None
    impression = _event("e5", "u04", "i04", "impression", shown_item_ids=("i04",))
    store.append([impression])
    live.poll()
    assert live.get("u04") is None  # impressions say nothing about taste
    erasure = store.delete_user("u01")
    live.poll()
    forgotten = live.get("u01")
    assert forgotten is not None and forgotten.erased_at == erasure.erased_at
    assert forgotten.positives == () and forgotten.dislikes == ()
    # A new worker starts knowing the erasure.
    fresh = LiveActivity(store, poll_seconds=60)
    fresh.bootstrap()
    known = fresh.get("u01")
    assert known is not None and known.erased_at is not None


class _ScriptedStore:
    """A store whose tail answers are scripted, to show the gap handling of PostgreSQL ids."""

    def __init__(self, answers: list[list[Activity]]) -> None:
        self.answers = answers
        self.asked: list[tuple[int, list[int]]] = []

    def activity(self, *, after_id: int = 0, ids: Any = (), **_: Any) -> list[Activity]:
        self.asked.append((after_id, list(ids)))
        return self.answers.pop(0) if self.answers else []

    def erasures(self, since: Any = None) -> dict[str, datetime]:
        return {}

    def newest_row_id(self) -> int:
        return 0


def _row(row_id: int, user: str = "u1", item: str = "i1") -> Activity:
    now = _now()
    return Activity(row_id, f"e{row_id}", user, item, "click", now, now)


def test_live_view_rereads_gaps_left_by_transactions_still_committing() -> None:
    # Row 2 is committed after rows 1 and 3 were read: the next poll asks for it by id.
    scripted = _ScriptedStore([[_row(1), _row(3)], [_row(2, item="late")]])
    live = LiveActivity(scripted, poll_seconds=60, gap_seconds=60)  # type: ignore[arg-type]
    live.poll()
    live.poll()
    assert scripted.asked == [(0, []), (3, [2])]
    activity = live.get("u1")
    assert activity is not None and "late" in activity.items_after(_now() - timedelta(days=1))
    # A gap that never fills (an id burnt by a duplicate) is given up after gap_seconds.
    scripted = _ScriptedStore([[_row(1), _row(3)]])
    live = LiveActivity(scripted, poll_seconds=60, gap_seconds=0.0)  # type: ignore[arg-type]
    live.poll()
    live.poll()
    assert scripted.asked[-1] == (3, [])


# ---------------------------------------------------------------------- the recorder
def _dropped() -> float:
    return REGISTRY.get_sample_value("affinity_responses_dropped_total") or 0.0


def test_recorder_stores_answers_counts_drops_and_keeps_a_failed_batch(
    store: EventStore, tmp_path: Path
) -> None:
    recorder = ResponseRecorder(store, capacity=3)
    before = _dropped()
    for n in range(5):
        recorder.record(f"r{n}", "Recommend", "u1", ["i1", "i2"], "personalized", "m", "1")
    assert recorder.dropped == 2 and _dropped() == before + 2
    assert recorder.flush() == 3
    saved = store.response("r0")
    assert saved is not None
    assert saved.item_ids == ("i1", "i2") and saved.user_id == "u1" and saved.model_version == "1"
    assert [r.recommendation_id for r in store.responses_for_user("u1")] == ["r2", "r1", "r0"]
    # The store fails: the batch stays buffered, in order, for the retry.
    broken = EventStore.open(f"sqlite:///{tmp_path / 'gone' / 'events.db'}")
    recorder = ResponseRecorder(broken, capacity=10)
    recorder.record("x1", "Popular", None, ["i1"], "popular", "m", "1")
    broken.close()
    (tmp_path / "gone" / "events.db").unlink()
    (tmp_path / "gone").rmdir()
    with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises, wrapped or not
        recorder.flush()
    assert recorder.pending == 1


# ------------------------------------------------------------- over gRPC, two workers
@contextlib.contextmanager
def _worker(
    artifact_dir: Path,
    tmp_path: Path,
    pipeline: RankingPipeline,
    store: EventStore,
    **settings: Any,
) -> Iterator[tuple[int, LiveActivity, ResponseRecorder]]:
    """One server "worker" with its own live view and recorder over the shared store."""
    holder = ModelHolder()
    holder.swap(loaded_model(pipeline, version="3"))
    live = LiveActivity(store, poll_seconds=0.05)
    live.start()
    recorder = ResponseRecorder(store, interval=0.05)
    recorder.start()
    try:
        with running(
            settings_for(artifact_dir, tmp_path, **settings),
            holder,
            store=store,
            live=live,
            recorder=recorder,
        ) as port:
            yield port, live, recorder
    finally:
        recorder.stop()
        live.stop()


def test_events_change_the_next_list_on_every_worker(
    artifact_dir: Path, tmp_path: Path, disliking: RankingPipeline, store: EventStore
) -> None:
    with (
        _worker(artifact_dir, tmp_path / "a", disliking, store) as (port_a, _, _),
        _worker(artifact_dir, tmp_path / "b", disliking, store) as (port_b, _, recorder_b),
        client_for(port_a) as a,
        client_for(port_b) as b,
    ):
        before = b.recommend("u05", k=10)
        liked = before.item_ids[0]
        assert (
            a.log_events(
                [{"event_id": "l1", "user_id": "u05", "item_id": liked, "event": "like"}]
            ).accepted
            == 1
        )
        # The worker that stored it reflects it at once; the other one within its poll.
        assert liked not in a.recommend("u05", k=10).item_ids
        waited = _wait_for(lambda: liked not in b.recommend("u05", k=10).item_ids, timeout=2)
        assert waited < 1.0
        # A user the model never saw is personalized from their events alone.
        assert b.recommend("stranger", k=5).source == "popular"
        a.log_events(
            [{"event_id": "s1", "user_id": "stranger", "item_id": "i22", "event": "purchase"}]
        )
        _wait_for(lambda: b.recommend("stranger", k=5).source == "fold_in", timeout=2)
        # "Not interested": gone from that user's lists at once.
        second = a.recommend("u05", k=10).item_ids[0]
        a.log_events([{"event_id": "d1", "user_id": "u05", "item_id": second, "event": "dislike"}])
        assert second not in a.recommend("u05", k=10, include_seen=True).item_ids
        # Every answer is recorded with its id, user, items and model version.
        answer = b.recommend("u07", k=4)
        recorder_b.flush()
        saved = store.response(answer.recommendation_id)
        assert saved is not None
        assert saved.user_id == "u07" and list(saved.item_ids) == answer.item_ids
        assert saved.method == "Recommend" and saved.model_version == "3"


def test_delete_user_needs_the_admin_token_and_erases_everywhere(
    artifact_dir: Path, tmp_path: Path, pipeline: RankingPipeline, store: EventStore
) -> None:
    tokens = {"token": READ, "admin_token": ADMIN}
    with (
        _worker(artifact_dir, tmp_path / "a", pipeline, store, **tokens) as (port_a, _, _),
        _worker(artifact_dir, tmp_path / "b", pipeline, store, **tokens) as (port_b, _, _),
        client_for(port_a, token=READ) as a,
        client_for(port_b, token=READ) as b,
    ):
        a.log_events([{"event_id": "x1", "user_id": "u10", "item_id": "i01", "event": "click"}])
        assert b.recommend("u10", k=5).source == "personalized"
        assert status_of(lambda: a.delete_user("u10")) == grpc.StatusCode.PERMISSION_DENIED
        assert (
            status_of(lambda: a.delete_user("u10", admin_token="wrong"))
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert (
            status_of(lambda: a.delete_user("", admin_token=ADMIN))
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        result = a.delete_user("u10", admin_token=ADMIN)
        assert result.events_deleted == 1 and result.responses_deleted >= 1
        assert store.events_for_user("u10") == [] and store.responses_for_user("u10") == []
        # The model still holds u10's row, but no worker uses it any more.
        assert a.recommend("u10", k=5).source == "popular"
        _wait_for(lambda: b.recommend("u10", k=5).source == "popular", timeout=2)
        # The admin token also reads.
        with AffinityClient(f"127.0.0.1:{port_a}", token=ADMIN) as admin:
            assert admin.recommend("u11", k=3).source == "personalized"


def test_delete_user_is_refused_when_no_admin_token_is_configured(
    artifact_dir: Path, tmp_path: Path, pipeline: RankingPipeline, store: EventStore
) -> None:
    with (
        _worker(artifact_dir, tmp_path, pipeline, store) as (port, _, _),
        client_for(port) as client,
    ):
        code = status_of(lambda: client.delete_user("u01", admin_token="anything"))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert client.recommend("u01", k=3).source == "personalized"


def test_configured_extra_event_names_are_accepted_and_fold_in(tmp_path: Path) -> None:
    from service.config import load_settings
    from service.event_side import open_event_store

    settings = load_settings(
        model_uri=str(tmp_path),
        events_uri=f"sqlite:///{tmp_path / 'events.db'}",
        extra_events="Wishlist, rate",
        max_future_skew_seconds=0,
    )
    with open_event_store(settings) as store:
        outcomes = store.append(
            [
                _event("w1", "u1", "i1", "wishlist"),
                _event("w2", "u1", "i2", "unknown_name"),
                _event("w3", "u1", "i3", "rate", timestamp=_now() + timedelta(seconds=30)),
            ]
        )
        assert [o.status.value for o in outcomes] == ["accepted", "rejected", "rejected"]
        assert outcomes[1].field == "event" and outcomes[2].field == "timestamp"
        live = LiveActivity(store)
        live.bootstrap()
        activity = live.get("u1")
        assert activity is not None and activity.items_after(_now() - timedelta(hours=1)) == ["i1"]


def test_users_delete_and_events_report_from_the_command_line(
    artifact_dir: Path,
    tmp_path: Path,
    pipeline: RankingPipeline,
    store: EventStore,
    events_db: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from affinity.cli import main

    with (
        _worker(artifact_dir, tmp_path, pipeline, store, admin_token=ADMIN) as (port, _, recorder),
        client_for(port) as client,
    ):
        answer = client.recommend("u12", k=3)
        client.log_events(
            [
                {
                    "event_id": "c1",
                    "user_id": "u12",
                    "item_id": answer.item_ids[0],
                    "event": "click",
                    "recommendation_id": answer.recommendation_id,
                },
                {
                    "event_id": "c2",
                    "user_id": "u12",
                    "item_id": answer.item_ids[0],
                    "event": "purchase",
                    "price": 12.5,
                    "recommendation_id": answer.recommendation_id,
                },
            ]
        )
        recorder.flush()
        assert main(["events", "report", "--events-uri", events_db, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        (version,) = [v for v in report["versions"] if v["method"] == "Recommend"]
        assert version["answers_engaged"] == 1 and version["revenue"] == pytest.approx(12.5)
        target = ["--target", f"127.0.0.1:{port}"]
        assert main(["users", "delete", "--user-id", "u12", "--admin-token", "nope", *target]) == 1
        capsys.readouterr()
        assert main(["users", "delete", "--user-id", "u12", "--admin-token", ADMIN, *target]) == 0
        out = capsys.readouterr().out
        assert "2 events" in out and "u12" in out
        assert store.events_for_user("u12") == [] and store.responses_for_user("u12") == []


# ------------------------------------------------------------- this worker's own events
def _stored(store: EventStore, events: list[Event]) -> list[Activity]:
    rows: list[Activity | None] = []
    store.append(events, stored=rows)
    return [row for row in rows if row is not None]


def _kept(live: LiveActivity, user: str) -> list[str]:
    activity = live.get(user)
    assert activity is not None
    return [event_id for _, _, event_id in (*activity.positives, *activity.dislikes)]


def test_own_events_are_applied_once_and_not_read_back(store: EventStore) -> None:
    live = LiveActivity(store, poll_seconds=60)
    live.bootstrap()
    mine = [_event("o1", "u1", "i1"), _event("o2", "u1", "i2", "dislike")]
    live.applied(_stored(store, [*mine, _event("o3", "u2", "i3", "impression")]))
    assert _kept(live, "u1") == ["o1", "o2"]
    assert live.poll() == 0  # the tail skips this worker's rows: it reads nothing
    # Another worker's row between two of ours: read; ours after it skipped.
    store.append([_event("x1", "u1", "i4")])
    live.applied(_stored(store, [_event("o4", "u1", "i5")]))
    live.poll()
    assert sorted(_kept(live, "u1")) == ["o1", "o2", "o4", "x1"]
    assert live.poll() == 0
    # Read by the tail before this worker applied it (the two race): kept once.
    late = _stored(store, [_event("o5", "u1", "i6")])
    assert live.poll() == 1
    live.applied(late)
    assert sorted(_kept(live, "u1")) == ["o1", "o2", "o4", "o5", "x1"]
    assert live._cursor == store.newest_row_id()


def test_a_busy_user_keeps_the_newest_events_once_each_in_time_order(store: EventStore) -> None:
    live = LiveActivity(store, poll_seconds=60, max_per_user=50)
    base = _now() - timedelta(hours=1)
    events = [(f"b{i}", "u1", f"i{i}", "click", base + timedelta(seconds=i)) for i in range(120)]
    live.apply(events)
    live.apply(events[60:])  # again: kept once
    live.apply([("mid", "u1", "m", "click", base + timedelta(seconds=100.5))])  # out of order
    live.apply([("old", "u1", "o", "click", base - timedelta(hours=1))])  # older than all kept
    activity = live.get("u1")
    assert activity is not None and live.get("u1") is activity  # one copy until a change
    kept = [event_id for _, _, event_id in activity.positives]
    assert kept == [*(f"b{i}" for i in range(71, 101)), "mid", *(f"b{i}" for i in range(101, 120))]
    times = [ts for ts, _, _ in activity.positives]
    assert times == sorted(times)
    # An event that fell off the end is not remembered: a later copy of it is kept again.
    live.apply([("b0", "u1", "i0", "click", base + timedelta(hours=1))])
    changed = live.get("u1")
    assert changed is not activity and changed is not None
    assert [event_id for _, _, event_id in changed.positives][-1] == "b0"
    assert len(changed.positives) == 50


def test_events_logged_on_a_worker_are_in_its_view_at_once_and_once(
    artifact_dir: Path, tmp_path: Path, pipeline: RankingPipeline, store: EventStore
) -> None:
    with (
        _worker(artifact_dir, tmp_path, pipeline, store) as (port, live, _),
        client_for(port) as client,
    ):
        batch = [
            {"event_id": f"w{i}", "user_id": "u07", "item_id": f"i{i % 40:02d}", "event": "view"}
            for i in range(40)
        ]
        assert client.log_events(batch).accepted == 40
        assert sorted(_kept(live, "u07")) == sorted(f"w{i}" for i in range(40))
        polls = live.polls
        _wait_for(lambda: live.polls >= polls + 2)
        assert len(_kept(live, "u07")) == 40
        assert live._cursor == store.newest_row_id()


def test_a_worker_serves_while_its_event_store_is_unreachable_and_attaches_it_later(
    artifact_dir: Path, tmp_path: Path, pipeline: RankingPipeline
) -> None:
    import service.event_side as event_side
    from service.event_side import EventSide
    from service.server import create_server

    blocker = tmp_path / "not-yet"
    blocker.write_text("a file where the store's folder should be")
    settings = settings_for(artifact_dir, tmp_path, events_uri=f"sqlite:///{blocker / 'events.db'}")
    holder = ModelHolder()
    holder.swap(loaded_model(pipeline))
    side = EventSide(settings)
    original = event_side.RETRY_SECONDS
    event_side.RETRY_SECONDS = (0.05,)
    server, port = create_server(settings, holder, on_servicer=side.bind)
    try:
        assert side.open() is False  # unreachable now: retried in the background
        server.start()
        with client_for(port) as client:
            assert client.recommend("u01", k=3).source == "personalized"
            code = status_of(lambda: client.log_events([_event_dict("q1")]))
            assert code == grpc.StatusCode.UNAVAILABLE
            blocker.unlink()  # the database becomes reachable
            _wait_for(lambda: side.store is not None, timeout=5)
            assert client.log_events([_event_dict("q1")]).accepted == 1
            assert side.live is not None and side.recorder is not None
    finally:
        event_side.RETRY_SECONDS = original
        server.stop(None).wait()
        side.close()


def test_a_store_setting_that_can_never_work_still_fails_start_up(
    artifact_dir: Path, tmp_path: Path
) -> None:
    from models.errors import StoreError
    from service.event_side import EventSide

    side = EventSide(settings_for(artifact_dir, tmp_path, events_uri="sqlite:///:memory:"))
    with pytest.raises(StoreError, match="invalid setting events_uri"):
        side.open()
    side.close()


def _event_dict(event_id: str) -> dict[str, str]:
    return {"event_id": event_id, "user_id": "u01", "item_id": "i01", "event": "click"}
