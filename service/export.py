"""Events out of the store: a Parquet data set partitioned by day, and a training log.

:func:`export_events` (``affinity events export``) writes every stored event, or those of a time
range, as Parquet files in hive-style day partitions::

    OUT/day=2025-03-01/part-00000-<token>.parquet
    OUT/day=2025-03-02/part-00000-<token>.parquet

``day`` is the UTC date of the event's ``timestamp``; it lives in the folder name only, so
pandas (``pd.read_parquet(OUT)``), ``pyarrow.dataset``, DuckDB
(``read_parquet('OUT/**/*.parquet', hive_partitioning = true)``) and Spark
(``spark.read.parquet(OUT)``) read it back as a column. Every file has the schema
:data:`EXPORT_SCHEMA`.

The store is read in pages of ``batch_size`` events (:meth:`EventStore.iter_events`) and each
day's rows are buffered only up to a row group (``row_group_rows``) before they are written, with
at most ``max_open_files`` files open at once, so memory stays bounded whatever the store holds.

Re-running never duplicates data: a non-empty ``OUT`` is refused, unless ``overwrite``, which
replaces each day partition the export writes (whole folders; other days and other files in
``OUT`` stay). The files are written under a hidden staging folder in ``OUT`` and moved into place,
one rename per day, only when all are complete: an export that fails while reading or writing
leaves ``OUT``'s partitions as they were.

:func:`write_training_log` writes what ``affinity train --events`` reads: one Parquet file in the
interaction-log format of ``training.data`` (``user_id, item_id, event, timestamp, value``)
without the events that are not training interactions (``impression``, ``dislike``).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.errors import InvalidInputError
from service.events import FEEDBACK_EVENTS, EventStore

logger = logging.getLogger(__name__)

EXPORT_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("event", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("price", pa.float64()),
        pa.field("recommendation_id", pa.string()),
        pa.field("shown_item_ids", pa.list_(pa.string())),
        pa.field("received_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
"""The columns of every exported file (``day`` is the partition folder)."""

TRAINING_LOG_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("event", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
    ]
)
"""The interaction-log columns ``training.data`` reads."""

PARTITION = "day"
_STAGING_PREFIX = ".export-staging-"
_MICROS_PER_DAY = 86_400_000_000
_EPOCH = date(1970, 1, 1)

# A store row's key -> the exported column (the store calls the event's time ``ts``).
_COLUMN_OF = {"ts": "timestamp"}


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_events` wrote."""

    out: Path
    events: int
    days: list[str]
    """The partitions written (``YYYY-MM-DD``), in order; each replaced any that was there."""
    files: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "events": self.events,
            "days": len(self.days),
            "files": self.files,
            "seconds": round(self.seconds, 3),
            "partitions": [f"{PARTITION}={day}" for day in self.days],
        }


@dataclass(frozen=True)
class TrainingLog:
    """What :func:`write_training_log` wrote."""

    path: Path
    events: int
    """Events read from the store."""
    written: int
    """Rows written to the log (the training interactions)."""
    skipped: Counter[str] = field(default_factory=Counter)
    """Events left out, by name (``impression``, ``dislike``)."""


def parse_when(text: str, *, name: str) -> datetime:
    """An ISO 8601 date (midnight UTC) or date-time (naive meaning UTC) as an aware datetime."""
    raw = text.strip()
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidInputError(
            f"--{name}: expected an ISO 8601 date or date-time (2025-03-01, "
            f"2025-03-01T12:00:00+00:00), got {text!r}",
            field=name,
        ) from None
    if when.tzinfo is None or when.utcoffset() is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


# --- the day-partitioned export -------------------------------------------------------------


def export_events(
    store: EventStore,
    out: str | Path,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    overwrite: bool = False,
    batch_size: int = 10_000,
    row_group_rows: int = 100_000,
    max_open_files: int = 32,
) -> ExportResult:
    """Write the events with ``since <= timestamp < until`` (all by default) to ``out`` as
    Parquet partitioned by UTC day; see the module's docstring.

    Raises :class:`InvalidInputError` for a non-empty ``out`` without ``overwrite``, an ``out``
    that is not a folder, an empty range or bad sizes; ``OSError`` when writing fails (then no
    partition of ``out`` has changed).
    """
    started = time.perf_counter()
    if batch_size < 1 or row_group_rows < 1 or max_open_files < 1:
        raise InvalidInputError(
            "batch_size, row_group_rows and max_open_files must be >= 1", field="batch_size"
        )
    if since is not None and until is not None and until <= since:
        raise InvalidInputError(
            f"--until ({until.isoformat()}) must be later than --since ({since.isoformat()})",
            field="until",
        )
    target = Path(out)
    _check_target(target, overwrite)
    target.mkdir(parents=True, exist_ok=True)
    staging = target / f"{_STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    token = uuid.uuid4().hex[:12]
    events = 0
    try:
        writer = _DayWriter(staging, token, row_group_rows, max_open_files)
        try:
            for rows in store.iter_events(since=since, until=until, batch_size=batch_size):
                writer.add(_table(rows, EXPORT_SCHEMA))
                events += len(rows)
        finally:
            writer.close()
        days = sorted(writer.files)
        _publish(staging, target, days)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result = ExportResult(
        out=target,
        events=events,
        days=days,
        files=sum(writer.files.values()),
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "exported %d events in %d day partitions (%d files) to %s",
        result.events,
        len(result.days),
        result.files,
        target,
    )
    return result


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise InvalidInputError(f"--out {target} exists and is not a folder", field="out")
    if target.is_dir() and not overwrite and any(target.iterdir()):
        raise InvalidInputError(
            f"--out {target} is not empty: export into an empty folder, or pass --overwrite to "
            "replace the day partitions this export writes",
            field="out",
        )


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Row dicts of the store as an Arrow table of ``schema``'s columns."""
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    for row in rows:
        for key, value in row.items():
            column = columns.get(_COLUMN_OF.get(key, key))
            if column is not None:
                column.append(value)
    return pa.table(columns, schema=schema)


