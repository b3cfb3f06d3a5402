"""The event store: what users did after Affinity answered, kept durably in a real database.

Events arrive at the service (later through ``LogEvents``), so the store lives here; it imports
only ``models`` and third-party libraries. It talks to the database through SQLAlchemy: a SQLite
file by default (``sqlite:///<cwd>/events.db``, as MLflow's embedded store), PostgreSQL for
deployments with several hosts (``postgresql+psycopg://user:password@host/db``), chosen by
``AFFINITY_EVENTS_URI``.

- ``append`` validates each event on its own (a bad one is rejected with a reason naming the
  field and never loses the others), stores the good ones in one transaction and says which were
  new (``accepted``) and which were already stored (``duplicate``, by ``event_id``). When it
  returns, the accepted events are committed: SQLite runs in WAL mode with ``synchronous=FULL``,
  PostgreSQL with its default synchronous commit.
- Duplicates are told apart by the database itself, even when another process (or host) stored
  the same ids a moment before: a unique constraint on ``event_id``; on PostgreSQL one
  ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` (the ids not returned were already there); on
  SQLite the transaction takes the database's write lock first (``BEGIN IMMEDIATE``), so the ids
  it finds stored are all there are until it commits, and it inserts only the others.
- The schema is versioned: ``schema_version`` holds one number, ``MIGRATIONS`` is the ordered list
  of steps, and opening a database applies the missing steps, each in its own transaction. A
  database from a newer build is refused. A short explicit list rather than Alembic: the store has
  a handful of tables, the steps read top to bottom in this file, and it needs no migration
  environment, revision files or command; Alembic can take over from version N if the schema ever
  grows branches.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from json.encoder import encode_basestring_ascii as _json_string
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    TypeDecorator,
    case,
    create_engine,
    delete,
    event,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from models.batching import ScoreBatcher
from models.errors import InvalidInputError, StoreError, UnsupportedSchemaError
from service import telemetry

logger = logging.getLogger(__name__)

EVENTS_URI_ENV = "AFFINITY_EVENTS_URI"
DEFAULT_DB = "events.db"

TRAINING_EVENTS = ("view", "click", "like", "share", "add_to_cart", "purchase")
"""The training vocabulary (the default weights of ``training.data.EventWeights``)."""
FEEDBACK_EVENTS = ("impression", "dislike")
"""Events only the store knows: what was shown, and "not interested"."""

MAX_EVENT_ID = 128
MAX_ID = 256
MAX_EVENT_NAME = 64
MAX_SHOWN_ITEMS = 1000
DEFAULT_MAX_FUTURE_SKEW = timedelta(minutes=5)
DEFAULT_LIMIT = 1000
_MAX_FLOAT = sys.float_info.max
# Any constant: the key of the PostgreSQL advisory lock that serializes migrations.
_MIGRATION_LOCK = 0x61666669


def default_events_uri(workdir: Path | None = None) -> str:
    """The embedded store's URI: ``sqlite:///<workdir>/events.db``."""
    base = (workdir or Path.cwd()).resolve()
    return f"sqlite:///{base / DEFAULT_DB}"


def events_uri() -> str:
    """``AFFINITY_EVENTS_URI``, or the embedded default in the working directory."""
    return os.environ.get(EVENTS_URI_ENV) or default_events_uri()


# --- the values -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """One thing a user did, as the caller sends it (checked by :meth:`EventRules.check`)."""

    event_id: str
    """The caller's id of the event: a repeated id is stored once (at most 128 characters)."""
    user_id: str
    """Who acted (at most 256 characters)."""
    item_id: str
    """On what (at most 256 characters)."""
    event: str
    """What: the training vocabulary, ``impression``, ``dislike`` or a configured extra name."""
    timestamp: datetime | None = None
    """When, timezone-aware; the server's time when absent."""
    value: float = 1.0
    """Multiplies the event's weight (quantity, watch fraction); finite and >= 0."""
    price: float | None = None
    """Revenue of a purchase; finite and >= 0."""
    recommendation_id: str | None = None
    """The answer this event follows from (attribution)."""
    shown_item_ids: tuple[str, ...] = ()
    """For an ``impression``: the item ids that were shown, in order."""


class RawEvent(NamedTuple):
    """An :class:`Event`'s fields as a plain tuple, unchecked: what ``LogEvents`` builds from each
    message and what :meth:`EventRules.fields` returns. :meth:`EventStore.append` takes either;
    a tuple costs a fraction of the frozen dataclass to build, once per event."""

    event_id: str
    user_id: str
    item_id: str
    event: str
    timestamp: datetime | None = None
    value: float = 1.0
    price: float | None = None
    recommendation_id: str | None = None
    shown_item_ids: tuple[str, ...] = ()


class Status(StrEnum):
    """What the store did with an event."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


class Outcome(NamedTuple):
    """The answer for one event of a batch, in the batch's order (a tuple: one is built per
    event, at a third of a frozen dataclass's cost)."""

    event_id: str
    status: Status
    reason: str | None = None
    """Why it was rejected, one line starting with the field's name."""
    field: str | None = None
    """The field that failed validation (a metric label)."""


_PENDING = Outcome("", Status.REJECTED)  # a placeholder while a batch's outcomes are filled in


class Activity(NamedTuple):
    """One stored event as the live view reads it (see :meth:`EventStore.activity`)."""

    row_id: int
    event_id: str
    user_id: str
    item_id: str
    event: str
    ts: datetime
    received_at: datetime


@dataclass(frozen=True, slots=True)
class Response:
    """One answer the server gave: what was shown, to whom, by which model."""

    recommendation_id: str
    method: str
    """``Recommend``, ``SimilarItems`` or ``Popular``."""
    user_id: str | None
    """The user asked about (``Recommend``); ``None`` for the other lists."""
    item_ids: tuple[str, ...]
    source: str
    """``personalized``, ``fold_in`` or ``popular``."""
    model_name: str
    model_version: str
    served_at: datetime
    reasons: tuple[int, ...] | None = None
    """Why each item is there (``models.ranking.Reason`` codes, the proto's ``Reason`` numbers:
    0 model, 1 boosted, 2 promoted, 3 explored); ``None`` when every item is the model's."""
    exploration_seed: int | None = None
    """The seed of the list's exploration rule, when it had one (with :attr:`exploration_day`
    and the user id, the draw can be made again: ``models.rules.draw_keys``)."""
    exploration_day: int | None = None
    """The UTC day (days since the epoch) the exploration drew for."""
    experiment: str | None = None
    """The live experiment whose arm answered (``None`` outside experiments)."""
    arm: str | None = None
    """That experiment's arm (see service/experiments.py)."""


Answer = tuple[
    str,
    str,
    str | None,
    Sequence[str],
    str,
    str,
    str,
    float,
    Sequence[int] | None,
    int | None,
    int | None,
    str | None,
    str | None,
]
"""A response as the recorder buffers it: ``(recommendation_id, method, user_id, item_ids,
source, model_name, model_version, served at in unix seconds, reasons, exploration_seed,
exploration_day, experiment, arm)`` (reasons and exploration ``None`` when the list had no such
rule; experiment and arm ``None`` outside experiments)."""


class Shown(NamedTuple):
    """One recorded answer as the live view's rotation reads it (:meth:`EventStore.shown`)."""

    row_id: int
    user_id: str | None
    """``None`` for answers without a user (``SimilarItems``, ``Popular``)."""
    item_ids: tuple[str, ...]
    """Empty for answers without a user."""
    served_at: datetime


class Erasure(NamedTuple):
    """What :meth:`EventStore.delete_user` removed."""

    user_id: str
    events: int
    responses: int
    erased_at: datetime


class Pruned(NamedTuple):
    """What :meth:`EventStore.prune` removed."""

    events: int
    responses: int


