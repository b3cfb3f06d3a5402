"""The live view: what each user did since the model was trained, and who was erased.

Every worker keeps its own copy in memory, so a ``Recommend`` reads it with one dictionary lookup
and no database round trip. It is kept current two ways:

- events this worker acknowledges are applied at once (:meth:`LiveActivity.applied`), so a
  user's next request to the same worker reflects them;
- a background thread tails the store (:meth:`LiveActivity.poll`) every ``poll_seconds``, so the
  events and erasures other workers (and other hosts) acknowledged arrive within that interval.

The tail follows the events table by row id. On SQLite the writer lock serializes transactions, so
ids appear in commit order. PostgreSQL hands out ids before commit: a transaction that commits
after a later one leaves a gap below the newest id, and ``ON CONFLICT DO NOTHING`` burns ids for
duplicates. Gaps are re-read on each poll for ``gap_seconds`` and then given up (a transaction
that slow is still stored and trained on; only its live effect is lost).

Events this worker stored arrive with their row ids: the tail skips those rows instead of
reading them back (with one worker it reads nothing), so a worker's own events cost it one
update each. An event is kept once whichever way it comes, by its ``event_id``. An update is a
few dictionary and list operations (the user's list is changed in place, in time order, its ids
kept in a set once there are more than a few), whatever the user's number of events; the
:class:`UserActivity` copy a request reads is made when that user is read after a change, not
on every event.

Only events received in the last ``window`` are loaded at start-up: retrain at least that often
(events older than the serving model's training data are folded in; older ones it has seen).

**Shown items** (for the rotation rule, only with ``shown_keep_seconds > 0``): the items each
user's recent ``Recommend`` answers showed, each with the time of its latest showing. This
worker's answers are noted at once (:meth:`LiveActivity.showed`, called by the servicer as it
answers); the other workers' arrive by tailing the recorded answers (``responses``) by row id,
with the same gap handling as the events (the recorder writes them every fraction of a second,
so another worker's answer is seen within that plus ``poll_seconds``). Reading back this
worker's own answers changes nothing (an item keeps its latest showing). A user keeps at most
``max_shown_per_user`` items (the oldest showings go first), none older than
``shown_keep_seconds``; users whose items all expired are dropped every minute.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from service.events import Activity, EventStore, Shown

logger = logging.getLogger(__name__)

SWEEP_SECONDS = 60.0
"""How often the poll drops the users whose shown items all expired."""
IGNORED_EVENTS = frozenset({"impression"})
"""Events that say nothing about the user's taste (what was shown, not what they did)."""
DISLIKE = "dislike"


@dataclass(frozen=True, slots=True)
class UserActivity:
    """One user's recent events, as a reader gets them: an immutable copy, made when the user
    is first read after a change (writers change their own lists in place)."""

    positives: tuple[tuple[datetime, str, str], ...] = ()
    """``(time, item_id, event_id)`` of interactions, oldest first."""
    dislikes: tuple[tuple[datetime, str, str], ...] = ()
    """``(time, item_id, event_id)`` of ``dislike`` events, oldest first."""
    erased_at: datetime | None = None
    """When the user was erased (``DeleteUser``); events received before it are gone."""

    def items_after(self, cutoff: datetime) -> list[str]:
        """Items of the interactions that happened after ``cutoff`` (the model's data)."""
        return [item for ts, item, _ in self.positives if ts > cutoff]

    def disliked_items(self) -> list[str]:
        return [item for _, item, _ in self.dislikes]


Entry = tuple[datetime, str, str]
"""``(time, item_id, event_id)``: one event in a user's activity."""

# Past this many kept events, a user's event ids are also kept in a set (membership in O(1));
# below it a scan is as quick and the many users with a few events spend no memory on a set.
_SCAN = 16