def _day_numbers(table: pa.Table) -> np.ndarray:
    micros = table.column("timestamp").cast(pa.int64()).to_numpy()
    return np.floor_divide(micros, _MICROS_PER_DAY)


class _DayWriter:
    """Per-day Parquet files under ``root/day=YYYY-MM-DD/``, written in bounded memory.

    A day's rows are buffered until they fill a row group; when more than ``max_open`` files are
    open the least recently written is closed (the day's next rows start a new part file), and
    when the buffers together pass a few row groups the largest is written out early.
    """

    def __init__(self, root: Path, token: str, row_group_rows: int, max_open: int) -> None:
        self.root = root
        self.token = token
        self.row_group_rows = row_group_rows
        self.max_open = max_open
        self.max_pending = 4 * row_group_rows
        self.files: Counter[str] = Counter()
        self._pending: dict[str, list[pa.Table]] = {}
        self._pending_rows: Counter[str] = Counter()
        self._open: dict[str, pq.ParquetWriter] = {}  # in order of last write (oldest first)

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        numbers = _day_numbers(table)
        distinct = np.unique(numbers)
        for number in distinct:
            day = (_EPOCH + timedelta(days=int(number))).isoformat()
            part = table if len(distinct) == 1 else table.filter(pa.array(numbers == number))
            self._pending.setdefault(day, []).append(part)
            self._pending_rows[day] += part.num_rows
            if self._pending_rows[day] >= self.row_group_rows:
                self._flush(day)
        while sum(self._pending_rows.values()) > self.max_pending:
            largest, _ = self._pending_rows.most_common(1)[0]
            self._flush(largest)

    def close(self) -> None:
        for day in list(self._pending):
            self._flush(day)
        for day in list(self._open):
            self._open.pop(day).close()

    def _flush(self, day: str) -> None:
        tables = self._pending.pop(day, [])
        self._pending_rows.pop(day, None)
        if not tables:
            return
        writer = self._open.pop(day, None)
        if writer is None:
            while len(self._open) >= self.max_open:
                oldest = next(iter(self._open))
                self._open.pop(oldest).close()
            folder = self.root / f"{PARTITION}={day}"
            folder.mkdir(exist_ok=True)
            name = f"part-{self.files[day]:05d}-{self.token}.parquet"
            writer = pq.ParquetWriter(folder / name, EXPORT_SCHEMA)
            self.files[day] += 1
        writer.write_table(pa.concat_tables(tables), row_group_size=self.row_group_rows)
        self._open[day] = writer  # now the most recently written


def _publish(staging: Path, target: Path, days: Iterable[str]) -> None:
    """Move each staged day folder into ``target``, replacing the folder of that day."""
    trash = staging / ".replaced"
    trash.mkdir()
    for day in days:
        name = f"{PARTITION}={day}"
        existing = target / name
        if existing.exists():
            os.replace(existing, trash / name)
        os.replace(staging / name, existing)


# --- the training log -----------------------------------------------------------------------


def write_training_log(
    store: EventStore,
    path: str | Path,
    *,
    skip_events: Collection[str] = FEEDBACK_EVENTS,
    batch_size: int = 10_000,
) -> TrainingLog:
    """Write the store's events but ``skip_events`` to one Parquet file in the interaction-log
    format (``user_id, item_id, event, timestamp, value``), in bounded memory.

    Every other event is written, also one the training weights do not know: training validates
    the log as any other and quarantines what it cannot use.
    """
    target = Path(path)
    skip = frozenset(skip_events)
    events = written = 0
    skipped: Counter[str] = Counter()
    with pq.ParquetWriter(target, TRAINING_LOG_SCHEMA) as writer:
        for rows in store.iter_events(batch_size=batch_size):
            events += len(rows)
            kept = [row for row in rows if row["event"] not in skip]
            skipped.update(row["event"] for row in rows if row["event"] in skip)
            if kept:
                writer.write_table(_table(kept, TRAINING_LOG_SCHEMA))
                written += len(kept)
    return TrainingLog(target, events, written, skipped)