class _Rejected(Exception):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class EventRules:
    """What the store accepts: the event names and how far in the future a timestamp may be."""

    extra_events: frozenset[str] = field(default_factory=frozenset)
    """Event names accepted beside the training vocabulary, ``impression`` and ``dislike``."""
    max_future_skew: timedelta = DEFAULT_MAX_FUTURE_SKEW
    """A timestamp later than the server's clock plus this is rejected."""
    _vocabulary: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = frozenset(name.strip().lower() for name in self.extra_events)
        for name in names:
            if not name or len(name) > MAX_EVENT_NAME:
                raise InvalidInputError(
                    f"extra event names must have 1 to {MAX_EVENT_NAME} characters, got {name!r}",
                    field="extra_events",
                )
        object.__setattr__(self, "extra_events", names)
        if self.max_future_skew < timedelta(0):
            raise InvalidInputError("max_future_skew must be >= 0", field="max_future_skew")

        vocabulary = frozenset(TRAINING_EVENTS) | frozenset(FEEDBACK_EVENTS) | names
        object.__setattr__(self, "_vocabulary", vocabulary)

    @property
    def vocabulary(self) -> frozenset[str]:
        return self._vocabulary

    def check(self, ev: Event | RawEvent, now: datetime) -> Event:
        """The event as stored (timestamp in UTC, name normalized), or ``_Rejected``."""
        fields = self.fields(ev, now, now + self.max_future_skew)
        return (
            Event(*fields)
            if fields.timestamp is not None
            else Event(*fields._replace(timestamp=now))
        )

    def fields(self, ev: Event | RawEvent, now: datetime, latest: datetime) -> RawEvent:
        """:meth:`check`'s event as a :class:`RawEvent`, except that a missing timestamp stays
        ``None`` (the server's time, ``now``), or ``_Rejected``. ``latest`` is ``now`` plus the
        allowed skew, computed once per batch.

        The well-formed event most callers send (printable ASCII ids of allowed lengths, a known
        name as stored, no timestamp or a UTC one, plain numbers, no shown items) is recognised
        with a few checks, and a :class:`RawEvent` is passed on as it is; anything else takes
        the full path, which normalizes what can be and names the first field that fails.
        """
        event_id, user_id, item_id, name = ev.event_id, ev.user_id, ev.item_id, ev.event
        timestamp, value, price, rec = ev.timestamp, ev.value, ev.price, ev.recommendation_id
        if (
            type(event_id) is str
            and type(user_id) is str
            and type(item_id) is str
            and 0 < len(event_id) <= MAX_EVENT_ID
            and 0 < len(user_id) <= MAX_ID
            and 0 < len(item_id) <= MAX_ID
            and (rec is None or (type(rec) is str and 0 < len(rec) <= MAX_EVENT_ID))
            # Printable ASCII holds no NUL nor surrogate; whitespace-only ids fail isspace().
            and (joined := event_id + user_id + item_id + (rec or "")).isascii()
            and joined.isprintable()
            and not event_id.isspace()
            and not user_id.isspace()
            and not item_id.isspace()
            and (rec is None or not rec.isspace())
            and type(name) is str
            and name in self._vocabulary
            and (timestamp is None or (type(timestamp) is datetime and timestamp.tzinfo is UTC))
            and type(value) is float
            and 0.0 <= value <= _MAX_FLOAT
            and (price is None or (type(price) is float and 0.0 <= price <= _MAX_FLOAT))
            and not ev.shown_item_ids
        ):
            if timestamp is not None and timestamp > latest:
                raise _Rejected("timestamp", self._too_late(timestamp, now))
            if type(ev) is RawEvent:
                return ev
            return RawEvent(event_id, user_id, item_id, name, timestamp, value, price, rec)
        return self._full_check(ev, now)

    def _full_check(self, ev: Event | RawEvent, now: datetime) -> RawEvent:
        event_id = _identifier("event_id", ev.event_id, MAX_EVENT_ID)
        user_id = _identifier("user_id", ev.user_id, MAX_ID)
        item_id = _identifier("item_id", ev.item_id, MAX_ID)
        if not isinstance(ev.event, str):
            raise _Rejected("event", "must be a string")
        name = ev.event.strip().lower()
        if name not in self.vocabulary:
            known = ", ".join(sorted(self.vocabulary))
            raise _Rejected("event", f"unknown event {ev.event[:64]!r}; known: {known}")
        timestamp = self._timestamp(ev.timestamp, now)
        value = _amount("value", ev.value)
        price = None if ev.price is None else _amount("price", ev.price)
        recommendation_id = (
            None
            if ev.recommendation_id is None
            else _identifier("recommendation_id", ev.recommendation_id, MAX_EVENT_ID)
        )
        shown = tuple(ev.shown_item_ids)
        if shown and name != "impression":
            raise _Rejected("shown_item_ids", f"only impressions list shown items, not {name!r}")
        if len(shown) > MAX_SHOWN_ITEMS:
            raise _Rejected("shown_item_ids", f"at most {MAX_SHOWN_ITEMS} items, got {len(shown)}")
        for item in shown:
            _identifier("shown_item_ids", item, MAX_ID)
        return RawEvent(
            event_id, user_id, item_id, name, timestamp, value, price, recommendation_id, shown
        )

    def _timestamp(self, timestamp: datetime | None, now: datetime) -> datetime | None:
        if timestamp is None:
            return None
        if not isinstance(timestamp, datetime):
            raise _Rejected("timestamp", "must be a datetime")
        if timestamp.tzinfo is None or timestamp.utcoffset() is None:
            raise _Rejected("timestamp", "must be timezone-aware (UTC), got a naive datetime")
        utc = timestamp.astimezone(UTC)
        if utc > now + self.max_future_skew:
            raise _Rejected("timestamp", self._too_late(utc, now))
        return utc

    def _too_late(self, utc: datetime, now: datetime) -> str:
        return (
            f"{utc.isoformat()} is more than {self.max_future_skew} ahead of the server's "
            f"clock ({now.isoformat()})"
        )


def _identifier(field_name: str, raw: object, limit: int) -> str:
    if not isinstance(raw, str):
        raise _Rejected(field_name, f"must be a string, got {type(raw).__name__}")
    if not raw.strip():
        raise _Rejected(field_name, "must not be empty")
    if len(raw) > limit:
        raise _Rejected(field_name, f"at most {limit} characters, got {len(raw)}")
    # PostgreSQL text holds neither NUL nor unpaired surrogates; refuse them for both databases
    # so one such event cannot fail the transaction of the whole batch.
    if "\x00" in raw:
        raise _Rejected(field_name, "must not contain NUL characters")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise _Rejected(field_name, "must be valid Unicode (no unpaired surrogates)") from None
    return raw


