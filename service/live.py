"""The live view: what each user did since the model was trained, and who was erased.

Every worker keeps its own copy in memory, so a ``Recommend`` reads it with one dictionary lookup
and no database round trip. It is kept current two ways:

- events this worker acknowledges are applied at once (:meth:`LiveActivity.apply`), so a user's
  next request to the same worker reflects them;
- a background thread tails the store (:meth:`LiveActivity.poll`) every ``poll_seconds``, so the
  events and erasures other workers (and other hosts) acknowledged arrive within that interval.

The tail follows the events table by row id. On SQLite the writer lock serializes transactions, so
ids appear in commit order. PostgreSQL hands out ids before commit: a transaction that commits
after a later one leaves a gap below the newest id, and ``ON CONFLICT DO NOTHING`` burns ids for
duplicates. Gaps are re-read on each poll for ``gap_seconds`` and then given up (a transaction
that slow is still stored and trained on; only its live effect is lost).

Only events received in the last ``window`` are loaded at start-up: retrain at least that often
(events older than the serving model's training data are folded in; older ones it has seen).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from service.events import Activity, EventStore

logger = logging.getLogger(__name__)

IGNORED_EVENTS = frozenset({"impression"})
"""Events that say nothing about the user's taste (what was shown, not what they did)."""
DISLIKE = "dislike"


@dataclass(frozen=True, slots=True)
class UserActivity:
    """One user's recent events; replaced whole on every change, so readers never lock."""

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
    _users: dict[str, UserActivity] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _cursor: int = field(default=0, init=False)
    _gaps: dict[int, _Gap] = field(default_factory=dict, init=False)
    _erasures_seen: datetime | None = field(default=None, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    polls: int = field(default=0, init=False)
    failures: int = field(default=0, init=False)

    # ------------------------------------------------------------------ reading
    def get(self, user_id: str) -> UserActivity | None:
        """The user's live activity, or ``None`` when there is none (the common case)."""
        return self._users.get(user_id)

    @property
    def users(self) -> int:
        return len(self._users)

    # ----------------------------------------------------------------- updating
    def apply(self, events: Iterable[tuple[str, str, str, str, datetime]]) -> None:
        """Add ``(event_id, user_id, item_id, event, ts)`` acknowledged events; applying one
        twice (from this worker and again from the tail) keeps it once."""
        with self._lock:
            for event_id, user_id, item_id, name, ts in events:
                self._add(user_id, item_id, name, ts, event_id)

    def forget(self, user_id: str, erased_at: datetime) -> None:
        """Drop what is known of ``user_id`` and remember the erasure."""
        with self._lock:
            self._users[user_id] = UserActivity(erased_at=erased_at)

    def _add(self, user_id: str, item_id: str, name: str, ts: datetime, event_id: str) -> None:
        if name in IGNORED_EVENTS:
            return
        current = self._users.get(user_id) or UserActivity()
        entry = (ts, item_id, event_id)
        if name == DISLIKE:
            if any(e[2] == event_id for e in current.dislikes):
                return
            dislikes = _insert(current.dislikes, entry, self.max_per_user)
            self._users[user_id] = UserActivity(current.positives, dislikes, current.erased_at)
        else:
            if any(e[2] == event_id for e in current.positives):
                return
            positives = _insert(current.positives, entry, self.max_per_user)
            self._users[user_id] = UserActivity(positives, current.dislikes, current.erased_at)

    # ------------------------------------------------------------------ tailing
    def bootstrap(self, now: datetime | None = None) -> None:
        """Load the erasures and the events received within ``window``; then tail from there."""
        now = now or datetime.now(UTC)
        erasures = self.store.erasures()
        with self._lock:
            for user_id, erased_at in erasures.items():
                self._users[user_id] = UserActivity(erased_at=erased_at)
        self._erasures_seen = now
        newest = self.store.newest_row_id()
        since = now - self.window
        while True:
            rows = self.store.activity(after_id=self._cursor, received_since=since, limit=self.page)
            self._take(rows, track_gaps=False)
            if len(rows) < self.page:
                break
        self._cursor = max(self._cursor, newest)
        logger.info(
            "live view: %d users with recent activity or erasures",
            len(self._users),
            extra={"live_users": len(self._users)},
        )

    def poll(self) -> int:
        """Read what arrived since the last poll; returns how many new rows were read."""
        started = datetime.now(UTC)
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
        self.polls += 1
        return total

    def _forget_before(self, user_id: str, erased_at: datetime) -> None:
        # Events this worker applied after the erasure (a returning user) stay.
        with self._lock:
            current = self._users.get(user_id) or UserActivity()
            self._users[user_id] = UserActivity(
                tuple(e for e in current.positives if e[0] > erased_at),
                tuple(e for e in current.dislikes if e[0] > erased_at),
                erased_at,
            )

    def _take(self, rows: list[Activity], *, track_gaps: bool) -> None:
        if not rows:
            self._expire_gaps()
            return
        now = time.monotonic()
        with self._lock:
            for row in rows:
                self._gaps.pop(row.row_id, None)
                erased = self._users.get(row.user_id)
                if (
                    erased is not None
                    and erased.erased_at is not None
                    and row.received_at <= erased.erased_at
                ):
                    continue  # deleted meanwhile; the tail read it before the erasure
                self._add(row.user_id, row.item_id, row.event, row.ts, row.event_id)
        newest = max(row.row_id for row in rows)
        if track_gaps and newest > self._cursor:
            present = {row.row_id for row in rows}
            missing = [i for i in range(self._cursor + 1, newest) if i not in present]
            for row_id in missing[-10_000:]:  # bounded: a burst of burnt ids is not worth more
                self._gaps.setdefault(row_id, _Gap(now))
        self._cursor = max(self._cursor, newest)
        self._expire_gaps()

    def _expire_gaps(self) -> None:
        if not self._gaps:
            return
        limit = time.monotonic() - self.gap_seconds
        for row_id in [i for i, gap in self._gaps.items() if gap.first_seen < limit]:
            del self._gaps[row_id]

    # ------------------------------------------------------------------- thread
    def start(self) -> None:
        """Bootstrap, then poll in a daemon thread until :meth:`stop`."""
        self.bootstrap()
        self._thread = threading.Thread(target=self._run, name="affinity-live", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        failing = False
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


def _insert(
    entries: tuple[tuple[datetime, str, str], ...],
    entry: tuple[datetime, str, str],
    cap: int,
) -> tuple[tuple[datetime, str, str], ...]:
    """``entries`` with ``entry`` in time order, keeping the newest ``cap``."""
    if not entries or entries[-1][0] <= entry[0]:
        merged = (*entries, entry)
    else:
        merged = tuple(sorted((*entries, entry), key=lambda e: e[0]))
    return merged[-cap:]