class _UserLog:
    """One user's activity as the writers keep it (under the view's lock): lists in time
    order, changed in place, and the :class:`UserActivity` readers get, built when first read
    after a change."""

    __slots__ = ("dislikes", "erased_at", "ids", "positives", "view")

    def __init__(self, erased_at: datetime | None = None) -> None:
        self.positives: list[Entry] = []
        self.dislikes: list[Entry] = []
        self.erased_at = erased_at
        self.ids: set[str] | None = None
        """The event ids of both lists, once they hold more than ``_SCAN`` entries."""
        self.view: UserActivity | None = None
        """The readers' copy; ``None`` when a change made it stale."""

    def has(self, event_id: str) -> bool:
        ids = self.ids
        if ids is not None:
            return event_id in ids
        if len(self.positives) + len(self.dislikes) <= _SCAN:
            for entries in (self.positives, self.dislikes):
                for entry in entries:
                    if entry[2] == event_id:
                        return True
            return False
        ids = self.ids = {e[2] for e in self.positives}
        ids.update(e[2] for e in self.dislikes)
        return event_id in ids

    def add(self, entries: list[Entry], entry: Entry, cap: int) -> None:
        """``entry`` into ``entries`` in time order, keeping the newest ``cap``."""
        if not entries or entries[-1][0] <= entry[0]:
            entries.append(entry)
        else:
            entries.insert(bisect_right(entries, entry[0], key=_time), entry)
        ids = self.ids
        if ids is not None:
            ids.add(entry[2])
        if len(entries) > cap:
            dropped = entries[: len(entries) - cap]
            del entries[: len(entries) - cap]
            if ids is not None:
                ids.difference_update(e[2] for e in dropped)
        self.view = None

    def snapshot(self) -> UserActivity:
        return UserActivity(tuple(self.positives), tuple(self.dislikes), self.erased_at)


def _time(entry: Entry) -> datetime:
    return entry[0]


@dataclass
class _Gap:
    first_seen: float