def _amount(field_name: str, raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise _Rejected(field_name, f"must be a number, got {type(raw).__name__}")
    amount = float(raw)
    if not math.isfinite(amount) or amount < 0:
        raise _Rejected(field_name, f"must be finite and >= 0, got {raw!r}")
    return amount


# --- the schema -----------------------------------------------------------------------------


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on both databases.

    PostgreSQL keeps ``timestamptz``; SQLite keeps text without an offset, always in UTC, so the
    text sorts in time order and the offset is put back on reading.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        utc = value.astimezone(UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# An autoincrementing 64-bit key on PostgreSQL; SQLite autoincrements only INTEGER PRIMARY KEY.
_RowId = BigInteger().with_variant(Integer(), "sqlite")

_metadata = MetaData()
SCHEMA_VERSION = Table("schema_version", _metadata, Column("version", Integer, nullable=False))
EVENTS = Table(
    "events",
    _metadata,
    Column("id", _RowId, primary_key=True, autoincrement=True),
    Column("event_id", String(MAX_EVENT_ID), nullable=False, unique=True),
    Column("user_id", String(MAX_ID), nullable=False),
    Column("item_id", String(MAX_ID), nullable=False),
    Column("event", String(MAX_EVENT_NAME), nullable=False),
    Column("ts", UTCDateTime(), nullable=False),
    Column("value", Float, nullable=False),
    Column("price", Float, nullable=True),
    Column("recommendation_id", String(MAX_EVENT_ID), nullable=True),
    Column("shown_item_ids", JSON, nullable=True),
    Column("received_at", UTCDateTime(), nullable=False),
    Index("ix_events_user_ts", "user_id", "ts"),
    Index("ix_events_ts", "ts"),
    Index("ix_events_received", "received_at"),
)
"""The latest shape of the events table; the queries use it, the migrations build it."""
RESPONSES = Table(
    "responses",
    _metadata,
    Column("id", _RowId, primary_key=True, autoincrement=True),
    Column("recommendation_id", String(MAX_EVENT_ID), nullable=False, unique=True),
    Column("method", String(32), nullable=False),
    Column("user_id", String(MAX_ID), nullable=True),
    Column("item_ids", JSON, nullable=False),
    Column("source", String(32), nullable=False),
    Column("model_name", String(MAX_ID), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("served_at", UTCDateTime(), nullable=False),
    Column("reasons", JSON, nullable=True),
    Column("exploration_seed", BigInteger, nullable=True),
    Column("exploration_day", Integer, nullable=True),
    Column("experiment", String(MAX_ID), nullable=True),
    Column("arm", String(MAX_ID), nullable=True),
    Index("ix_responses_user", "user_id"),
    Index("ix_responses_served", "served_at"),
    Index("ix_responses_experiment", "experiment", "arm"),
)
"""Every answer of ``Recommend``, ``SimilarItems`` and ``Popular``: the impressions that
attribution and click-through rates join events to, by ``recommendation_id``. ``reasons`` is a
JSON list of one ``Reason`` code per item (0 model, 1 boosted, 2 promoted, 3 explored), NULL
when every item is the model's; ``exploration_seed`` and ``exploration_day`` are set for lists
made with an exploration rule (see :class:`Response`); ``experiment`` and ``arm`` name the live
experiment and arm that answered (NULL outside experiments; ``method`` ``shadow`` for a shadow
arm's list, recorded but never shown)."""
EXPERIMENTS = Table(
    "experiments",
    _metadata,
    Column("name", String(MAX_ID), primary_key=True),
    Column("config", JSON, nullable=False),
    Column("status", String(16), nullable=False),
    Column("revision", Integer, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)
"""Live experiments (service/experiments.py): the validated configuration as JSON (arms, shares,
salt, the bucket allocation), ``running`` or ``stopped``, and a revision every change increments
so workers polling the table pick up each change once."""
ERASURES = Table(
    "erasures",
    _metadata,
    Column("user_id", String(MAX_ID), primary_key=True),
    Column("erased_at", UTCDateTime(), nullable=False),
    Index("ix_erasures_at", "erased_at"),
)
"""Users erased on request (``DeleteUser``) and when: every worker forgets them, and training
drops their older rows from log files too."""
USER_SEGMENTS = Table(
    "user_segments",
    _metadata,
    Column("user_id", String(MAX_ID), primary_key=True),
    Column("stage", String(32), nullable=False),
    Column("stage_since", UTCDateTime(), nullable=False),
    Column("tier", String(64), nullable=False),
    Column("recency_score", Integer, nullable=False),
    Column("frequency_score", Integer, nullable=False),
    Column("monetary_score", Integer, nullable=False),
    Column("recency_days", Integer, nullable=False),
    Column("frequency", Integer, nullable=False),
    Column("monetary", Float, nullable=False),
    Column("first_seen", UTCDateTime(), nullable=False),
    Column("last_seen", UTCDateTime(), nullable=False),
    Column("activated_at", UTCDateTime(), nullable=True),
    Column("as_of", UTCDateTime(), nullable=False),
    Column("computed_at", UTCDateTime(), nullable=False),
    Column("profile", JSON, nullable=True),
    Column("previous_stage", String(32), nullable=True),
    Index("ix_user_segments_stage", "stage"),
    Index("ix_user_segments_tier", "tier"),
)
"""Each user's lifecycle stage and value tier as of the last ``affinity segments``
(affinity/segments.py, models/lifecycle.py): replaced whole by each computation, so an erased
user is gone from it after the next one."""
SEGMENT_HISTORY = Table(
    "segment_history",
    _metadata,
    Column("as_of", UTCDateTime(), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("name", String(64), primary_key=True),
    Column("users", Integer, nullable=False),
    Column("computed_at", UTCDateTime(), nullable=False),
)
"""How many users each stage (``kind`` ``stage``) and tier (``tier``) held at each computation's
reference time: the sizes over time."""
SEGMENT_RUNS = Table(
    "segment_runs",
    _metadata,
    Column("as_of", UTCDateTime(), primary_key=True),
    Column("computed_at", UTCDateTime(), nullable=False),
    Column("users", Integer, nullable=False),
    Column("config", JSON, nullable=False),
    Column("cut_points", JSON, nullable=False),
)
"""Each ``affinity segments`` computation: its configuration and the score cut points of its
population (a user first seen later is scored against them)."""
AUDIENCES = Table(
    "audiences",
    _metadata,
    Column("id", _RowId, primary_key=True, autoincrement=True),
    Column("name", String(MAX_ID), nullable=False),
    Column("definition", JSON, nullable=False),
    Column("users", Integer, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)
"""Recorded audiences (``FindAudience`` with ``record``, ``affinity audience``): the request that
made each one and its size."""
AUDIENCE_MEMBERS = Table(
    "audience_members",
    _metadata,
    Column("audience_id", _RowId, primary_key=True),
    Column("user_id", String(MAX_ID), primary_key=True),
    Column("score", Float, nullable=False),
    Column("rank", Integer, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Index("ix_audience_members_user", "user_id", "created_at"),
)
"""Who entered which recorded audience, when: the frequency cap counts a user's rows."""


def _migration_1_events(conn: Connection) -> None:
    """The events table with its unique event_id and its (user, time) and time indexes."""
    # Built from a copy of the table as it was at version 1: a later migration changes EVENTS
    # and adds a step, it never edits this one.
    snapshot = MetaData()
    Table(
        "events",
        snapshot,
        Column("id", _RowId, primary_key=True, autoincrement=True),
        Column("event_id", String(MAX_EVENT_ID), nullable=False, unique=True),
        Column("user_id", String(MAX_ID), nullable=False),
        Column("item_id", String(MAX_ID), nullable=False),
        Column("event", String(MAX_EVENT_NAME), nullable=False),
        Column("ts", UTCDateTime(), nullable=False),
        Column("value", Float, nullable=False),
        Column("price", Float, nullable=True),
        Column("recommendation_id", String(MAX_EVENT_ID), nullable=True),
        Column("shown_item_ids", JSON, nullable=True),
        Column("received_at", UTCDateTime(), nullable=False),
        Index("ix_events_user_ts", "user_id", "ts"),
        Index("ix_events_ts", "ts"),
    )
    snapshot.create_all(conn)


def _migration_2_responses_erasures(conn: Connection) -> None:
    """Recorded responses, erasures, and an index on events.received_at (live tailing)."""
    snapshot = MetaData()
    Table(
        "responses",
        snapshot,
        Column("id", _RowId, primary_key=True, autoincrement=True),
        Column("recommendation_id", String(MAX_EVENT_ID), nullable=False, unique=True),
        Column("method", String(32), nullable=False),
        Column("user_id", String(MAX_ID), nullable=True),
        Column("item_ids", JSON, nullable=False),
        Column("source", String(32), nullable=False),
        Column("model_name", String(MAX_ID), nullable=False),
        Column("model_version", String(64), nullable=False),
        Column("served_at", UTCDateTime(), nullable=False),
        Index("ix_responses_user", "user_id"),
        Index("ix_responses_served", "served_at"),
    )
    Table(
        "erasures",
        snapshot,
        Column("user_id", String(MAX_ID), primary_key=True),
        Column("erased_at", UTCDateTime(), nullable=False),
        Index("ix_erasures_at", "erased_at"),
    )
    snapshot.create_all(conn)
    conn.execute(text("CREATE INDEX ix_events_received ON events (received_at)"))


def _migration_3_response_reasons(conn: Connection) -> None:
    """Each recorded answer's reasons and exploration seed and day (ranking rules)."""
    for column, kind in (
        ("reasons", "JSON"),
        ("exploration_seed", "BIGINT"),
        ("exploration_day", "INTEGER"),
    ):
        conn.execute(text(f"ALTER TABLE responses ADD COLUMN {column} {kind}"))


def _migration_4_experiments(conn: Connection) -> None:
    """Live experiments, and the experiment and arm of each recorded answer."""
    snapshot = MetaData()
    Table(
        "experiments",
        snapshot,
        Column("name", String(MAX_ID), primary_key=True),
        Column("config", JSON, nullable=False),
        Column("status", String(16), nullable=False),
        Column("revision", Integer, nullable=False),
        Column("created_at", UTCDateTime(), nullable=False),
        Column("updated_at", UTCDateTime(), nullable=False),
    )
    snapshot.create_all(conn)
    for column in ("experiment", "arm"):
        conn.execute(text(f"ALTER TABLE responses ADD COLUMN {column} VARCHAR({MAX_ID})"))
    conn.execute(text("CREATE INDEX ix_responses_experiment ON responses (experiment, arm)"))


def _migration_5_segments(conn: Connection) -> None:
    """Users' lifecycle stages and value tiers, and the segment sizes over time."""
    snapshot = MetaData()
    Table(
        "user_segments",
        snapshot,
        Column("user_id", String(MAX_ID), primary_key=True),
        Column("stage", String(32), nullable=False),
        Column("stage_since", UTCDateTime(), nullable=False),
        Column("tier", String(64), nullable=False),
        Column("recency_score", Integer, nullable=False),
        Column("frequency_score", Integer, nullable=False),
        Column("monetary_score", Integer, nullable=False),
        Column("recency_days", Integer, nullable=False),
        Column("frequency", Integer, nullable=False),
        Column("monetary", Float, nullable=False),
        Column("first_seen", UTCDateTime(), nullable=False),
        Column("last_seen", UTCDateTime(), nullable=False),
        Column("activated_at", UTCDateTime(), nullable=True),
        Column("as_of", UTCDateTime(), nullable=False),
        Column("computed_at", UTCDateTime(), nullable=False),
        Index("ix_user_segments_stage", "stage"),
        Index("ix_user_segments_tier", "tier"),
    )
    Table(
        "segment_history",
        snapshot,
        Column("as_of", UTCDateTime(), primary_key=True),
        Column("kind", String(16), primary_key=True),
        Column("name", String(64), primary_key=True),
        Column("users", Integer, nullable=False),
        Column("computed_at", UTCDateTime(), nullable=False),
    )
    snapshot.create_all(conn)


def _migration_6_profiles(conn: Connection) -> None:
    """Each user's profile aggregates beside their segment, and each computation's score cut
    points (so a user who arrives later is scored against the same population)."""
    conn.execute(text("ALTER TABLE user_segments ADD COLUMN profile JSON"))
    snapshot = MetaData()
    Table(
        "segment_runs",
        snapshot,
        Column("as_of", UTCDateTime(), primary_key=True),
        Column("computed_at", UTCDateTime(), nullable=False),
        Column("users", Integer, nullable=False),
        Column("config", JSON, nullable=False),
        Column("cut_points", JSON, nullable=False),
    )
    snapshot.create_all(conn)


def _migration_7_audiences(conn: Connection) -> None:
    """Recorded audiences and their members (the frequency cap counts them)."""
    snapshot = MetaData()
    Table(
        "audiences",
        snapshot,
        Column("id", _RowId, primary_key=True, autoincrement=True),
        Column("name", String(MAX_ID), nullable=False),
        Column("definition", JSON, nullable=False),
        Column("users", Integer, nullable=False),
        Column("created_at", UTCDateTime(), nullable=False),
    )
    Table(
        "audience_members",
        snapshot,
        Column("audience_id", _RowId, primary_key=True),
        Column("user_id", String(MAX_ID), primary_key=True),
        Column("score", Float, nullable=False),
        Column("rank", Integer, nullable=False),
        Column("created_at", UTCDateTime(), nullable=False),
        Index("ix_audience_members_user", "user_id", "created_at"),
    )
    snapshot.create_all(conn)


def _migration_8_previous_stage(conn: Connection) -> None:
    """Each user's stage at the computation before (NULL for users it did not have), so the
    transition matrix's cells can list their users."""
    conn.execute(text("ALTER TABLE user_segments ADD COLUMN previous_stage VARCHAR(32)"))


MIGRATIONS: tuple[Callable[[Connection], None], ...] = (
    _migration_1_events,
    _migration_2_responses_erasures,
    _migration_3_response_reasons,
    _migration_4_experiments,
    _migration_5_segments,
    _migration_6_profiles,
    _migration_7_audiences,
    _migration_8_previous_stage,
)
"""The schema's history: step ``i`` (from 0) takes a database from version ``i`` to ``i + 1``."""
LATEST_VERSION = len(MIGRATIONS)


# --- the store ------------------------------------------------------------------------------


class EventStore:
    """Events in a SQLite file or a PostgreSQL database; open one with :meth:`open`."""

    def __init__(self, engine: Engine, rules: EventRules) -> None:
        self._engine = engine
        self.rules = rules
        # SQLite: appends write on one connection of their own, one at a time (the database takes
        # one writer at a time anyway), so its page cache stays warm from one append to the
        # next; another connection's cache is dropped whenever the file changed since its last
        # use. Opened on first use, dropped after a failure.
        self._writer: Connection | None = None
        self._writer_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        uri: str | None = None,
        *,
        rules: EventRules | None = None,
        busy_timeout: timedelta = timedelta(seconds=30),
    ) -> EventStore:
        """Connect to ``uri`` (default :func:`events_uri`) and bring its schema up to date.

        Raises ``InvalidInputError`` for a URI that is not SQLite or PostgreSQL,
        ``UnsupportedSchemaError`` for a database written by a newer build, ``StoreError`` for
        one that cannot be reached or written.
        """
        engine = _create_engine(uri or events_uri(), busy_timeout)
        try:
            _migrate(engine)
        except SQLAlchemyError as exc:
            engine.dispose()
            where = engine.url.render_as_string(hide_password=True)
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise StoreError(f"cannot open the event store {where}: {reason}") from exc
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, rules or EventRules())

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for read-only reports over the tables, such as attribution)."""
        return self._engine

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._engine.dialect.name

    def close(self) -> None:
        with self._writer_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        self._engine.dispose()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def schema_version(self) -> int:
        with self._engine.connect() as conn:
            return _read_version(conn)

    def append(
        self,
        events: Sequence[Event | RawEvent],
        *,
        now: datetime | None = None,
        stored: list[Activity | None] | None = None,
    ) -> list[Outcome]:
        """Validate and store a batch; one outcome per event, in order.

        The accepted events are committed when this returns. A repeated ``event_id`` (already
        stored, or earlier in the same batch) is a duplicate and stored once. Raises
        :class:`StoreError` when the database cannot commit (unreachable, locked past the busy
        timeout): then nothing of the batch is acknowledged and the caller retries it as it is.

        With ``stored``, one entry per event is added to it: each accepted event as now stored
        (its row id, normalized name and time: what the live view applies), ``None`` for the
        others.
        """
        now = (now or datetime.now(UTC)).astimezone(UTC)
        fields = self.rules.fields
        latest = now + self.rules.max_future_skew
        n = len(events)
        outcomes: list[Outcome] = [_PENDING] * n
        first: dict[str, int] = {}  # event_id -> index of its first valid occurrence
        valid: list[RawEvent] = []  # those first occurrences, in order
        rejected: Counter[str] = Counter()
        for i, raw in enumerate(events):
            try:
                ev = fields(raw, now, latest)
            except _Rejected as exc:
                outcomes[i] = Outcome(_printable_id(raw), Status.REJECTED, str(exc), exc.field)
                rejected[exc.field] += 1
                continue
            event_id = ev.event_id
            if event_id in first:
                outcomes[i] = Outcome(event_id, Status.DUPLICATE)
                continue
            first[event_id] = i
            valid.append(ev)
        row_ids = self._insert(valid, now) if valid else {}
        rows: list[Activity | None] = [None] * n if stored is not None else []
        for ev, i in zip(valid, first.values(), strict=True):
            row_id = row_ids.get(ev.event_id)
            if row_id is None:
                outcomes[i] = Outcome(ev.event_id, Status.DUPLICATE)
                continue
            outcomes[i] = Outcome(ev.event_id, Status.ACCEPTED)
            if stored is not None:
                ts = ev.timestamp or now
                rows[i] = Activity(row_id, ev.event_id, ev.user_id, ev.item_id, ev.event, ts, now)
        if stored is not None:
            stored += rows
        accepted = len(row_ids)
        _count(accepted, n - accepted - rejected.total(), rejected)
        return outcomes

    def _insert(self, events: list[RawEvent], now: datetime) -> dict[str, int]:
        """Store the events (valid, distinct ids) that are new, in one transaction; returns the
        row id of each one stored, by event id (the others were stored before)."""
        try:
            if self.dialect == "postgresql":
                with self._write() as conn:
                    return _insert_postgresql(conn, events, now)
            with self._writer_lock:
                writer = self._writer
                if writer is None:
                    writer = self._engine.connect().execution_options(affinity_write=True)
                    self._writer = writer
                try:
                    with writer.begin():  # BEGIN IMMEDIATE
                        return _insert_sqlite(writer, events, now)
                except BaseException:
                    self._writer = None
                    writer.close()
                    raise
        except (SQLAlchemyError, sqlite3.Error) as exc:
            # The driver's message may hold the statement, its rows or the host: logged, not sent.
            logger.warning("event store: append of %d events failed: %s", len(events), exc)
            raise StoreError(
                f"the event store could not commit the events ({type(exc).__name__}); "
                "nothing was stored as acknowledged: retry with the same event ids"
            ) from exc

    def events_for_user(
        self, user_id: str, *, since: datetime | None = None, limit: int = DEFAULT_LIMIT
    ) -> list[Event]:
        """A user's events, newest first; only those at or after ``since`` when given."""
        if limit < 1:
            raise InvalidInputError("limit must be >= 1", field="limit")
        stmt = select(EVENTS).where(EVENTS.c.user_id == user_id)
        if since is not None:
            stmt = stmt.where(EVENTS.c.ts >= _aware("since", since))
        stmt = stmt.order_by(EVENTS.c.ts.desc(), EVENTS.c.id.desc()).limit(limit)
        with self._engine.connect() as conn:
            return [_event(row) for row in conn.execute(stmt).mappings()]

    def count(self) -> int:
        """How many events are stored."""
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(EVENTS)).scalar_one())

    def delete_user(self, user_id: str, *, now: datetime | None = None) -> Erasure:
        """Erase ``user_id``: their events, recorded responses and segment go, in one
        transaction, and the erasure is kept (``erasures``) so every worker forgets the user
        and training drops their older rows from log files. Returns what was removed."""
        user_id = _checked_user(user_id)
        erased_at = (now or datetime.now(UTC)).astimezone(UTC)
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        upsert = insert(ERASURES).values(user_id=user_id, erased_at=erased_at)
        upsert = upsert.on_conflict_do_update(
            index_elements=["user_id"], set_={"erased_at": upsert.excluded.erased_at}
        )
        with self._write() as conn:
            events = conn.execute(delete(EVENTS).where(EVENTS.c.user_id == user_id)).rowcount
            responses = conn.execute(
                delete(RESPONSES).where(RESPONSES.c.user_id == user_id)
            ).rowcount
            # Their stage, tier, profile and audience memberships are personal data too.
            conn.execute(delete(USER_SEGMENTS).where(USER_SEGMENTS.c.user_id == user_id))
            conn.execute(delete(AUDIENCE_MEMBERS).where(AUDIENCE_MEMBERS.c.user_id == user_id))
            conn.execute(upsert)
        logger.info(
            "erased user: %d events and %d responses removed",
            events,
            responses,
            extra={"erased_events": events, "erased_responses": responses},
        )
        return Erasure(user_id, events, responses, erased_at)

    def delete_responses(self, user_id: str, served_before: datetime) -> int:
        """Remove ``user_id``'s responses served before ``served_before`` (an erasure's second
        sweep, for answers other workers were still recording); returns how many."""
        with self._write() as conn:
            return int(
                conn.execute(
                    delete(RESPONSES).where(
                        (RESPONSES.c.user_id == user_id)
                        & (RESPONSES.c.served_at <= _aware("served_before", served_before))
                    )
                ).rowcount
            )

    def erasures(self, since: datetime | None = None) -> dict[str, datetime]:
        """Erased users and when, all of them or those erased at or after ``since``."""
        stmt = select(ERASURES.c.user_id, ERASURES.c.erased_at)
        if since is not None:
            stmt = stmt.where(ERASURES.c.erased_at >= _aware("since", since))
        with self._engine.connect() as conn:
            return {row.user_id: row.erased_at for row in conn.execute(stmt)}

    def prune(self, older_than: datetime) -> Pruned:
        """Remove events that happened, and responses served, before ``older_than``."""
        cutoff = _aware("older_than", older_than)
        with self._write() as conn:
            events = conn.execute(delete(EVENTS).where(EVENTS.c.ts < cutoff)).rowcount
            responses = conn.execute(
                delete(RESPONSES).where(RESPONSES.c.served_at < cutoff)
            ).rowcount
        logger.info(
            "pruned %d events and %d responses older than %s",
            events,
            responses,
            cutoff.isoformat(),
        )
        return Pruned(events, responses)

    def activity(
        self,
        *,
        after_id: int = 0,
        ids: Sequence[int] = (),
        received_since: datetime | None = None,
        upto_id: int | None = None,
        limit: int = 50_000,
    ) -> list[Activity]:
        """Stored events by row id, oldest first: those after ``after_id`` (up to ``upto_id``,
        and received at or after ``received_since``, when given), plus the rows ``ids`` (gaps
        the live view re-checks).

        At most ``limit`` rows; ask again from the last row's id for more.
        """
        cond = EVENTS.c.id > after_id
        if upto_id is not None:
            cond = cond & (EVENTS.c.id <= upto_id)
        if received_since is not None:
            cond = cond & (EVENTS.c.received_at >= _aware("received_since", received_since))
        if ids:
            cond = cond | EVENTS.c.id.in_(list(ids))
        stmt = (
            select(
                EVENTS.c.id,
                EVENTS.c.event_id,
                EVENTS.c.user_id,
                EVENTS.c.item_id,
                EVENTS.c.event,
                EVENTS.c.ts,
                EVENTS.c.received_at,
            )
            .where(cond)
            .order_by(EVENTS.c.id)
            .limit(limit)
        )
        with self._engine.connect() as conn:
            return [Activity(*row) for row in conn.execute(stmt)]

    def newest_row_id(self) -> int:
        """The largest row id of the events table (0 when empty): where a tail starts."""
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.max(EVENTS.c.id))).scalar() or 0)

    def shown(
        self,
        *,
        after_id: int = 0,
        ids: Sequence[int] = (),
        served_since: datetime | None = None,
        upto_id: int | None = None,
        limit: int = 50_000,
    ) -> list[Shown]:
        """Recorded answers by row id, oldest first, as the live view's rotation tails them
        (:meth:`activity`'s twin over ``responses``): those after ``after_id`` (up to
        ``upto_id``, served at or after ``served_since``, when given), plus the rows ``ids``.
        Answers without a user come back without their items (nothing to parse)."""
        cond = RESPONSES.c.id > after_id
        if upto_id is not None:
            cond = cond & (RESPONSES.c.id <= upto_id)
        if served_since is not None:
            cond = cond & (RESPONSES.c.served_at >= _aware("served_since", served_since))
        if ids:
            cond = cond | RESPONSES.c.id.in_(list(ids))
        items = case((RESPONSES.c.user_id.is_(None), None), else_=RESPONSES.c.item_ids)
        stmt = (
            select(RESPONSES.c.id, RESPONSES.c.user_id, items, RESPONSES.c.served_at)
            .where(cond)
            .order_by(RESPONSES.c.id)
            .limit(limit)
        )
        out: list[Shown] = []
        with self._engine.connect() as conn:
            for row_id, user_id, shown, served_at in conn.execute(stmt):
                if isinstance(shown, str):
                    shown = json.loads(shown)
                out.append(Shown(row_id, user_id, tuple(shown or ()), served_at))
        return out

    def newest_response_id(self) -> int:
        """The largest row id of the responses table (0 when empty): where its tail starts."""
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.max(RESPONSES.c.id))).scalar() or 0)

    def iter_events(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        batch_size: int = 10_000,
    ) -> Iterator[list[dict[str, Any]]]:
        """Every stored event with ``since <= ts < until``, in batches of row dicts (the
        columns of ``events`` but ``id``), in storage order: for export and training.

        Pages by row id, so a large store is read in bounded memory and a batch appended
        meanwhile is either read whole or not at all.
        """
        if batch_size < 1:
            raise InvalidInputError("batch_size must be >= 1", field="batch_size")
        columns = [c for c in EVENTS.c if c.name != "id"]
        after = 0
        while True:
            stmt = select(EVENTS.c.id, *columns).where(EVENTS.c.id > after)
            if since is not None:
                stmt = stmt.where(EVENTS.c.ts >= _aware("since", since))
            if until is not None:
                stmt = stmt.where(EVENTS.c.ts < _aware("until", until))
            stmt = stmt.order_by(EVENTS.c.id).limit(batch_size)
            with self._engine.connect() as conn:
                rows = [dict(row) for row in conn.execute(stmt).mappings()]
            if not rows:
                return
            after = rows[-1]["id"]
            for row in rows:
                del row["id"]
                shown = row["shown_item_ids"]
                if isinstance(shown, str):
                    row["shown_item_ids"] = json.loads(shown)
            yield rows

    def record_responses(self, responses: Sequence[Response]) -> int:
        """Store answers the server gave; returns how many were new (a repeated
        ``recommendation_id`` is stored once). Raises :class:`StoreError` when it cannot."""
        return self.record_answers(
            [
                (
                    r.recommendation_id,
                    r.method,
                    r.user_id,
                    r.item_ids,
                    r.source,
                    r.model_name,
                    r.model_version,
                    r.served_at.timestamp(),
                    r.reasons,
                    r.exploration_seed,
                    r.exploration_day,
                    r.experiment,
                    r.arm,
                )
                for r in responses
            ]
        )

    def record_answers(self, answers: Sequence[Answer]) -> int:
        """:meth:`record_responses` of plain tuples (the recorder's buffer), without building
        objects or SQLAlchemy's per-row processing: this runs beside the requests, and every
        microsecond it holds the interpreter is one they wait. Returns how many were new."""
        if not answers:
            return 0
        rows = sorted(answers, key=_answer_key)  # one lock order for every writer (PostgreSQL)
        try:
            if self.dialect == "postgresql":
                with self._write() as conn:
                    return _record_postgresql(conn, rows)
            with self._writer_lock:
                writer = self._writer
                if writer is None:
                    writer = self._engine.connect().execution_options(affinity_write=True)
                    self._writer = writer
                try:
                    with writer.begin():  # BEGIN IMMEDIATE
                        return _record_sqlite(writer, rows)
                except BaseException:
                    self._writer = None
                    writer.close()
                    raise
        except (SQLAlchemyError, sqlite3.Error) as exc:
            logger.warning("event store: recording %d responses failed: %s", len(rows), exc)
            raise StoreError(
                f"the event store could not record the responses ({type(exc).__name__})"
            ) from exc

    def responses_for_user(self, user_id: str, *, limit: int = DEFAULT_LIMIT) -> list[Response]:
        """The answers recorded for ``user_id``, newest first."""
        stmt = (
            select(RESPONSES)
            .where(RESPONSES.c.user_id == user_id)
            .order_by(RESPONSES.c.served_at.desc(), RESPONSES.c.id.desc())
            .limit(limit)
        )
        with self._engine.connect() as conn:
            return [_response(row) for row in conn.execute(stmt).mappings()]

    def response(self, recommendation_id: str) -> Response | None:
        """The recorded answer ``recommendation_id``, if any."""
        stmt = select(RESPONSES).where(RESPONSES.c.recommendation_id == recommendation_id)
        with self._engine.connect() as conn:
            row = conn.execute(stmt).mappings().first()
        return None if row is None else _response(row)

    def _write(self) -> Any:
        return _write(self._engine)


