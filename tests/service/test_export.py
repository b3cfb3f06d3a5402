"""``affinity events export`` and ``affinity events prune`` on SQLite and PostgreSQL.

The export is read back the way its users read it (pandas, pyarrow.dataset); re-running it must
never duplicate an event; prune removes what is older than its cutoff and counts it first with
``--dry-run``. ``users delete`` is checked for its wiring here (a stand-in client); the RPC itself
is tested with the server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from affinity.cli import main
from models.errors import InvalidInputError
from service import cli as service_cli
from service.events import Event, EventStore, Response
from service.export import EXPORT_SCHEMA, export_events, parse_when
from service.retention import cutoff_of

DAY1 = datetime(2025, 3, 1, tzinfo=UTC)


@pytest.fixture
def uri(events_db: str) -> str:
    return events_db


@pytest.fixture
def store(uri: str) -> Iterator[EventStore]:
    with EventStore.open(uri) as opened:
        yield opened


def three_days() -> list[Event]:
    """Events over 2025-03-01..03 (UTC), appended out of time order, of every kind of field."""
    at = DAY1 + timedelta(hours=23, minutes=30)
    return [
        Event("e1", "u1", "i1", "click", timestamp=at + timedelta(hours=1), recommendation_id="r1"),
        Event("e2", "u1", "i2", "purchase", timestamp=at, value=2, price=19.5),
        Event(
            "e3",
            "u2",
            "i3",
            "impression",
            timestamp=at + timedelta(days=1),
            shown_item_ids=("i3", "i4"),
            recommendation_id="r2",
        ),
        Event("e4", "u2", "i4", "dislike", timestamp=at - timedelta(hours=2)),
        # A zone other than UTC: 2025-03-03 01:00 in +02:00 is 2025-03-02 23:00 UTC.
        Event("e5", "u3", "i1", "view", timestamp=datetime.fromisoformat("2025-03-03T01:00+02:00")),
        Event("e6", "u3", "i2", "view", timestamp=at + timedelta(days=1, hours=2)),
    ]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_export_partitions_by_utc_day_and_reads_back(
    store: EventStore, uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store.append(three_days())
    out = tmp_path / "lake"
    code, stdout, _ = run(capsys, "events", "export", "--out", str(out), "--events-uri", uri)
    assert code == 0
    assert stdout.startswith("exported 6 events: 3 days, 3 files in ")

    days = sorted(p.name for p in out.iterdir())
    assert days == ["day=2025-03-01", "day=2025-03-02", "day=2025-03-03"]
    for folder in out.iterdir():
        (part,) = folder.iterdir()
        assert part.name.startswith("part-") and part.suffix == ".parquet"
        assert pq.read_schema(part).equals(EXPORT_SCHEMA)

    frame = pd.read_parquet(out).sort_values("event_id").reset_index(drop=True)
    assert frame["event_id"].tolist() == ["e1", "e2", "e3", "e4", "e5", "e6"]
    assert str(frame["timestamp"].dtype) == "datetime64[us, UTC]"
    # Each row lies in the partition of its timestamp's UTC day.
    assert (frame["timestamp"].dt.strftime("%Y-%m-%d") == frame["day"].astype(str)).all()
    e5 = frame.set_index("event_id").loc["e5"]
    assert (e5["timestamp"], e5["day"]) == (pd.Timestamp("2025-03-02T23:00Z"), "2025-03-02")
    e2 = frame.set_index("event_id").loc["e2"]
    assert (e2["event"], e2["value"], e2["price"]) == ("purchase", 2.0, 19.5)
    assert pd.isna(frame.set_index("event_id").loc["e1", "price"])
    assert list(frame.set_index("event_id").loc["e3", "shown_item_ids"]) == ["i3", "i4"]
    assert frame.set_index("event_id").loc["e3", "recommendation_id"] == "r2"
    assert frame.set_index("event_id").loc["e6", "shown_item_ids"] is None
    assert frame["received_at"].notna().all()

    dataset = ds.dataset(out, format="parquet", partitioning="hive")
    assert dataset.schema.remove(dataset.schema.get_field_index("day")).equals(EXPORT_SCHEMA)
    assert dataset.count_rows() == 6
    march_2 = dataset.to_table(filter=ds.field("day") == "2025-03-02")
    assert sorted(march_2.column("event_id").to_pylist()) == ["e1", "e3", "e5"]


def test_export_refuses_a_non_empty_folder_and_overwrite_replaces_the_days_written(
    store: EventStore, uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store.append(three_days())
    out = tmp_path / "lake"
    base = ["events", "export", "--out", str(out), "--events-uri", uri]
    assert run(capsys, *base)[0] == 0
    code, _, err = run(capsys, *base)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "--overwrite" in err
    (out / "_README.txt").write_text("not a partition")

    # More events on the 2nd, then the 2nd alone exported again over the old partition.
    store.append([Event("e7", "u4", "i9", "click", timestamp=DAY1 + timedelta(days=1, hours=5))])
    code, stdout, _ = run(
        capsys,
        *base,
        "--overwrite",
        "--since",
        "2025-03-02",
        "--until",
        "2025-03-03T00:00:00+00:00",
        "--json",
    )
    assert code == 0
    summary = json.loads(stdout)
    assert summary["events"] == 4 and summary["partitions"] == ["day=2025-03-02"]
    frame = pd.read_parquet(out)
    assert sorted(frame["event_id"]) == ["e1", "e2", "e3", "e4", "e5", "e6", "e7"]  # once each
    assert (out / "_README.txt").read_text() == "not a partition"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left

    # A full re-export with --overwrite gives the same data set, not a second copy.
    assert run(capsys, *base, "--overwrite")[0] == 0
    assert len(pd.read_parquet(out)) == 7


def test_export_streams_in_small_pages_with_few_open_files(
    store: EventStore, tmp_path: Path
) -> None:
    # Interleaved days, read 3 events per page, 4 rows per row group, one file open at a time.
    events = [
        Event(
            f"e{i:03d}", f"u{i % 7}", f"i{i % 11}", "view", timestamp=DAY1 + timedelta(days=i % 4)
        )
        for i in range(60)
    ]
    store.append(events)
    result = export_events(
        store, tmp_path / "out", batch_size=3, row_group_rows=4, max_open_files=1
    )
    assert (result.events, result.days) == (60, [f"2025-03-0{d}" for d in (1, 2, 3, 4)])
    assert result.files > 4  # a day's writer was closed and reopened as a new part
    table = ds.dataset(tmp_path / "out", partitioning="hive").to_table()
    assert sorted(table.column("event_id").to_pylist()) == sorted(e.event_id for e in events)
    for file in (tmp_path / "out").rglob("*.parquet"):
        metadata = pq.ParquetFile(file).metadata
        assert all(metadata.row_group(g).num_rows <= 4 for g in range(metadata.num_row_groups))


def test_export_of_an_empty_range_and_bad_arguments(store: EventStore, tmp_path: Path) -> None:
    store.append(three_days())
    result = export_events(store, tmp_path / "none", since=datetime(2030, 1, 1, tzinfo=UTC))
    assert (result.events, result.days, result.files) == (0, [], 0)
    assert list((tmp_path / "none").iterdir()) == []
    with pytest.raises(InvalidInputError, match="later than"):
        export_events(store, tmp_path / "x", since=DAY1, until=DAY1)
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidInputError, match="not a folder"):
        export_events(store, tmp_path / "file")
    assert parse_when("2025-03-01", name="since") == DAY1
    assert parse_when("2025-03-01T02:00+02:00", name="since") == DAY1
    with pytest.raises(InvalidInputError, match="--since"):
        parse_when("yesterday", name="since")


def test_export_of_a_failing_write_leaves_the_folder_as_it_was(
    store: EventStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.append(three_days())
    out = tmp_path / "lake"
    export_events(store, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        export_events(store, out, overwrite=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


# --- prune ----------------------------------------------------------------------------------


def response(recommendation_id: str, served_at: datetime) -> Response:
    return Response(
        recommendation_id, "Recommend", "u1", ("i1",), "personalized", "m", "1", served_at
    )


def test_prune_dry_run_counts_then_prune_removes(
    store: EventStore, uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now(UTC)
    old, recent = now - timedelta(days=100), now - timedelta(days=10)
    store.append(
        [
            Event("old1", "u1", "i1", "click", timestamp=old),
            Event("old2", "u2", "i2", "view", timestamp=old),
            Event("new1", "u1", "i3", "click", timestamp=recent),
        ]
    )
    store.record_responses([response("r-old", old), response("r-new", recent)])

    code, stdout, _ = run(
        capsys, "events", "prune", "--older-than", "90d", "--dry-run", "--events-uri", uri
    )
    assert code == 0
    assert stdout.startswith("would remove 2 events and 1 recorded responses older than ")
    assert store.count() == 3 and store.response("r-old") is not None

    code, stdout, _ = run(
        capsys, "events", "prune", "--older-than", "90d", "--events-uri", uri, "--json"
    )
    assert code == 0
    summary = json.loads(stdout)
    assert (summary["dry_run"], summary["events"], summary["responses"]) == (False, 2, 1)
    assert store.count() == 1
    assert store.response("r-old") is None and store.response("r-new") is not None
    again = run(capsys, "events", "prune", "--older-than", "90d", "--events-uri", uri)[1]
    assert again.startswith("removed 0 events and 0 recorded responses older than ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--older-than is required"),
        (["--older-than", "0d"], "positive duration"),
        (["--older-than=-5d"], "positive duration"),
        (["--older-than", "2999-01-01"], "not in the past"),
        (["--older-than", "ninety days"], "expected a duration"),
    ],
)
def test_prune_refuses_a_missing_zero_or_negative_duration(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "events.db"
    code, _, err = run(capsys, "events", "prune", *argv, "--events-uri", f"sqlite:///{db}")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not db.exists()  # refused before the store was opened


def test_cutoff_units() -> None:
    now = datetime(2025, 6, 1, 12, tzinfo=UTC)
    assert cutoff_of("90d", now=now) == now - timedelta(days=90)
    assert cutoff_of("12h", now=now) == now - timedelta(hours=12)
    assert cutoff_of(" 30M ", now=now) == now - timedelta(minutes=30)
    assert cutoff_of("45s", now=now) == now - timedelta(seconds=45)
    assert cutoff_of("2w", now=now) == now - timedelta(weeks=2)
    assert cutoff_of("1.5d", now=now) == now - timedelta(hours=36)
    assert cutoff_of("2025-01-31", now=now) == datetime(2025, 1, 31, tzinfo=UTC)
    assert cutoff_of("2025-01-31T10:00:00+02:00", now=now) == datetime(2025, 1, 31, 8, tzinfo=UTC)
    assert cutoff_of("2025-05-31", now=now).date() == date(2025, 5, 31)


def test_the_default_store_is_events_db_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AFFINITY_EVENTS_URI", raising=False)
    with EventStore.open(f"sqlite:///{tmp_path / 'events.db'}") as store:
        store.append(three_days())
    code, stdout, _ = run(capsys, "events", "export", "--out", "lake")
    assert code == 0 and stdout.startswith("exported 6 events")
    other = tmp_path / "other.db"
    monkeypatch.setenv("AFFINITY_EVENTS_URI", f"sqlite:///{other}")
    code, stdout, _ = run(capsys, "events", "prune", "--older-than", "1d", "--dry-run")
    assert (code, stdout.split(" events")[0]) == (0, "would remove 0")
    assert other.exists()


# --- users delete (wiring; the RPC is tested with the server) -------------------------------


class _Deleted:
    events_deleted = 3
    responses_deleted = 1

    def to_dict(self) -> dict[str, Any]:
        return {"user_id": "u1", "events_deleted": 3, "responses_deleted": 1}


class _Client:
    calls: list[tuple[str, str, str | None]] = []

    def __init__(self, target: str, **kwargs: Any) -> None:
        self.target = target

    def __enter__(self) -> _Client:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def delete_user(self, user_id: str, *, admin_token: str | None = None) -> _Deleted:
        self.calls.append((self.target, user_id, admin_token))
        return _Deleted()


def test_users_delete_sends_the_admin_token_and_prints_the_counts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(service_cli, "AffinityClient", _Client)
    _Client.calls.clear()
    monkeypatch.setenv("AFFINITY_ADMIN_TOKEN", "from-env")
    code, stdout, _ = run(capsys, "users", "delete", "--user-id", "u1", "--target", "h:1")
    assert code == 0
    assert stdout == "erased user 'u1': 3 events and 1 recorded responses deleted\n"
    code, stdout, _ = run(
        capsys, "users", "delete", "--user-id", "u1", "--admin-token", "flag", "--json"
    )
    assert code == 0 and json.loads(stdout)["events_deleted"] == 3
    assert [call[1:] for call in _Client.calls] == [("u1", "from-env"), ("u1", "flag")]


def test_users_delete_without_an_admin_token_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(service_cli, "AffinityClient", _Client)
    monkeypatch.delenv("AFFINITY_ADMIN_TOKEN", raising=False)
    code, _, err = run(capsys, "users", "delete", "--user-id", "u1")
    assert code == 1 and "AFFINITY_ADMIN_TOKEN" in err


def test_exported_columns_are_the_documented_ones() -> None:
    assert EXPORT_SCHEMA.names == [
        "event_id",
        "user_id",
        "item_id",
        "event",
        "timestamp",
        "value",
        "price",
        "recommendation_id",
        "shown_item_ids",
        "received_at",
    ]
    assert EXPORT_SCHEMA.field("timestamp").type == pa.timestamp("us", tz="UTC")
    assert EXPORT_SCHEMA.field("shown_item_ids").type == pa.list_(pa.string())
