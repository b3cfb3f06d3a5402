"""One worker's event side: the store, its group commit, the live view and the recorder.

A worker never needs the event store to answer ``Recommend``, so a store that cannot be reached
at start-up does not keep the worker from serving: the side keeps trying to open it in the
background (``LogEvents`` and ``DeleteUser`` answer UNAVAILABLE meanwhile, lists are made without
live events, answers are not recorded) and attaches everything to the servicer once it opens. A
store that can never work (a bad URI, a database of a newer schema) still fails start-up, with
the setting named.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from models.errors import InvalidInputError, StoreError, UnsupportedSchemaError
from service.config import ServeSettings
from service.events import EventRules, EventStore, GroupCommit
from service.live import LiveActivity
from service.recorder import ResponseRecorder
from service.rules import RuleDefaults
from service.servicer import RecommenderServicer

logger = logging.getLogger(__name__)

RETRY_SECONDS = (0.5, 1.0, 2.0, 5.0)
"""Waits between attempts to open an unreachable store (the last one repeats)."""


def event_rules(settings: ServeSettings) -> EventRules:
    return EventRules(
        extra_events=settings.extra_event_names,
        max_future_skew=timedelta(seconds=settings.max_future_skew_seconds),
    )


def open_event_store(settings: ServeSettings) -> EventStore:
    """The event store of ``settings.events_uri``, or an error naming the setting:
    :class:`StoreError` for a URI that can never work (bad, in-memory, newer schema) and for a
    database that cannot be reached now (the message says which)."""
    try:
        return EventStore.open(settings.events_uri, rules=event_rules(settings))
    except (InvalidInputError, UnsupportedSchemaError) as exc:
        raise StoreError(f"invalid setting events_uri (AFFINITY_EVENTS_URI): {exc}") from exc
    except StoreError as exc:
        raise _Unreachable(f"events_uri (AFFINITY_EVENTS_URI): {exc}") from exc


class _Unreachable(StoreError):
    """The store's database could not be opened now; trying again may work."""


class EventSide:
    """Opens the store and attaches it, its live view and its recorder to ``servicer``."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.store: EventStore | None = None
        self.live: LiveActivity | None = None
        self.recorder: ResponseRecorder | None = None
        self._servicer: RecommenderServicer | None = None
        self._stop = threading.Event()
        self._retry: threading.Thread | None = None
        self._lock = threading.Lock()

    def bind(self, servicer: RecommenderServicer) -> None:
        """Remember the servicer to attach to (``create_server``'s ``on_servicer``)."""
        self._servicer = servicer

    def open(self) -> bool:
        """Open the store now, or start retrying in the background; returns whether it is open.

        Raises :class:`StoreError` for a setting that can never work.
        """
        try:
            store = open_event_store(self.settings)
        except _Unreachable as exc:
            logger.warning(
                "cannot open the event store yet (%s); serving without it and retrying", exc
            )
            self._retry = threading.Thread(
                target=self._keep_trying, name="affinity-events-open", daemon=True
            )
            self._retry.start()
            return False
        self._attach(store)
        return True

    def _keep_trying(self) -> None:
        attempt = 0
        while not self._stop.wait(RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)]):
            attempt += 1
            try:
                store = open_event_store(self.settings)
            except _Unreachable:
                continue
            except StoreError as exc:  # pragma: no cover - the database changed under us
                logger.error("event store refused: %s", exc)
                return
            if self._stop.is_set():
                store.close()
                return
            self._attach(store)
            logger.info("event store open after %d attempts; LogEvents accepts events", attempt)
            return

    def _attach(self, store: EventStore) -> None:
        settings = self.settings
        with self._lock:
            if settings.live:
                self.live = LiveActivity(
                    store,
                    poll_seconds=settings.live_poll_seconds,
                    window=timedelta(days=settings.live_window_days),
                    # Rotation's shown items, and the tail of the recorded answers, only when
                    # rotation is on by default or allowed to requests.
                    shown_keep_seconds=RuleDefaults.from_settings(settings).shown_keep_seconds,
                )
                # Loaded in its thread: a large window must not hold the port closed (nor a
                # replacement worker, while the others keep writing).
                self.live.start(wait=False)
            if settings.record_responses:
                self.recorder = ResponseRecorder(store, capacity=settings.response_buffer)
                self.recorder.start()
            servicer = self._servicer
            if servicer is not None:
                # Plain attribute writes: a request reads each once, before or after.
                servicer.live = self.live
                servicer.recorder = self.recorder
                servicer.events = GroupCommit(store)
                if servicer.experiments is not None:
                    servicer.experiments.attach(store)
                if servicer.stages is not None:
                    servicer.stages.attach(store)
            self.store = store  # last: whoever sees it sees everything attached

    def close(self) -> None:
        """Stop the threads (the recorder writes what it holds) and close the store."""
        self._stop.set()
        if self._retry is not None:
            self._retry.join(timeout=10)
        with self._lock:
            servicer = self._servicer
            if servicer is not None and servicer.experiments is not None:
                servicer.experiments.stop()
            if servicer is not None and servicer.stages is not None:
                servicer.stages.stop()
            if self.recorder is not None:
                self.recorder.stop()
            if self.live is not None:
                self.live.stop()
            if self.store is not None:
                self.store.close()