def _write(engine: Engine) -> Any:
    """A write transaction (``BEGIN IMMEDIATE`` on SQLite: it waits for the lock up front)."""
    return engine.execution_options(affinity_write=True).begin()


def _checked_user(user_id: object) -> str:
    try:
        return _identifier("user_id", user_id, MAX_ID)
    except _Rejected as exc:
        raise InvalidInputError(str(exc), field="user_id") from None


def _response(row: Any) -> Response:
    items = row["item_ids"]
    if isinstance(items, str):
        items = json.loads(items)
    reasons = row["reasons"]
    if isinstance(reasons, str):
        reasons = json.loads(reasons)
    return Response(
        recommendation_id=row["recommendation_id"],
        method=row["method"],
        user_id=row["user_id"],
        item_ids=tuple(items),
        source=row["source"],
        model_name=row["model_name"],
        model_version=row["model_version"],
        served_at=row["served_at"],
        reasons=None if reasons is None else tuple(reasons),
        exploration_seed=row["exploration_seed"],
        exploration_day=row["exploration_day"],
        experiment=row["experiment"],
        arm=row["arm"],
    )


def _printable_id(raw: Event | RawEvent) -> str:
    event_id = raw.event_id
    return event_id[:MAX_EVENT_ID] if isinstance(event_id, str) else ""


