"""``LogEvents`` over a real channel into a real event store (SQLite, and PostgreSQL when
``AFFINITY_TEST_POSTGRES_URI`` is set): outcomes, limits, store failures, group commit, auth and
``affinity events log``."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from affinity.cli import main
from models.errors import InvalidInputError, StoreError
from models.ranking import RankingPipeline
from protos.affinity.v1 import recommender_pb2 as pb
from protos.affinity.v1 import recommender_pb2_grpc as pb_grpc
from service.client import AffinityClient, Event
from service.config import ServeSettings, load_settings
from service.event_side import open_event_store
from service.events import Event as StoredEvent
from service.events import EventStore, GroupCommit, Outcome, RawEvent, Status
from service.loader import ModelHolder
from service.servicer import event_from_proto, outcomes_to_proto
from tests.service.conftest import client_for, loaded_model, running, settings_for, status_of

MAX_EVENTS = 50
TOKEN = "events-token"


@pytest.fixture
def store(events_db: str) -> Iterator[EventStore]:
    with EventStore.open(events_db) as opened:
        yield opened


@pytest.fixture
def holder(pipeline: RankingPipeline) -> ModelHolder:
    held = ModelHolder()
    held.swap(loaded_model(pipeline))
    return held


def _settings(artifact_dir: Path, tmp_path: Path, **overrides: Any) -> ServeSettings:
    return settings_for(artifact_dir, tmp_path, max_events=MAX_EVENTS, **overrides)


@pytest.fixture
def port(
    artifact_dir: Path, tmp_path: Path, holder: ModelHolder, store: EventStore
) -> Iterator[int]:
    with running(_settings(artifact_dir, tmp_path), holder, store=store) as bound:
        yield bound


@pytest.fixture
def client(port: int) -> Iterator[AffinityClient]:
    with client_for(port) as c:
        yield c


def click(event_id: str, user: str = "u01", item: str = "i01", **fields: Any) -> dict[str, Any]:
    return {"event_id": event_id, "user_id": user, "item_id": item, "event": "click", **fields}


def stored_ids(store: EventStore, user: str = "u01") -> list[str]:
    return [ev.event_id for ev in store.events_for_user(user, limit=100_000)]


# --- outcomes -------------------------------------------------------------------------------


def test_outcomes_in_request_order_with_counts(client: AffinityClient, store: EventStore) -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    result = client.log_events(
        [
            click("a1", timestamp=at),
            Event("a2", "u01", "i02", "purchase", timestamp=at, value=2.0, price=9.5),
            click("a1", item="i09"),  # the same id again: stored once
            {**click("a3"), "event": "teleport"},
            Event("a4", "u01", "i04", "impression", shown_item_ids=["i04", "i05"]),
        ]
    )
    assert [(o.event_id, o.status) for o in result.outcomes] == [
        ("a1", "accepted"),
        ("a2", "accepted"),
        ("a1", "duplicate"),
        ("a3", "rejected"),
        ("a4", "accepted"),
    ]
    assert (result.accepted, result.duplicates, result.rejected) == (3, 1, 1)
    bad = result.outcomes[3]
    assert bad.field == "event" and bad.reason.startswith("event: unknown event 'teleport'")
    assert sorted(stored_ids(store)) == ["a1", "a2", "a4"]
    purchase = next(ev for ev in store.events_for_user("u01") if ev.event_id == "a2")
    assert (purchase.timestamp, purchase.value, purchase.price) == (at, 2.0, 9.5)
    shown = next(ev for ev in store.events_for_user("u01") if ev.event_id == "a4")
    assert shown.shown_item_ids == ("i04", "i05")
    # Unset value is 1 and an unset timestamp is the server's time.
    first = next(ev for ev in store.events_for_user("u01") if ev.event_id == "a1")
    assert first.value == 1.0 and first.item_id == "i01"


def test_a_resent_batch_is_all_duplicates_and_stored_once(
    client: AffinityClient, store: EventStore
) -> None:
    batch = [click(f"r{i}", item=f"i{i:02d}") for i in range(10)]
    assert client.log_events(batch).accepted == 10
    again = client.log_events(batch)
    assert (again.accepted, again.duplicates, again.rejected) == (0, 10, 0)
    assert {o.status for o in again.outcomes} == {"duplicate"}
    assert store.count() == 10


def test_a_timestamp_too_far_ahead_is_rejected_and_loses_nothing_else(
    client: AffinityClient, store: EventStore
) -> None:
    future = datetime.now(UTC) + timedelta(hours=1)
    result = client.log_events([click("t1"), click("t2", timestamp=future), click("t3")])
    assert [o.status for o in result.outcomes] == ["accepted", "rejected", "accepted"]
    assert result.outcomes[1].field == "timestamp"
    assert sorted(stored_ids(store)) == ["t1", "t3"]


def test_a_timestamp_no_datetime_can_hold_is_a_rejected_outcome(
    port: int, store: EventStore
) -> None:
    bad = pb.Event(event_id="x2", user_id="u01", item_id="i01", event="click")
    bad.timestamp.seconds = 10**15  # past year 9999
    good = pb.Event(event_id="x1", user_id="u01", item_id="i01", event="click")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RecommenderStub(channel)
        response = stub.LogEvents(pb.LogEventsRequest(events=[good, bad]), timeout=5)
    assert [o.status for o in response.outcomes] == [
        pb.EVENT_STATUS_ACCEPTED,
        pb.EVENT_STATUS_REJECTED,
    ]
    assert response.outcomes[1].field == "timestamp"
    assert response.outcomes[1].reason.startswith("timestamp: not a valid time")
    assert (response.accepted, response.rejected) == (1, 1)
    assert stored_ids(store) == ["x1"]


@pytest.mark.parametrize("size", [0, MAX_EVENTS + 1])
def test_an_empty_or_oversized_batch_is_invalid_argument_naming_events(
    client: AffinityClient, store: EventStore, size: int
) -> None:
    batch = [click(f"o{i}") for i in range(size)]
    with pytest.raises(grpc.RpcError) as info:
        client.log_events(batch)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "events" in info.value.details()  # type: ignore[attr-defined]
    assert store.count() == 0


# --- store failures -------------------------------------------------------------------------


def test_a_store_failure_is_unavailable_and_acknowledges_nothing(
    client: AffinityClient, store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(events: object, **kwargs: object) -> object:
        raise StoreError("the event store could not commit the events (OperationalError)")

    monkeypatch.setattr(store, "append", failing)
    assert status_of(lambda: client.log_events([click("f1")])) == grpc.StatusCode.UNAVAILABLE
    monkeypatch.undo()
    assert store.count() == 0
    # The client's retry with the same ids is then accepted.
    assert client.log_events([click("f1")]).accepted == 1


def test_a_locked_sqlite_database_is_unavailable(
    artifact_dir: Path, tmp_path: Path, holder: ModelHolder
) -> None:
    path = tmp_path / "locked.db"
    with EventStore.open(f"sqlite:///{path}", busy_timeout=timedelta(milliseconds=200)) as store:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock past the timeout
        try:
            with (
                running(_settings(artifact_dir, tmp_path), holder, store=store) as bound,
                client_for(bound) as client,
            ):
                with pytest.raises(grpc.RpcError) as info:
                    client.log_events([click("l1")])
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
                assert "retry with the same event ids" in info.value.details()  # type: ignore[attr-defined]
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert store.count() == 0


def test_a_server_without_a_store_answers_unavailable(
    artifact_dir: Path, tmp_path: Path, holder: ModelHolder
) -> None:
    with running(_settings(artifact_dir, tmp_path), holder) as bound, client_for(bound) as client:
        assert status_of(lambda: client.log_events([click("n1")])) == grpc.StatusCode.UNAVAILABLE
        assert len(client.recommend("u01", k=3).items) == 3


def test_a_bad_events_uri_fails_start_up_naming_the_setting(
    artifact_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(InvalidInputError, match=r"events_uri \(AFFINITY_EVENTS_URI\)"):
        load_settings(model_uri=str(artifact_dir), events_uri="mysql://host/db")
    memory = _settings(artifact_dir, tmp_path, events_uri="sqlite:///:memory:")
    with pytest.raises(StoreError, match=r"events_uri \(AFFINITY_EVENTS_URI\)"):
        open_event_store(memory)


# --- group commit ---------------------------------------------------------------------------


def test_concurrent_batches_share_one_transaction(store: EventStore) -> None:
    group = GroupCommit(store)
    entered, release = threading.Event(), threading.Event()
    real_append = store.append

    def slow_first(events: list[StoredEvent], **kwargs: Any) -> Any:
        if not entered.is_set():
            entered.set()
            release.wait(10)
        return real_append(events, **kwargs)

    store.append = slow_first  # type: ignore[method-assign]

    def ev(event_id: str) -> StoredEvent:
        return StoredEvent(event_id, "u01", "i01", "click")

    with ThreadPoolExecutor(3) as pool:
        lead = pool.submit(group.append, [ev("g0")])
        assert entered.wait(10)
        first = pool.submit(group.append, [ev("g1"), ev("shared")])
        while len(group._batcher._queue) < 1:
            threading.Event().wait(0.005)
        second = pool.submit(group.append, [ev("shared"), ev("g2")])
        while len(group._batcher._queue) < 2:
            threading.Event().wait(0.005)
        release.set()
        results = [lead.result(10), first.result(10), second.result(10)]
    assert group.transactions == 2  # the leader's, then both waiting batches together
    statuses = [[o.status for o in outcomes] for outcomes in results]
    assert statuses == [
        [Status.ACCEPTED],
        [Status.ACCEPTED, Status.ACCEPTED],
        [Status.DUPLICATE, Status.ACCEPTED],
    ]
    assert store.count() == 4


def test_a_failed_group_transaction_fails_every_batch_in_it(store: EventStore) -> None:
    group = GroupCommit(store)

    def failing(events: object, **kwargs: object) -> object:
        raise StoreError("down")

    store.append = failing  # type: ignore[method-assign]
    with pytest.raises(StoreError):
        group.append([StoredEvent("z1", "u01", "i01", "click")])


def test_many_concurrent_clients_store_every_acknowledged_id_once(
    port: int, store: EventStore
) -> None:
    clients, batches, size = 8, 6, 40

    def send(c: int) -> list[str]:
        accepted: list[str] = []
        with client_for(port) as client:
            for b in range(batches):
                # Ids overlap between neighbouring clients: each must be accepted exactly once.
                batch = [
                    click(f"c{(c + (i % 2)) % clients}-b{b}-e{i // 2}", item=f"i{i % 40:02d}")
                    for i in range(size)
                ]
                result = client.log_events(batch, timeout=30)
                assert result.rejected == 0
                accepted += [o.event_id for o in result.outcomes if o.status == "accepted"]
        return accepted

    with ThreadPoolExecutor(clients) as pool:
        acknowledged = [eid for ids in pool.map(send, range(clients)) for eid in ids]
    assert len(acknowledged) == len(set(acknowledged))
    assert store.count() == len(acknowledged)
    assert sorted(stored_ids(store)) == sorted(acknowledged)


# --- auth and the command -------------------------------------------------------------------


def test_the_token_is_required_when_configured(
    artifact_dir: Path, tmp_path: Path, holder: ModelHolder, store: EventStore
) -> None:
    settings = _settings(artifact_dir, tmp_path, token=TOKEN)
    with running(settings, holder, store=store) as bound:
        with client_for(bound) as anonymous:
            code = status_of(lambda: anonymous.log_events([click("k1")]))
            assert code == grpc.StatusCode.UNAUTHENTICATED
        with client_for(bound, token=TOKEN) as client:
            assert client.log_events([click("k1")]).accepted == 1
    assert store.count() == 1


def test_events_log_command_end_to_end(
    port: int, store: EventStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [
        json.dumps(click("cli1", timestamp="2026-01-02T03:04:05+00:00")),
        json.dumps({**click("cli2"), "event": "purchase", "price": 12.5}),
        "",
        json.dumps({**click("cli3"), "value": -1}),
        json.dumps(click("cli1")),
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    target = f"127.0.0.1:{port}"
    assert main(["events", "log", "--target", target, "--file", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "4 events: 2 accepted, 1 duplicate, 1 rejected"
    assert out[1].startswith("rejected 'cli3': value: must be finite and >= 0")
    assert sorted(stored_ids(store)) == ["cli1", "cli2"]
    # Sent again: nothing new, and a JSON summary on request.
    path.write_text("\n".join(lines[:2]) + "\n")
    argv = ["events", "log", "--target", target, "--file", str(path), "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["accepted"], summary["duplicates"], summary["rejected"]) == (0, 2, 0)


def test_events_log_exits_2_when_the_file_cannot_be_read(
    port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"127.0.0.1:{port}"
    missing = tmp_path / "missing.jsonl"
    assert main(["events", "log", "--target", target, "--file", str(missing)]) == 2
    assert "cannot read events" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(click("ok")) + "\n{not json\n")
    assert main(["events", "log", "--target", target, "--file", str(broken)]) == 2
    assert f"{broken}:2:" in capsys.readouterr().err


# --- the conversions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(0, 0), (1_767_225_600, 999_999_999), (-62_135_596_800, 0), (253_402_300_799, 1_500), (-1, 1)],
)
def test_a_request_timestamp_converts_as_protobuf_converts_it(seconds: int, nanos: int) -> None:
    message = pb.Event(event_id="t", user_id="u", item_id="i", event="click")
    message.timestamp.seconds, message.timestamp.nanos = seconds, nanos
    converted = event_from_proto(message).timestamp
    assert converted == message.timestamp.ToDatetime(tzinfo=UTC)
    assert converted is not None and converted.tzinfo is UTC


def test_an_event_converts_with_its_defaults() -> None:
    bare = event_from_proto(pb.Event(event_id="e", user_id="u", item_id="i", event="view"))
    assert bare == RawEvent("e", "u", "i", "view", None, 1.0, None, None, ())
    full = pb.Event(event_id="e", user_id="u", item_id="i", event="impression", value=0.0)
    full.price, full.recommendation_id = 0.0, "r"
    full.shown_item_ids.extend(["a", "b"])
    assert event_from_proto(full) == RawEvent(
        "e", "u", "i", "impression", None, 0.0, 0.0, "r", ("a", "b")
    )


def test_outcomes_convert_in_order_with_counts() -> None:
    outcomes = [
        Outcome("a", Status.ACCEPTED),
        Outcome("b", Status.REJECTED, "value: must be finite and >= 0, got -1.0", "value"),
        Outcome("a", Status.DUPLICATE),
        Outcome("c", Status.ACCEPTED),
    ]
    expected = pb.LogEventsResponse(
        outcomes=[
            pb.EventOutcome(event_id="a", status=pb.EVENT_STATUS_ACCEPTED),
            pb.EventOutcome(
                event_id="b",
                status=pb.EVENT_STATUS_REJECTED,
                reason="value: must be finite and >= 0, got -1.0",
                field="value",
            ),
            pb.EventOutcome(event_id="a", status=pb.EVENT_STATUS_DUPLICATE),
            pb.EventOutcome(event_id="c", status=pb.EVENT_STATUS_ACCEPTED),
        ],
        accepted=2,
        duplicates=1,
        rejected=1,
    )
    assert outcomes_to_proto(outcomes) == expected
