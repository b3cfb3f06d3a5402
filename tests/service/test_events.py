"""The event store on SQLite and on a real PostgreSQL: outcomes, durability, migrations, races.

The PostgreSQL cases use ``AFFINITY_TEST_POSTGRES_URI`` (``.ci/run`` sets it from
``scripts/postgres.sh``), each in a schema of its own that is dropped afterwards. Unset, they
skip locally and fail in CI, where a skip would hide a missing PostgreSQL.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Column, Connection, Integer, MetaData, Table, create_engine, inspect, text

from models.errors import InvalidInputError, UnsupportedSchemaError
from service import events as events_module
from service.events import (
    LATEST_VERSION,
    TRAINING_EVENTS,
    Activity,
    Event,
    EventRules,
    EventStore,
    RawEvent,
    Status,
    default_events_uri,
    events_uri,
)
from training.data import EventWeights

POSTGRES_ENV = "AFFINITY_TEST_POSTGRES_URI"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def uri(events_db: str) -> str:
    """A fresh, empty database of each kind (``events_db`` in conftest.py)."""
    return events_db


@pytest.fixture
def store(uri: str) -> Iterator[EventStore]:
    with EventStore.open(uri) as opened:
        yield opened


def click(event_id: str, user: str = "u1", item: str = "i1", **fields: object) -> Event:
    return Event(event_id=event_id, user_id=user, item_id=item, event="click", **fields)  # type: ignore[arg-type]


def ids_of(store: EventStore, user: str) -> set[str]:
    return {ev.event_id for ev in store.events_for_user(user, limit=100_000)}


# --- outcomes -------------------------------------------------------------------------------


def test_batch_outcomes_and_what_is_stored(store: EventStore) -> None:
    at = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    batch = [
        click("e1", timestamp=at),
        Event("e2", "u1", "i2", "purchase", timestamp=at, value=2, price=19.5),
        click("e1", item="other", timestamp=at),  # the same id again in the batch
        Event("e3", "u1", "i3", "impression", shown_item_ids=("i3", "i4"), recommendation_id="r9"),
        Event("e4", "u1", "i4", "teleport"),
    ]
    outcomes = store.append(batch)

    assert [(o.event_id, o.status) for o in outcomes] == [
        ("e1", Status.ACCEPTED),
        ("e2", Status.ACCEPTED),
        ("e1", Status.DUPLICATE),
        ("e3", Status.ACCEPTED),
        ("e4", Status.REJECTED),
    ]
    assert outcomes[4].reason is not None and outcomes[4].reason.startswith("event: ")
    assert "teleport" in outcomes[4].reason and "purchase" in outcomes[4].reason
    assert store.count() == 3
    stored = {ev.event_id: ev for ev in store.events_for_user("u1")}
    assert stored["e1"].item_id == "i1"  # the first of the repeated ids is the one kept
    assert (stored["e2"].value, stored["e2"].price, stored["e2"].timestamp) == (2.0, 19.5, at)
    assert stored["e3"].shown_item_ids == ("i3", "i4")
    assert stored["e3"].recommendation_id == "r9"


BAD_EVENTS: list[tuple[str, Event]] = [
    ("event_id", click("")),
    ("event_id", click("x" * 129)),
    ("user_id", click("b1", user=" ")),
    ("user_id", click("b2", user="nul\x00byte")),
    ("item_id", click("b3", item="i" * 257)),
    ("item_id", click("b4", item="\ud800")),
    ("event", Event("b5", "u1", "i1", "teleport")),
    ("value", click("b6", value=-1.0)),
    ("value", click("b7", value=float("nan"))),
    ("price", click("b8", price=float("inf"))),
    ("timestamp", click("b9", timestamp=datetime(2025, 1, 1))),  # naive
    ("timestamp", click("b10", timestamp=datetime.now(UTC) + timedelta(hours=1))),
    ("shown_item_ids", click("b11", shown_item_ids=("i2",))),
    ("shown_item_ids", Event("b12", "u1", "i1", "impression", shown_item_ids=("ok", ""))),
    ("recommendation_id", click("b13", recommendation_id="")),
]


def test_each_bad_event_is_rejected_naming_its_field_and_the_others_are_stored(
    store: EventStore,
) -> None:
    good = [click("good1"), click("good2", item="\u00e9t\u00e9 \U0001f600")]
    batch = [good[0], *(ev for _, ev in BAD_EVENTS), good[1]]
    rejected_before = REGISTRY.get_sample_value("affinity_events_total", {"outcome": "rejected"})

    outcomes = store.append(batch)

    assert outcomes[0].status is Status.ACCEPTED and outcomes[-1].status is Status.ACCEPTED
    for (field, ev), outcome in zip(BAD_EVENTS, outcomes[1:-1], strict=True):
        assert outcome.status is Status.REJECTED, ev
        assert outcome.reason is not None and outcome.reason.startswith(f"{field}: "), outcome
        assert "\n" not in outcome.reason
        assert outcome.field == field
    assert ids_of(store, "u1") == {"good1", "good2"}
    assert store.count() == 2
    rejected_after = REGISTRY.get_sample_value("affinity_events_total", {"outcome": "rejected"})
    assert (rejected_after or 0) - (rejected_before or 0) == len(BAD_EVENTS)


def test_a_repeated_event_id_is_stored_once_across_batches(store: EventStore) -> None:
    first = store.append([click(f"e{i}") for i in range(5)])
    assert {o.status for o in first} == {Status.ACCEPTED}

    again = store.append([click("e3", item="changed"), click("e9"), click("e0")])

    assert [(o.event_id, o.status) for o in again] == [
        ("e3", Status.DUPLICATE),
        ("e9", Status.ACCEPTED),
        ("e0", Status.DUPLICATE),
    ]
    assert store.count() == 6
    by_id = {ev.event_id: ev for ev in store.events_for_user("u1")}
    assert by_id["e3"].item_id == "i1"


def test_timestamps_default_to_server_time_and_the_future_is_bounded(store: EventStore) -> None:
    before = datetime.now(UTC)
    paris = timezone(timedelta(hours=1))
    outcomes = store.append(
        [
            click("now"),
            click("soon", timestamp=datetime.now(UTC) + timedelta(minutes=4)),
            click("later", timestamp=datetime.now(UTC) + timedelta(minutes=6)),
            click("paris", timestamp=datetime(2025, 6, 1, 13, 0, tzinfo=paris)),
        ]
    )
    after = datetime.now(UTC)

    assert [o.status for o in outcomes] == [
        Status.ACCEPTED,
        Status.ACCEPTED,
        Status.REJECTED,
        Status.ACCEPTED,
    ]
    assert outcomes[2].reason is not None and "ahead of the server's clock" in outcomes[2].reason
    stored = {ev.event_id: ev for ev in store.events_for_user("u1")}
    assert stored["now"].timestamp is not None and before <= stored["now"].timestamp <= after
    assert stored["paris"].timestamp == datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    assert stored["paris"].timestamp.tzinfo == UTC


def test_a_wider_skew_and_extra_event_names_are_configurable(uri: str) -> None:
    rules = EventRules(extra_events=frozenset({"Rate"}), max_future_skew=timedelta(hours=2))
    with EventStore.open(uri, rules=rules) as store:
        outcomes = store.append(
            [
                Event("r1", "u1", "i1", "rate", value=4),
                click("c1", timestamp=datetime.now(UTC) + timedelta(hours=1)),
            ]
        )
        assert [o.status for o in outcomes] == [Status.ACCEPTED, Status.ACCEPTED]
    with EventStore.open(uri) as strict:
        outcome = strict.append([Event("r2", "u1", "i1", "rate")])
        assert outcome[0].status is Status.REJECTED


def test_events_for_user_newest_first_since_and_limit(store: EventStore) -> None:
    base = datetime(2025, 1, 1, tzinfo=UTC)
    store.append([click(f"e{d}", timestamp=base + timedelta(days=d)) for d in (3, 1, 4, 2)])
    store.append([click("other", user="u2", timestamp=base)])

    assert [ev.event_id for ev in store.events_for_user("u1")] == ["e4", "e3", "e2", "e1"]
    since = store.events_for_user("u1", since=base + timedelta(days=2))
    assert [ev.event_id for ev in since] == ["e4", "e3", "e2"]
    assert [ev.event_id for ev in store.events_for_user("u1", limit=1)] == ["e4"]
    assert store.events_for_user("nobody") == []


def test_delete_user_and_prune(store: EventStore) -> None:
    base = datetime(2025, 1, 1, tzinfo=UTC)
    store.append([click(f"a{d}", timestamp=base + timedelta(days=d)) for d in range(4)])
    store.append([click(f"b{d}", user="u2", timestamp=base + timedelta(days=d)) for d in range(4)])

    assert store.delete_user("u2").events == 4
    assert store.events_for_user("u2") == []
    assert store.prune(older_than=base + timedelta(days=2)).events == 2
    assert ids_of(store, "u1") == {"a2", "a3"}
    # An erased event id may come back: erasure is not a tombstone.
    assert store.append([click("b0", user="u2")])[0].status is Status.ACCEPTED


# --- opening and migrating ------------------------------------------------------------------


def test_an_empty_database_gets_the_latest_schema_and_reopening_changes_nothing(uri: str) -> None:
    with EventStore.open(uri) as store:
        assert store.schema_version() == LATEST_VERSION
        store.append([click("kept")])
    with EventStore.open(uri) as store:
        assert store.schema_version() == LATEST_VERSION
        assert ids_of(store, "u1") == {"kept"}
        with store._engine.connect() as conn:
            rows = conn.execute(text("SELECT version FROM schema_version")).all()
        assert rows == [(LATEST_VERSION,)]


def test_a_database_from_a_newer_build_is_refused(uri: str) -> None:
    EventStore.open(uri).close()
    engine = create_engine(uri)
    with engine.begin() as conn:
        conn.execute(text("UPDATE schema_version SET version = :v"), {"v": LATEST_VERSION + 1})
    engine.dispose()

    with pytest.raises(UnsupportedSchemaError, match=r"schema version \d+, newer than"):
        EventStore.open(uri)


def test_an_older_database_is_upgraded_in_place(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with EventStore.open(uri) as store:
        store.append([click("old")])

    def add_notes(conn: Connection) -> None:
        """A made-up step 2: a notes table."""
        Table("notes", MetaData(), Column("id", Integer, primary_key=True)).create(conn)

    monkeypatch.setattr(events_module, "MIGRATIONS", (*events_module.MIGRATIONS, add_notes))
    monkeypatch.setattr(events_module, "LATEST_VERSION", LATEST_VERSION + 1)
    with EventStore.open(uri) as store:
        assert store.schema_version() == LATEST_VERSION + 1
        assert "notes" in inspect(store._engine).get_table_names()
        assert ids_of(store, "u1") == {"old"}


def test_the_uri_default_and_unsupported_databases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AFFINITY_EVENTS_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert events_uri() == default_events_uri() == f"sqlite:///{tmp_path.resolve()}/events.db"
    with EventStore.open() as store:
        store.append([click("e1")])
    assert (tmp_path / "events.db").is_file()
    mode = sqlite3.connect(tmp_path / "events.db").execute("PRAGMA journal_mode").fetchone()
    assert mode == ("wal",)

    monkeypatch.setenv("AFFINITY_EVENTS_URI", f"sqlite:///{tmp_path}/elsewhere.db")
    assert events_uri().endswith("/elsewhere.db")
    for bad in ("mysql://u:p@host/db", "not a uri", "sqlite://", "sqlite:///:memory:"):
        with pytest.raises(InvalidInputError, match="AFFINITY_EVENTS_URI"):
            EventStore.open(bad)


def test_the_vocabulary_is_the_training_one_plus_impression_and_dislike() -> None:
    assert set(TRAINING_EVENTS) == set(EventWeights().model_dump())
    assert EventRules().vocabulary == {*TRAINING_EVENTS, "impression", "dislike"}


# --- crashes and races, in real processes ---------------------------------------------------

APPEND_UNTIL_KILLED = textwrap.dedent(
    """
    import sys
    from service.events import Event, EventStore
    store = EventStore.open(sys.argv[1])
    n = 0
    while True:
        batch = [Event(f"e{n}-{j}", f"u{j % 5}", f"i{j}", "click") for j in range(50)]
        assert all(o.status == "accepted" for o in store.append(batch))
        print(f"acked {n}", flush=True)
        n += 1
    """
)


def test_acknowledged_events_survive_a_sigkill(uri: str) -> None:
    EventStore.open(uri).close()  # migrate first: the child should be writing events when killed
    child = subprocess.Popen(
        [sys.executable, "-c", APPEND_UNTIL_KILLED, uri],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert child.stdout is not None
    acked: list[int] = []
    deadline = time.monotonic() + 60
    while len(acked) < 5 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        acked.append(int(line.split()[1]))
    child.send_signal(signal.SIGKILL)  # right after the fifth ack, in the middle of the sixth
    rest, _ = child.communicate(timeout=30)
    acked += [int(line.split()[1]) for line in rest.splitlines()]
    assert child.returncode == -signal.SIGKILL
    assert len(acked) >= 5, "the child acknowledged fewer than five batches"

    with EventStore.open(uri) as store:
        stored = set().union(*(ids_of(store, f"u{u}") for u in range(5)))
        count = store.count()
    missing = {f"e{n}-{j}" for n in acked for j in range(50)} - stored
    assert not missing
    assert count % 50 == 0, "a batch was stored in part"
    assert len(acked) * 50 <= count <= (len(acked) + 1) * 50


APPEND_THE_SAME_IDS = textwrap.dedent(
    """
    import json, os, random, sys, time
    from service.events import Event, EventStore
    uri, seed, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    store = EventStore.open(uri)
    ids = [f"e{i:03d}" for i in range(300)]
    random.Random(seed).shuffle(ids)
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    accepted = []
    for start in range(0, len(ids), 30):
        batch = [Event(i, "u1", "i1", "view") for i in ids[start : start + 30]]
        accepted += [o.event_id for o in store.append(batch) if o.status == "accepted"]
    print(json.dumps(accepted), flush=True)
    """
)


def test_two_processes_appending_the_same_ids_store_each_once(uri: str, tmp_path: Path) -> None:
    EventStore.open(uri).close()
    go = tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", APPEND_THE_SAME_IDS, uri, str(seed), str(go)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for seed in (1, 2)
    ]
    for child in children:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    go.touch()
    results = []
    for child in children:
        out, _ = child.communicate(timeout=120)
        assert child.returncode == 0
        results.append(set(json.loads(out.strip().splitlines()[-1])))

    everything = {f"e{i:03d}" for i in range(300)}
    assert results[0] | results[1] == everything  # every id accepted by one of them ...
    assert not results[0] & results[1]  # ... and by one only
    with EventStore.open(uri) as store:
        assert store.count() == 300
        assert ids_of(store, "u1") == everything


# --- the append path's shortcuts ------------------------------------------------------------

NOW = datetime(2026, 5, 1, 10, 0, 0, 5, tzinfo=UTC)
LATEST = NOW + timedelta(minutes=5)
CHECKED: list[Event | RawEvent] = [
    click("plain"),
    RawEvent("raw", "u1", "i1", "click"),
    RawEvent("full", "u1", "i1", "purchase", NOW, 2.0, 9.5, "rec-1"),
    Event("upper", "u1", "i1", " Click "),
    Event("named", "u1", "i1", "CLICK"),
    click("paris", timestamp=datetime(2026, 4, 30, 12, tzinfo=timezone(timedelta(hours=2)))),
    click("future", timestamp=NOW + timedelta(minutes=6)),
    click("edge", timestamp=LATEST),
    click("int-value", value=2),
    click("bool-value", value=True),
    click("nan", value=float("nan")),
    click("negative-zero", value=-0.0),
    click("inf-price", price=float("inf")),
    click("int-price", price=3),
    click(" "),
    click("tab\tinside"),
    click("nul\x00inside"),
    click("\u00e9t\u00e9"),
    click("\ud800"),
    click("x" * 128),
    click("x" * 129),
    click("long-user", user="u" * 257),
    click("empty-rec", recommendation_id=""),
    click("space-rec", recommendation_id=" "),
    click("long-rec", recommendation_id="r" * 129),
    click("nul-rec", recommendation_id="r\x00"),
    RawEvent(17, "u1", "i1", "click"),  # type: ignore[arg-type]
    RawEvent("list-name", "u1", "i1", ["click"]),  # type: ignore[arg-type]
    RawEvent("naive", "u1", "i1", "click", datetime(2026, 1, 1)),
    Event("shown", "u1", "i1", "impression", shown_item_ids=("i1", "i2")),
    Event("shown-click", "u1", "i1", "click", shown_item_ids=("i1",)),
]


@pytest.mark.parametrize("ev", CHECKED, ids=lambda ev: str(ev.event_id)[:20])
def test_the_quick_check_agrees_with_the_full_one(ev: Event | RawEvent) -> None:
    rules = EventRules()

    def outcome(check: Any) -> object:
        try:
            return check()
        except events_module._Rejected as rejected:
            return ("rejected", rejected.field, str(rejected))

    quick = outcome(lambda: rules.fields(ev, NOW, LATEST))
    full = outcome(lambda: rules._full_check(ev, NOW))
    assert quick == full
    if isinstance(quick, RawEvent) and isinstance(full, RawEvent):
        assert [type(v) for v in quick] == [type(v) for v in full]  # 2.0, not 2


def test_a_large_batch_with_stored_repeated_and_bad_events(store: EventStore) -> None:
    # More than one IN query's worth of ids and every INSERT size, on both databases.
    before = store.append([click(f"e{i:04d}") for i in range(0, 1300, 3)])
    assert {o.status for o in before} == {Status.ACCEPTED}
    batch: list[Event | RawEvent] = []
    expected: list[Status] = []
    for i in range(1300):
        if i % 97 == 0:
            batch.append(click(f"e{i:04d}", value=-1.0))  # bad: the next copy is the first
            expected.append(Status.REJECTED)
        batch.append(RawEvent(f"e{i:04d}", f"u{i % 7}", f"i{i % 11}", "view"))
        expected.append(Status.DUPLICATE if i % 3 == 0 else Status.ACCEPTED)
        if i % 50 == 0:
            batch.append(click(f"e{i:04d}"))  # again in the same batch
            expected.append(Status.DUPLICATE)
    stored: list[Activity | None] = []
    outcomes = store.append(batch, stored=stored)

    assert [o.status for o in outcomes] == expected
    assert [o.event_id for o in outcomes] == [ev.event_id for ev in batch]
    assert len(stored) == len(batch)
    with store._engine.connect() as conn:
        ids: dict[str, int] = {
            event_id: row_id
            for event_id, row_id in conn.execute(text("SELECT event_id, id FROM events"))
        }
    assert len(ids) == store.count() == 1300
    for ev, outcome, row in zip(batch, outcomes, stored, strict=True):
        if outcome.status is not Status.ACCEPTED:
            assert row is None
            continue
        assert row is not None
        assert (row.row_id, row.event_id, row.user_id, row.item_id) == (
            ids[ev.event_id],
            ev.event_id,
            ev.user_id,
            ev.item_id,
        )
        assert row.event == "view" and row.ts == row.received_at
    stored_views = store.events_for_user("u1", limit=10_000)
    assert {ev.event for ev in stored_views} == {"click", "view"}


def test_row_ids_handed_out_of_order_are_read_back(tmp_path: Path) -> None:
    path = tmp_path / "full.db"
    with EventStore.open(f"sqlite:///{path}") as store:
        store.append([click("first")])
        with store._write() as conn:  # the largest row id there is: SQLite picks new ids at random
            conn.execute(text("UPDATE events SET id = 9223372036854775807"))
        stored: list[Activity | None] = []
        outcomes = store.append([click(f"n{i}") for i in range(70)], stored=stored)
        assert {o.status for o in outcomes} == {Status.ACCEPTED}
        with store._engine.connect() as conn:
            ids: dict[str, int] = {
                event_id: row_id
                for event_id, row_id in conn.execute(text("SELECT event_id, id FROM events"))
            }
        assert {row.event_id: row.row_id for row in stored if row is not None} == {
            f"n{i}": ids[f"n{i}"] for i in range(70)
        }


APPEND_OVERLAPPING = textwrap.dedent(
    """
    import json, os, random, sys, time
    from service.events import Event, EventStore
    uri, seed, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    store = EventStore.open(uri)
    rng = random.Random(seed)
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    accepted = []
    for _ in range(6):
        ids = rng.sample(range(1500), 400)
        batch = [Event(f"e{i:04d}", "u1", "i1", "view") for i in ids]
        batch += batch[:20]  # repeated in the batch too
        accepted += [o.event_id for o in store.append(batch) if o.status == "accepted"]
    print(json.dumps(accepted), flush=True)
    """
)


def test_three_processes_with_overlapping_batches_store_each_id_once(
    uri: str, tmp_path: Path
) -> None:
    EventStore.open(uri).close()
    go = tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", APPEND_OVERLAPPING, uri, str(seed), str(go)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for seed in (1, 2, 3)
    ]
    for child in children:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    go.touch()
    accepted: list[str] = []
    for child in children:
        out, _ = child.communicate(timeout=120)
        assert child.returncode == 0
        accepted += json.loads(out.strip().splitlines()[-1])
    assert len(accepted) == len(set(accepted))  # no id acknowledged as new twice
    with EventStore.open(uri) as store:
        assert store.count() == len(accepted)
        assert ids_of(store, "u1") == set(accepted)


def test_the_recorders_json_is_the_text_json_dumps_writes() -> None:
    """The answers' item ids and reason codes are written by a faster encoder than
    ``json.dumps``: the same text, hostile ids included, and the general encoder for anything
    that is not a list of strings (or of integers)."""
    import json

    from service.events import _json_codes, _json_ids

    ids = ["i1", 'say "hi"', "back\\slash", "tab\tnew\nline", "ü", "\u2603", "😀", "\x00\x1f", ""]
    for sample in (ids, ids[:1], [], tuple(ids)):
        assert _json_ids(sample) == json.dumps(list(sample))
        assert json.loads(_json_ids(sample)) == list(sample)
    assert _json_ids(["a", 3]) == json.dumps(["a", 3])  # not all strings: json.dumps
    for codes in ([0, 0, 1, 2], [], [255], (1, 2)):
        assert _json_codes(codes) == json.dumps(list(codes))
    assert _json_codes([True, 0]) == json.dumps([True, 0])  # a bool is not a code: json.dumps