def _aware(name: str, when: datetime) -> datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        raise InvalidInputError(f"{name} must be timezone-aware", field=name)
    return when.astimezone(UTC)


# The events' columns as the append path writes them, in this order.
_INSERT_COLUMNS = (
    '"event_id", "user_id", "item_id", "event", "ts", "value", "price", "recommendation_id", '
    '"shown_item_ids", "received_at"'
)
# Rows per INSERT statement, largest first: a batch goes in as few statements as these sizes
# make up, each with at most 640 bound values (under every SQLite build's limit). The driver
# releases the interpreter lock around each statement; executed row by row (executemany) it
# would release it and wait to take it back, behind the request threads, for every row.
_SQLITE_ROWS = (64, 16, 4, 1)
_SQLITE_INSERTS = {
    n: f"INSERT INTO events ({_INSERT_COLUMNS}) VALUES "
    + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * n)
    for n in _SQLITE_ROWS
}
_SQLITE_COLUMNS = 10
# Event ids per "IN (...)" query: under every SQLite build's limit on bound parameters.
_SQLITE_IN = 500
_POSTGRESQL_INSERT = (
    f"INSERT INTO events ({_INSERT_COLUMNS}) "
    "SELECT e, u, i, n, t, v, p, r, s::json, %s::timestamptz FROM unnest("
    "%s::text[], %s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::float8[], "
    "%s::float8[], %s::text[], %s::text[]) AS x(e, u, i, n, t, v, p, r, s) "
    "ON CONFLICT (event_id) DO NOTHING RETURNING event_id, id"
)


