"""User profiles for the operations team (``GetUserProfile``, ``affinity users show``).

A profile starts from the user's row of the last ``affinity segments`` computation
(``user_segments``, with its ``profile`` aggregates: :func:`affinity.segments.profiles`) and adds
the user's events stored since that computation's reference time (``as_of``), so it is current
to the last acknowledged event and a user who arrived since has one too. A lookup is three
primary-key or index reads on one connection (the erasure, the segment row, the newest
:data:`MAX_LIVE_EVENTS` events after ``as_of`` on ``ix_events_user_ts``) plus, for a user the
computation did not have, the newest ``segment_runs`` row; each computation's configuration and
score cut points are parsed once and cached.

The store, not the worker's live view (:mod:`service.live`), is read: the live view keeps
neither event names nor values and prices, and the store holds every worker's events the
moment they are acknowledged. How the two parts merge, field by field: ``docs/segments.md``,
"Profiles".
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, select

from models.errors import InvalidInputError, NotFoundError, NotReadyError
from models.lifecycle import (
    DAY_SECONDS,
    Activity,
    RfmCutPoints,
    SegmentsConfig,
    assign_stages,
    tier_of,
)
from protos.affinity.v1 import recommender_pb2 as pb
from service.events import ERASURES, EVENTS, MAX_ID, SEGMENT_RUNS, USER_SEGMENTS, _checked_user

if TYPE_CHECKING:
    from models.artifact import ItemCatalog
    from models.vocabulary import Vocabulary
    from service.events import EventStore
    from service.servicer import RecommenderServicer

MAX_LIVE_EVENTS = 1000
"""At most this many of a user's newest events after the computation are read per lookup (run
``affinity segments`` daily, so that a user rarely has more)."""
TOP_CATEGORIES = 10
"""Categories listed per profile, largest share first."""
RECENT_ITEMS = 10
"""Most recent distinct items listed per profile."""
WINDOWS = (7, 30, 90)
"""The active-day windows reported, in days (the newest ending today, UTC)."""
NOT_TASTE = frozenset({"dislike"})
"""Events counted but not taken as interest in their item (same as the computation's)."""
_IDLE = frozenset({"at_risk", "dormant", "churned"})

clock: Callable[[], float] = time.time
"""The time a profile is computed at (unix seconds); tests set it to fix "today"."""

_ERASED = select(ERASURES.c.erased_at).where(ERASURES.c.user_id == bindparam("user_id"))
_SEGMENT = select(
    USER_SEGMENTS.c.stage,
    USER_SEGMENTS.c.stage_since,
    USER_SEGMENTS.c.tier,
    USER_SEGMENTS.c.recency_score,
    USER_SEGMENTS.c.frequency_score,
    USER_SEGMENTS.c.monetary_score,
    USER_SEGMENTS.c.frequency,
    USER_SEGMENTS.c.monetary,
    USER_SEGMENTS.c.first_seen,
    USER_SEGMENTS.c.last_seen,
    USER_SEGMENTS.c.activated_at,
    USER_SEGMENTS.c.as_of,
    USER_SEGMENTS.c.computed_at,
    USER_SEGMENTS.c.profile,
).where(USER_SEGMENTS.c.user_id == bindparam("user_id"))
_EVENTS_AFTER = (
    select(EVENTS.c.event, EVENTS.c.item_id, EVENTS.c.ts, EVENTS.c.value, EVENTS.c.price)
    .where((EVENTS.c.user_id == bindparam("user_id")) & (EVENTS.c.ts > bindparam("after")))
    .order_by(EVENTS.c.ts.desc(), EVENTS.c.id.desc())
    .limit(MAX_LIVE_EVENTS)
)
_EVENTS_ALL = (
    select(EVENTS.c.event, EVENTS.c.item_id, EVENTS.c.ts, EVENTS.c.value, EVENTS.c.price)
    .where(EVENTS.c.user_id == bindparam("user_id"))
    .order_by(EVENTS.c.ts.desc(), EVENTS.c.id.desc())
    .limit(MAX_LIVE_EVENTS)
)
_LATEST_RUN = (
    select(SEGMENT_RUNS.c.as_of, SEGMENT_RUNS.c.computed_at)
    .order_by(SEGMENT_RUNS.c.as_of.desc())
    .limit(1)
)
_RUN = select(SEGMENT_RUNS.c.config, SEGMENT_RUNS.c.cut_points).where(
    (SEGMENT_RUNS.c.as_of == bindparam("as_of"))
    & (SEGMENT_RUNS.c.computed_at == bindparam("computed_at"))
)


# --- the computation a profile starts from --------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One ``affinity segments`` computation as a lookup needs it."""

    config: SegmentsConfig
    cuts: RfmCutPoints | None
    """``None`` for a computation stored without cut points (before schema version 6)."""


_DEFAULT_RUN = Run(SegmentsConfig(), None)


class _Runs:
    """Parsed ``segment_runs`` rows of one store, by (as_of, computed_at): immutable once
    written (a rerun at the same ``as_of`` has another ``computed_at``)."""

    def __init__(self) -> None:
        self._parsed: dict[tuple[datetime, datetime], Run] = {}
        self._lock = threading.Lock()

    def get(self, conn: Any, as_of: datetime, computed_at: datetime) -> Run:
        key = (as_of, computed_at)
        run = self._parsed.get(key)
        if run is not None:
            return run
        row = conn.execute(_RUN, {"as_of": as_of, "computed_at": computed_at}).first()
        run = _DEFAULT_RUN if row is None else _parse_run(row.config, row.cut_points)
        with self._lock:
            if len(self._parsed) >= 16:
                self._parsed.clear()
            self._parsed[key] = run
        return run


def _parse_run(config: Mapping[str, Any], cuts: Mapping[str, Any] | None) -> Run:
    return Run(
        SegmentsConfig.from_mapping(config, source="segment_runs.config"),
        RfmCutPoints.from_json(cuts) if cuts else None,
    )


_RUNS: weakref.WeakKeyDictionary[EventStore, _Runs] = weakref.WeakKeyDictionary()
_RUNS_LOCK = threading.Lock()


def _runs(store: EventStore) -> _Runs:
    runs = _RUNS.get(store)
    if runs is None:
        with _RUNS_LOCK:
            runs = _RUNS.setdefault(store, _Runs())
    return runs


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveEvent:
    """One stored event after the computation (unix seconds)."""

    event: str
    item_id: str
    ts: float
    value: float
    price: float | None


@dataclass
class Stored:
    """What a lookup read: the user's segment row (``None``: the computation did not have
    them), their events after it (newest first), and the computation."""

    segment: Any
    events: list[LiveEvent]
    run: Run
    run_as_of: datetime | None = None
    """The computation a new user's scores come from."""


def read_user(store: EventStore, user_id: str) -> Stored:
    """The user's stored parts, on one connection. An erasure drops the rows it covers: a
    segment row last seen at or before it (a computation that raced the erasure) and events at
    or before it."""
    runs = _runs(store)
    params: dict[str, Any] = {"user_id": user_id}
    with store.engine.connect() as conn:
        erased_at = conn.execute(_ERASED, params).scalar_one_or_none()
        segment = conn.execute(_SEGMENT, params).first()
        if segment is not None and erased_at is not None and segment.last_seen <= erased_at:
            segment = None
        after = segment.as_of if segment is not None else None
        if erased_at is not None and (after is None or erased_at > after):
            after = erased_at
        if after is None:
            rows = conn.execute(_EVENTS_ALL, params).all()
        else:
            rows = conn.execute(_EVENTS_AFTER, {**params, "after": after}).all()
        run_as_of = None
        if segment is not None:
            run = runs.get(conn, segment.as_of, segment.computed_at)
        else:
            latest = conn.execute(_LATEST_RUN).first()
            if latest is None:
                run = _DEFAULT_RUN
            else:
                run = runs.get(conn, latest.as_of, latest.computed_at)
                run_as_of = latest.as_of
    events = [
        LiveEvent(r.event, r.item_id, r.ts.timestamp(), float(r.value), r.price) for r in rows
    ]
    return Stored(segment, events, run, run_as_of)


# --- merging --------------------------------------------------------------------------------


@dataclass
class Profile:
    """A merged profile (unix seconds; NaN: none), before it becomes a message."""

    user_id: str
    first_seen: float
    last_seen: float
    activated_at: float
    days: set[int]
    events: Counter[str]
    monetary: float
    orders: int
    categories: Counter[str]
    types: Counter[str]
    taste: int
    """Interactions the shares are of (every event but the dislikes)."""
    recent: dict[str, float]
    stage: str
    stage_since: float
    scores: tuple[int, int, int]
    tier: str
    segments_as_of: float | None
    live_events: int
    now: float = field(default=0.0)


def merge(
    user_id: str,
    stored: Stored,
    now: float,
    catalog: tuple[Vocabulary, ItemCatalog] | None = None,
) -> Profile:
    """The profile of ``stored`` at ``now``; raises :class:`NotFoundError` when there is
    nothing to make one from. ``catalog`` (the served model's item ids and catalog) maps items
    to categories and types where the computation had no catalog, and the events after it."""
    config = stored.run.config
    ignored = set(config.ignored_events)
    live = [e for e in stored.events if e.event not in ignored]
    seg = stored.segment
    if seg is None and not live:
        raise NotFoundError(f"no profile for user {user_id!r}: no segment and no events")
    aggregates: Mapping[str, Any] = (seg.profile or {}) if seg is not None else {}
    events: Counter[str] = Counter(aggregates.get("events", {}))
    days = {int(d) for d in aggregates.get("days", ())}
    recent: dict[str, float] = {str(i): float(t) for i, t in aggregates.get("recent", ())}
    categories: Counter[str] = Counter(aggregates.get("categories", {}))
    types: Counter[str] = Counter(aggregates.get("types", {}))
    if "items" in aggregates and catalog is not None:
        for item, n in aggregates["items"].items():
            _map_item(catalog, item, int(n), categories, types)
    orders = int(seg.frequency) if seg is not None else 0
    monetary = float(seg.monetary) if seg is not None else 0.0
    first_seen = seg.first_seen.timestamp() if seg is not None else math.inf
    last_seen = seg.last_seen.timestamp() if seg is not None else -math.inf
    activated_at = (
        seg.activated_at.timestamp() if seg is not None and seg.activated_at else math.nan
    )
    order_events, activations = set(config.order_events), set(config.activation_events)
    order_times: set[float] = set()
    for e in live:
        events[e.event] += 1
        days.add(int(e.ts // DAY_SECONDS))
        first_seen = min(first_seen, e.ts)
        last_seen = max(last_seen, e.ts)
        if e.event in activations and not activated_at <= e.ts:
            activated_at = e.ts  # NaN compares false: the first activation wins
        if e.event in order_events:
            order_times.add(e.ts)
            monetary += e.value if e.price is None else e.value * e.price
        if e.event not in NOT_TASTE:
            if recent.get(e.item_id, -math.inf) < e.ts:
                recent[e.item_id] = e.ts
            if catalog is not None:
                _map_item(catalog, e.item_id, 1, categories, types)
    orders += len(order_times)
    taste = sum(n for name, n in events.items() if name not in NOT_TASTE)
    stage, since = _stage(stored, live, first_seen, last_seen, activated_at, now)
    if seg is not None:
        scores = (int(seg.recency_score), int(seg.frequency_score), int(seg.monetary_score))
        tier = str(seg.tier)
    elif stored.run.cuts is not None:
        recency_days = max(math.floor((now - last_seen) / DAY_SECONDS), 0)
        scores = stored.run.cuts.score(recency_days, orders, monetary)
        tier = tier_of(*scores, config)
    else:
        scores, tier = (0, 0, 0), ""
    return Profile(
        user_id=user_id,
        first_seen=first_seen,
        last_seen=last_seen,
        activated_at=activated_at,
        days=days,
        events=events,
        monetary=monetary,
        orders=orders,
        categories=categories,
        types=types,
        taste=taste,
        recent=recent,
        stage=stage,
        stage_since=since,
        scores=scores,
        tier=tier,
        segments_as_of=seg.as_of.timestamp() if seg is not None else None,
        live_events=len(live),
        now=now,
    )


def _map_item(
    catalog: tuple[Vocabulary, ItemCatalog],
    item_id: str,
    n: int,
    categories: Counter[str],
    types: Counter[str],
) -> None:
    items, meta = catalog
    index = items.get(item_id)
    if index < 0:
        return
    category, item_type = str(meta.category[index]), str(meta.item_type[index])
    if category:
        categories[category] += n
    if item_type:
        types[item_type] += n


def _stage(
    stored: Stored,
    live: Sequence[LiveEvent],
    first_seen: float,
    last_seen: float,
    activated_at: float,
    now: float,
) -> tuple[str, float]:
    """The lifecycle rules (:func:`models.lifecycle.assign_stages`) on the merged activity at
    ``now``, with the stored stage as the previous one. ``stage_since`` where the stage changed
    into ``active`` or ``reactivated``: the first event after the computation for a user who
    came back from an idle stage, the end of the ``reactivated`` period for one who stays, else
    the end of the new or activated period (where the rules would say "now", which would move
    with every lookup)."""
    seg = stored.segment
    windows = stored.run.config.windows
    previous = str(seg.stage) if seg is not None else ""
    previous_since = seg.stage_since.timestamp() if seg is not None else math.nan
    at = max(now, last_seen)
    result = assign_stages(
        Activity.of([first_seen], [last_seen], [activated_at], [previous], [previous_since]),
        at,
        windows,
    )
    stage, since = str(result.stage[0]), float(result.since[0])
    if previous and stage != previous and stage in ("active", "reactivated"):
        if previous in _IDLE and live:
            since = min(e.ts for e in live)
        elif previous == "reactivated":
            since = min(previous_since + windows.reactivated_days * DAY_SECONDS, at)
        else:
            fresh = assign_stages(
                Activity.of([first_seen], [last_seen], [activated_at]), at, windows
            )
            since = float(fresh.since[0])
    return stage, since


# --- the message ----------------------------------------------------------------------------


def _stamp(message: Any, seconds: float) -> None:
    message.FromNanoseconds(round(seconds * 1e9))


def _ranked(counts: Mapping[str, int]) -> list[tuple[str, int]]:
    """Largest first, ties by name."""
    return sorted(((k, int(v)) for k, v in counts.items() if v > 0), key=lambda kv: (-kv[1], kv[0]))


def to_message(profile: Profile) -> pb.UserProfile:
    p = profile
    today = int(p.now // DAY_SECONDS)
    active = {w: sum(1 for d in p.days if today - w < d <= today) for w in WINDOWS}
    r, f, m = p.scores
    message = pb.UserProfile(
        user_id=p.user_id,
        active_days_7=active[7],
        active_days_30=active[30],
        active_days_90=active[90],
        event_counts=[pb.NameCount(name=k, count=v) for k, v in _ranked(p.events)],
        monetary=p.monetary,
        recency_score=r,
        frequency_score=f,
        monetary_score=m,
        tier=p.tier,
        stage=p.stage,
        recent_item_ids=[
            item
            for item, _ in sorted(p.recent.items(), key=lambda kv: (-kv[1], kv[0]))[:RECENT_ITEMS]
        ],
        orders=p.orders,
        live_events=p.live_events,
    )
    if p.taste:
        message.top_categories.extend(
            pb.NameShare(name=k, share=v / p.taste)
            for k, v in _ranked(p.categories)[:TOP_CATEGORIES]
        )
        message.item_types.extend(
            pb.NameShare(name=k, share=v / p.taste) for k, v in _ranked(p.types)
        )
    _stamp(message.first_seen, p.first_seen)
    _stamp(message.last_seen, p.last_seen)
    _stamp(message.stage_since, p.stage_since)
    if not math.isnan(p.activated_at):
        _stamp(message.activated_at, p.activated_at)
    if p.segments_as_of is not None:
        _stamp(message.segments_as_of, p.segments_as_of)
    return message


# --- the entry point ------------------------------------------------------------------------


def check_user_id(user_id: object) -> str:
    """``user_id`` when it can name a user (1 to 256 characters, not blank, no NUL); else
    :class:`InvalidInputError` naming ``user_id``."""
    if isinstance(user_id, str) and (not user_id or len(user_id) > MAX_ID):
        raise InvalidInputError(
            f"user_id must be 1 to {MAX_ID} characters, got {len(user_id)}", field="user_id"
        )
    return _checked_user(user_id)


def _served_catalog(servicer: RecommenderServicer) -> tuple[Vocabulary, ItemCatalog] | None:
    try:
        pipeline = servicer.holder.get().pipeline
        return pipeline.vocabularies()[1], pipeline.catalog
    except NotReadyError:
        return None  # no model yet: the profile leaves out what only its catalog can tell


def user_profile(servicer: RecommenderServicer, user_id: str) -> pb.UserProfile:
    """``user_id``'s profile from the stored segments and the live events since."""
    user_id = check_user_id(user_id)
    store = servicer.store
    if store is None:
        raise NotReadyError("this server has no event store: profiles are kept there")
    now = clock()
    stored = read_user(store, user_id)
    return to_message(merge(user_id, stored, now, _served_catalog(servicer)))