@dataclass
class LiveActivity:
    """The per-worker live view over ``store`` (see the module docstring)."""

    store: EventStore
    poll_seconds: float = 0.25
    window: timedelta = timedelta(days=7)
    max_per_user: int = 200
    gap_seconds: float = 5.0
    page: int = 20_000
    shown_keep_seconds: float = 0.0
    """Keep each user's shown items this long (rotation); 0: keep none, and leave the recorded
    answers untailed."""
    max_shown_per_user: int = 100
    _users: dict[str, _UserLog] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _cursor: int = field(default=0, init=False)
    _gaps: dict[int, _Gap] = field(default_factory=dict, init=False)
    _own: set[int] = field(default_factory=set, init=False)
    """Row ids past ``_cursor`` of events this worker applied itself: the tail skips them."""
    _erasures_seen: datetime | None = field(default=None, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    polls: int = field(default=0, init=False)
    failures: int = field(default=0, init=False)
    _shown: dict[str, dict[str, float]] = field(default_factory=dict, init=False)
    """user -> {item: unix time of its latest showing}, in (about) showing order."""
    _answer_cursor: int = field(default=0, init=False)
    _answer_gaps: dict[int, _Gap] = field(default_factory=dict, init=False)
    _swept: float = field(default=0.0, init=False)

    # ------------------------------------------------------------------ reading
    def get(self, user_id: str) -> UserActivity | None:
        """The user's live activity, or ``None`` when there is none (the common case)."""
        log = self._users.get(user_id)
        if log is None:
            return None
        view = log.view
        if view is None:
            with self._lock:
                view = log.view
                if view is None:
                    view = log.view = log.snapshot()
        return view

    @property
    def users(self) -> int:
        return len(self._users)

    @property
    def keeps_shown(self) -> bool:
        return self.shown_keep_seconds > 0

    def shown(self, user_id: str, now: float | None = None) -> tuple[list[str], np.ndarray] | None:
        """The items recently shown to ``user_id`` and their ages in seconds (of the latest
        showing), or ``None`` when there are none (or shown items are not kept)."""
        log = self._shown.get(user_id)
        if not log:
            return None
        now = time.time() if now is None else now
        with self._lock:
            items = list(log)
            times = np.fromiter(log.values(), np.float64, len(items))
        ages = np.maximum(now - times, 0.0)
        fresh = ages <= self.shown_keep_seconds
        if not fresh.all():
            if not fresh.any():
                return None
            items = [item for item, keep in zip(items, fresh.tolist(), strict=True) if keep]
            ages = ages[fresh]
        return items, ages

    @property
    def shown_users(self) -> int:
        return len(self._shown)

    # ----------------------------------------------------------------- updating
    def apply(self, events: Iterable[tuple[str, str, str, str, datetime]]) -> None:
        """Add ``(event_id, user_id, item_id, event, ts)`` acknowledged events; applying one
        twice (from this worker and again from the tail) keeps it once."""
        with self._lock:
            for event_id, user_id, item_id, name, ts in events:
                self._add(user_id, item_id, name, ts, event_id)

    def applied(self, rows: Sequence[Activity]) -> None:
        """Add events this worker has just stored, as :meth:`EventStore.append` returned them
        (``stored``): the tail will not read their rows back."""
        with self._lock:
            cursor, own, gaps, users, cap = (
                self._cursor,
                self._own,
                self._gaps,
                self._users,
                self.max_per_user,
            )
            for row_id, event_id, user_id, item_id, name, ts, _ in rows:
                if row_id > cursor:
                    own.add(row_id)
                elif gaps:
                    gaps.pop(row_id, None)
                if name in IGNORED_EVENTS:
                    continue
                log = users.get(user_id)  # _add, inlined: this runs once per event stored
                if log is None:
                    log = users[user_id] = _UserLog()
                elif log.has(event_id):
                    continue
                log.add(
                    log.dislikes if name == DISLIKE else log.positives, (ts, item_id, event_id), cap
                )
            self._skip_own()

    def showed(self, user_id: str, item_ids: Sequence[str], at: float | None = None) -> None:
        """Note this worker's answer: ``item_ids`` shown to ``user_id`` at ``at`` (unix
        seconds, default now). Does nothing unless shown items are kept."""
        if self.shown_keep_seconds <= 0 or not item_ids:
            return
        at = time.time() if at is None else at
        with self._lock:
            self._add_shown(user_id, item_ids, at)

    def _add_shown(self, user_id: str, item_ids: Iterable[str], at: float) -> None:
        """Under the lock: each item's latest showing, the user's oldest past the cap and the
        expired ones dropped."""
        log = self._shown.get(user_id)
        if log is None:
            log = self._shown[user_id] = {}
        for item in item_ids:
            before = log.get(item)
            if before is None:
                log[item] = at
            elif before < at:
                del log[item]  # to the end: the dict stays in (about) showing order
                log[item] = at
        extra = len(log) - self.max_shown_per_user
        if extra > 0:
            for item in list(itertools.islice(log, extra)):
                del log[item]
        oldest = at - self.shown_keep_seconds
        while log:
            first = next(iter(log))
            if log[first] >= oldest:
                break
            del log[first]

    def forget(self, user_id: str, erased_at: datetime) -> None:
        """Drop what is known of ``user_id`` and remember the erasure."""
        with self._lock:
            self._users[user_id] = _UserLog(erased_at)
            self._shown.pop(user_id, None)

    def _add(self, user_id: str, item_id: str, name: str, ts: datetime, event_id: str) -> None:
        if name in IGNORED_EVENTS:
            return
        log = self._users.get(user_id)
        if log is None:
            log = self._users[user_id] = _UserLog()
        elif log.has(event_id):
            return
        entries = log.dislikes if name == DISLIKE else log.positives
        log.add(entries, (ts, item_id, event_id), self.max_per_user)

    # ------------------------------------------------------------------ tailing
    def bootstrap(self, now: datetime | None = None) -> None:
        """Load the erasures and the events received within ``window``; then tail from there."""
        now = now or datetime.now(UTC)
        erasures = self.store.erasures()
        with self._lock:
            for user_id, erased_at in erasures.items():
                self._users[user_id] = _UserLog(erased_at)
        self._erasures_seen = now
        newest = self.store.newest_row_id()
        since = now - self.window
        # Up to the newest row of now only: under steady ingestion a loop "until a short page"
        # would chase the tail for ever; what comes later is the poll's.
        while self._cursor < newest:
            rows = self.store.activity(
                after_id=self._cursor, received_since=since, upto_id=newest, limit=self.page
            )
            self._take(rows, track_gaps=False)
            if len(rows) < self.page:
                break
        self._cursor = max(self._cursor, newest)
        if self.keeps_shown:
            self._bootstrap_shown(now)
        logger.info(
            "live view: %d users with recent activity or erasures",
            len(self._users),
            extra={"live_users": len(self._users), "shown_users": len(self._shown)},
        )

    def _bootstrap_shown(self, now: datetime) -> None:
        """Load the answers served within ``shown_keep_seconds``; then tail from there."""
        newest = self.store.newest_response_id()
        since = now - timedelta(seconds=self.shown_keep_seconds)
        while self._answer_cursor < newest:
            rows = self.store.shown(
                after_id=self._answer_cursor, served_since=since, upto_id=newest, limit=self.page
            )
            self._take_shown(rows, track_gaps=False)
            if len(rows) < self.page:
                break
        self._answer_cursor = max(self._answer_cursor, newest)

    def poll(self) -> int:
        """Read what arrived since the last poll; returns how many new rows were read."""
        started = datetime.now(UTC)
        with self._lock:
            self._skip_own()
            gaps = list(self._gaps)
        total = 0
        while True:
            rows = self.store.activity(after_id=self._cursor, ids=gaps, limit=self.page)
            gaps = []
            total += len(rows)
            self._take(rows, track_gaps=True)
            if len(rows) < self.page:
                break
        if self._erasures_seen is not None:
            # Erasures are rare: re-read the last gap_seconds as well, for late commits.
            since = self._erasures_seen - timedelta(seconds=self.gap_seconds)
            for user_id, erased_at in self.store.erasures(since).items():
                known = self._users.get(user_id)
                if known is None or known.erased_at is None or known.erased_at < erased_at:
                    self._forget_before(user_id, erased_at)
        self._erasures_seen = started
        if self.keeps_shown:
            total += self._poll_shown()
        self.polls += 1
        return total

    def _poll_shown(self) -> int:
        """Read the answers recorded since the last poll (gaps re-read, as for the events)."""
        with self._lock:
            gaps = list(self._answer_gaps)
        total = 0
        while True:
            rows = self.store.shown(after_id=self._answer_cursor, ids=gaps, limit=self.page)
            gaps = []
            total += len(rows)
            self._take_shown(rows, track_gaps=True)
            if len(rows) < self.page:
                break
        now = time.monotonic()
        if now - self._swept > SWEEP_SECONDS:
            self._swept = now
            self._sweep_shown(time.time())
        return total

    def _take_shown(self, rows: list[Shown], *, track_gaps: bool) -> None:
        gaps = self._answer_gaps
        now = time.monotonic()
        with self._lock:
            for row in rows:
                if gaps:
                    gaps.pop(row.row_id, None)
                user_id = row.user_id
                if user_id is None or not row.item_ids:
                    continue
                log = self._users.get(user_id)
                erased_at = None if log is None else log.erased_at
                if erased_at is not None and row.served_at <= erased_at:
                    continue  # deleted meanwhile; the tail read it before the erasure
                self._add_shown(user_id, row.item_ids, row.served_at.timestamp())
            cursor = self._answer_cursor
            if rows:
                newest = max(row.row_id for row in rows)
                if track_gaps and newest > cursor:
                    present = {row.row_id for row in rows}
                    missing = [i for i in range(cursor + 1, newest) if i not in present]
                    for row_id in missing[-10_000:]:
                        gaps.setdefault(row_id, _Gap(now))
                self._answer_cursor = max(cursor, newest)
            if gaps:
                limit = time.monotonic() - self.gap_seconds
                for row_id in [i for i, gap in gaps.items() if gap.first_seen < limit]:
                    del gaps[row_id]

    def _sweep_shown(self, now: float) -> None:
        """Drop the users whose shown items all expired (their latest is the last entry)."""
        oldest = now - self.shown_keep_seconds
        stale = [
            user
            for user, log in list(self._shown.items())
            if not log or next(reversed(log.values())) < oldest
        ]
        with self._lock:
            for user in stale:
                log = self._shown.get(user)
                if log is not None and (not log or next(reversed(log.values())) < oldest):
                    del self._shown[user]

    def _forget_before(self, user_id: str, erased_at: datetime) -> None:
        # Events this worker applied after the erasure (a returning user) stay.
        with self._lock:
            current = self._users.get(user_id) or _UserLog()
            log = self._users[user_id] = _UserLog(erased_at)
            log.positives = [e for e in current.positives if e[0] > erased_at]
            log.dislikes = [e for e in current.dislikes if e[0] > erased_at]
            shown = self._shown.get(user_id)
            if shown:
                cutoff = erased_at.timestamp()
                kept = {item: at for item, at in shown.items() if at > cutoff}
                if kept:
                    self._shown[user_id] = kept
                else:
                    del self._shown[user_id]

    def _skip_own(self) -> None:
        """Move the cursor over the rows this worker applied right after it (with one worker,
        every row: the tail then reads nothing); under the lock."""
        own = self._own
        cursor = self._cursor
        while cursor + 1 in own:
            cursor += 1
            own.discard(cursor)
        self._cursor = cursor

    def _take(self, rows: list[Activity], *, track_gaps: bool) -> None:
        if not rows:
            with self._lock:
                self._skip_own()
                self._expire_gaps()
            return
        now = time.monotonic()
        with self._lock:
            own, gaps, users = self._own, self._gaps, self._users
            for row in rows:
                row_id = row.row_id
                if gaps:
                    gaps.pop(row_id, None)
                if row_id in own:
                    continue  # this worker applied it when it stored it
                log = users.get(row.user_id)
                erased_at = None if log is None else log.erased_at
                if erased_at is not None and row.received_at <= erased_at:
                    continue  # deleted meanwhile; the tail read it before the erasure
                self._add(row.user_id, row.item_id, row.event, row.ts, row.event_id)
            newest = max(row.row_id for row in rows)
            cursor = self._cursor
            if track_gaps and newest > cursor:
                present = {row.row_id for row in rows}
                missing = [
                    i for i in range(cursor + 1, newest) if i not in present and i not in own
                ]
                for row_id in missing[-10_000:]:  # bounded: a burst of burnt ids is not worth more
                    gaps.setdefault(row_id, _Gap(now))
            self._cursor = cursor = max(cursor, newest)
            if own and min(own) <= cursor:
                self._own = {row_id for row_id in own if row_id > cursor}
            self._skip_own()
            self._expire_gaps()

    def _expire_gaps(self) -> None:
        if not self._gaps:
            return
        limit = time.monotonic() - self.gap_seconds
        for row_id in [i for i, gap in self._gaps.items() if gap.first_seen < limit]:
            del self._gaps[row_id]

    # ------------------------------------------------------------------- thread
    def start(self, *, wait: bool = True) -> None:
        """Bootstrap, then poll in a daemon thread until :meth:`stop`. With ``wait`` false the
        bootstrap runs in that thread too, so a worker answers while it loads (lists then lack
        the live events not loaded yet, for the seconds a large window takes)."""
        if wait:
            self.bootstrap()
        self._thread = threading.Thread(
            target=self._run, args=(not wait,), name="affinity-live", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self, bootstrap: bool = False) -> None:
        failing = False
        while bootstrap and not self._stop.is_set():
            try:
                started = time.monotonic()
                self.bootstrap()
                logger.info("live view loaded in %.1f s", time.monotonic() - started)
                break
            except Exception as exc:  # the database went away meanwhile: try again
                logger.warning("live view: cannot load recent events yet: %s", exc)
                self._stop.wait(2.0)
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception as exc:  # the database may be down for a while (StoreError, ...)
                self.failures += 1
                if not failing:
                    logger.warning("live view: cannot read the event store: %s", exc)
                failing = True
                continue
            if failing:
                logger.info("live view: reading the event store again")
            failing = False