def _sqlite_in(n: int) -> str:
    return f"SELECT event_id, id FROM events WHERE event_id IN ({', '.join('?' * n)})"


def _json_ids(ids: Sequence[str]) -> str:
    """``json.dumps(list(ids))``, the same text, about twice as fast for a list of strings:
    the recorder writes one per answer, beside the requests."""
    try:
        return "[" + ", ".join(map(_json_string, ids)) + "]"
    except TypeError:  # not all strings: the general encoder
        return json.dumps(list(ids))


def _json_codes(codes: Sequence[int]) -> str:
    """``json.dumps(list(codes))`` for the reason codes of an answer (small integers)."""
    if all(type(code) is int for code in codes):
        return "[" + ", ".join(map(str, codes)) + "]"
    return json.dumps(list(codes))


def _sqlite_time(when: datetime) -> str:
    """``when`` (UTC) as the events table holds it on SQLite: what ``UTCDateTime`` binds
    (naive UTC in SQLAlchemy's SQLite ``DATETIME`` format, ``2025-03-01 12:00:00.000000``)."""
    return when.isoformat(" ", "microseconds")[:26]


def _shown_json(ev: RawEvent) -> str:
    """The ``shown_item_ids`` column as the ``JSON`` type writes it: the list of an impression,
    JSON ``null`` for any other event."""
    return json.dumps(list(ev.shown_item_ids)) if ev.event == "impression" else "null"


def _insert_sqlite(conn: Connection, events: list[RawEvent], now: datetime) -> dict[str, int]:
    """The SQLite half of :meth:`EventStore._insert`, inside its ``BEGIN IMMEDIATE``.

    That transaction holds the database's write lock from its start, so no other process can
    store an event between the query for the ids already there and the insert of the others:
    plain multi-row ``INSERT`` statements on the driver's cursor, without SQLAlchemy's per-row
    parameter processing. A new row's id is one more than the largest before it, so the rows of
    one transaction get consecutive ids in insertion order (checked; else read back).
    """
    cursor = conn.connection.cursor()
    try:
        existing: set[str] = set()
        ids = [ev.event_id for ev in events]
        for start in range(0, len(ids), _SQLITE_IN):
            chunk = ids[start : start + _SQLITE_IN]
            existing.update(row[0] for row in cursor.execute(_sqlite_in(len(chunk)), chunk))
        new = [ev for ev in events if ev.event_id not in existing] if existing else events
        if not new:
            return {}
        received = _sqlite_time(now)
        values: list[Any] = []  # the rows' values, one after the other
        for ev in new:
            values += (
                ev.event_id,
                ev.user_id,
                ev.item_id,
                ev.event,
                received if ev.timestamp is None else _sqlite_time(ev.timestamp),
                ev.value,
                ev.price,
                ev.recommendation_id,
                "null" if ev.event != "impression" else _shown_json(ev),
                received,
            )
        before = cursor.execute("SELECT max(id) FROM events").fetchone()[0] or 0
        done = 0
        for size in _SQLITE_ROWS:
            statement, width = _SQLITE_INSERTS[size], size * _SQLITE_COLUMNS
            while len(new) - done >= size:
                start = done * _SQLITE_COLUMNS
                cursor.execute(statement, values[start : start + width])
                done += size
        last = cursor.execute("SELECT last_insert_rowid()").fetchone()[0] or 0
        if last - before == len(new):
            return {
                ev.event_id: row_id
                for ev, row_id in zip(new, range(before + 1, last + 1), strict=True)
            }
        stored: dict[str, int] = {}  # ids not handed out in order (the largest id was taken)
        for start in range(0, len(new), _SQLITE_IN):
            chunk = [ev.event_id for ev in new[start : start + _SQLITE_IN]]
            stored.update((row[0], row[1]) for row in cursor.execute(_sqlite_in(len(chunk)), chunk))
        return stored
    finally:
        cursor.close()


_ANSWER_COLUMNS = (
    "recommendation_id, method, user_id, item_ids, source, model_name, model_version, served_at, "
    "reasons, exploration_seed, exploration_day, experiment, arm"
)
_ANSWER_ROWS = 76
"""Answers per multi-row ``INSERT`` on SQLite (13 parameters each: 988, under the 999 bound
parameters of the oldest SQLite builds)."""


def _answer_key(answer: Answer) -> str:
    return answer[0]


def _sqlite_answers(n: int) -> str:
    one = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    return f"INSERT OR IGNORE INTO responses ({_ANSWER_COLUMNS}) VALUES {', '.join([one] * n)}"


def _record_sqlite(conn: Connection, rows: list[Answer]) -> int:
    """The SQLite half of :meth:`EventStore.record_answers`, inside its ``BEGIN IMMEDIATE``."""
    cursor = conn.connection.cursor()
    try:
        changed = 0
        for start in range(0, len(rows), _ANSWER_ROWS):
            chunk = rows[start : start + _ANSWER_ROWS]
            values: list[Any] = []
            for row in chunk:
                rec_id, method, user_id, items, source, name, version, at, why, seed, day = row[:11]
                served = datetime.fromtimestamp(at, UTC)
                values += (
                    rec_id,
                    method,
                    user_id,
                    _json_ids(items),
                    source,
                    name,
                    version,
                    _sqlite_time(served),
                    None if why is None else _json_codes(why),
                    seed,
                    day,
                    row[11],
                    row[12],
                )
            cursor.execute(_sqlite_answers(len(chunk)), values)
            changed += cursor.rowcount
        return changed
    finally:
        cursor.close()


_POSTGRESQL_ANSWERS = (
    f"INSERT INTO responses ({_ANSWER_COLUMNS}) "
    "SELECT r, m, u, i::json, s, n, v, t, w::json, e, d, g, a FROM unnest("
    "%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], "
    "%s::timestamptz[], %s::text[], %s::bigint[], %s::int[], %s::text[], %s::text[]) "
    "AS x(r, m, u, i, s, n, v, t, w, e, d, g, a) "
    "ON CONFLICT (recommendation_id) DO NOTHING"
)


def _record_postgresql(conn: Connection, rows: list[Answer]) -> int:
    columns = (
        [row[0] for row in rows],
        [row[1] for row in rows],
        [row[2] for row in rows],
        [_json_ids(row[3]) for row in rows],
        [row[4] for row in rows],
        [row[5] for row in rows],
        [row[6] for row in rows],
        [datetime.fromtimestamp(row[7], UTC) for row in rows],
        [None if row[8] is None else _json_codes(row[8]) for row in rows],
        [row[9] for row in rows],
        [row[10] for row in rows],
        [row[11] for row in rows],
        [row[12] for row in rows],
    )
    return int(conn.exec_driver_sql(_POSTGRESQL_ANSWERS, columns).rowcount or 0)


def _insert_postgresql(conn: Connection, events: list[RawEvent], now: datetime) -> dict[str, int]:
    """The PostgreSQL half of :meth:`EventStore._insert`: one statement, the columns as arrays
    (``unnest``), ``ON CONFLICT DO NOTHING RETURNING``: the ids returned are the new events, even
    when another host stored some of the same ids a moment before."""
    # One lock order for every writer: two transactions inserting the same ids in different
    # orders would otherwise deadlock on the unique index.
    ordered = sorted(events, key=lambda ev: ev.event_id)
    columns = (
        [ev.event_id for ev in ordered],
        [ev.user_id for ev in ordered],
        [ev.item_id for ev in ordered],
        [ev.event for ev in ordered],
        [ev.timestamp or now for ev in ordered],
        [ev.value for ev in ordered],
        [ev.price for ev in ordered],
        [ev.recommendation_id for ev in ordered],
        [_shown_json(ev) for ev in ordered],
    )
    result = conn.exec_driver_sql(_POSTGRESQL_INSERT, (now, *columns))
    return {event_id: row_id for event_id, row_id in result}


def _count(accepted: int, duplicates: int, rejected: Counter[str]) -> None:
    """Add one batch's outcomes to the metrics: one labelled increment per kind."""
    if accepted:
        telemetry.EVENTS.labels(Status.ACCEPTED.value).inc(accepted)
    if duplicates:
        telemetry.EVENTS.labels(Status.DUPLICATE.value).inc(duplicates)
    if rejected:
        telemetry.EVENTS.labels(Status.REJECTED.value).inc(rejected.total())
        for field_name, n in rejected.items():
            telemetry.EVENTS_REJECTED.labels(field_name).inc(n)


def _event(row: Any) -> Event:
    shown = row["shown_item_ids"]
    if isinstance(shown, str):  # a driver that hands JSON back as text
        shown = json.loads(shown)
    return Event(
        event_id=row["event_id"],
        user_id=row["user_id"],
        item_id=row["item_id"],
        event=row["event"],
        timestamp=row["ts"],
        value=row["value"],
        price=row["price"],
        recommendation_id=row["recommendation_id"],
        shown_item_ids=tuple(shown or ()),
    )


def count_outcomes(outcomes: Iterable[Outcome]) -> None:
    """Add ``outcomes`` to the outcome metrics (``append`` does so for its own)."""
    # Tallied first: one labelled increment per kind, not per event (batches of thousands).
    outcomes = list(outcomes)
    statuses = Counter(outcome.status for outcome in outcomes)
    fields = (
        Counter(
            outcome.field or "unknown" for outcome in outcomes if outcome.status is Status.REJECTED
        )
        if statuses[Status.REJECTED]
        else Counter()
    )
    for status, n in statuses.items():
        telemetry.EVENTS.labels(status.value).inc(n)
    for field_name, n in fields.items():
        telemetry.EVENTS_REJECTED.labels(field_name).inc(n)


# --- group commit ---------------------------------------------------------------------------


class GroupCommit:
    """Appends concurrent batches to ``store`` together, in one transaction.

    A commit waits for the disk (``synchronous=FULL``, PostgreSQL's WAL flush), so its cost is
    mostly per transaction, not per event. Batches that arrive while one is committing wait and
    are committed together in the next transaction (:class:`models.batching.ScoreBatcher`'s
    leader/follower hand-off: a lone batch pays no delay). Their events are appended as one list,
    so an ``event_id`` in two concurrent batches is accepted in the first and a duplicate in the
    later one. If the transaction fails, every batch in it raises the same :class:`StoreError`.
    """

    def __init__(self, store: EventStore, max_batches: int = 64) -> None:
        self.store = store
        self._batcher = ScoreBatcher(self._append_all, max_batch=max_batches)

    def append(
        self, events: Sequence[Event | RawEvent], *, stored: list[Activity | None] | None = None
    ) -> list[Outcome]:
        """The outcomes of ``events`` (in order), committed with whatever else is waiting;
        ``stored`` as in :meth:`EventStore.append`."""
        outcomes, rows = self._batcher(list(events))
        if stored is not None:
            stored += rows
        result: list[Outcome] = outcomes
        return result

    @property
    def transactions(self) -> int:
        """How many group transactions have run (each one call of ``EventStore.append``)."""
        return self._batcher.batches

    def _append_all(
        self, batches: list[list[Event | RawEvent]]
    ) -> list[tuple[list[Outcome], list[Activity | None]]]:
        stored: list[Activity | None] = []
        outcomes = self.store.append([ev for batch in batches for ev in batch], stored=stored)
        split, start = [], 0
        for batch in batches:
            end = start + len(batch)
            split.append((outcomes[start:end], stored[start:end]))
            start = end
        return split


# --- connecting and migrating ---------------------------------------------------------------


def _create_engine(uri: str, busy_timeout: timedelta) -> Engine:
    try:
        url = make_url(uri)
    except ArgumentError:
        raise InvalidInputError(
            f"{EVENTS_URI_ENV}: not a database URI: {uri!r}; use sqlite:///PATH or "
            "postgresql+psycopg://USER:PASSWORD@HOST/DB",
            field=EVENTS_URI_ENV,
        ) from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(url, busy_timeout)
    if backend == "postgresql":
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        return create_engine(url, pool_pre_ping=True)
    raise InvalidInputError(
        f"{EVENTS_URI_ENV}: unsupported database {backend!r}; use sqlite:///PATH or "
        "postgresql+psycopg://USER:PASSWORD@HOST/DB",
        field=EVENTS_URI_ENV,
    )


def _sqlite_engine(url: URL, busy_timeout: timedelta) -> Engine:
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:"):
        raise InvalidInputError(
            f"{EVENTS_URI_ENV}: an in-memory SQLite database would lose acknowledged events; "
            "give a file: sqlite:///PATH",
            field=EVENTS_URI_ENV,
        )
    try:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the folder of the event store {database}: {exc}") from exc
    engine = create_engine(url, connect_args={"timeout": busy_timeout.total_seconds()})
    busy_ms = int(busy_timeout.total_seconds() * 1000)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" hook below issue BEGIN, not the sqlite3 module.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL: readers do not block the writer and worker processes share the file;
        # synchronous=FULL: a commit is on disk when it returns, so an ack survives a crash.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        # Copy the WAL back into the database every 10,000 pages (40 MB) rather than 1,000: a
        # batch of events dirties a page of the (user_id, ts) index per user, the same pages
        # commit after commit, and each checkpoint writes a page once however often it changed
        # (docs/benchmarks.md, "Events: ingest"). Durability is the WAL's fsync at each commit.
        cursor.execute("PRAGMA wal_autocheckpoint=10000")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A writer takes the lock at BEGIN, where the busy timeout waits for it; a deferred
        # transaction that reads first could fail at once when another process wrote meanwhile.
        immediate = conn.get_execution_options().get("affinity_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _read_version(conn: Connection) -> int:
    version = conn.execute(select(func.max(SCHEMA_VERSION.c.version))).scalar()
    return int(version or 0)


def _migrate(engine: Engine) -> None:
    """Apply the missing steps of ``MIGRATIONS``, each in one transaction, or refuse a newer DB."""
    for _ in range(LATEST_VERSION + 1):
        with _write(engine) as conn:
            if conn.dialect.name == "postgresql":
                # Processes opening the same new database at once: one migrates, the others wait.
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            SCHEMA_VERSION.create(conn, checkfirst=True)
            version = _read_version(conn)
            if version > LATEST_VERSION:
                raise UnsupportedSchemaError(
                    f"the event store {engine.url.render_as_string(hide_password=True)} has "
                    f"schema version {version}, newer than this build's {LATEST_VERSION}; "
                    "upgrade Affinity or point AFFINITY_EVENTS_URI at another database"
                )
            if version == LATEST_VERSION:
                return
            step = MIGRATIONS[version]
            logger.info(
                "event store: migrating to schema version %d (%s)", version + 1, step.__doc__
            )
            step(conn)
            conn.execute(SCHEMA_VERSION.delete())
            conn.execute(SCHEMA_VERSION.insert().values(version=version + 1))
    raise StoreError("the event store's schema did not converge")  # pragma: no cover
