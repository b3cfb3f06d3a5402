"""Records every answer the server gives, off the request path.

A request appends one tuple to an in-memory buffer (a ``deque``: its appends and pops are
atomic, so the request takes no lock); a writer thread drains the buffer every ``interval``
seconds and stores the answers in the event store in one transaction per batch. If the store is
down, the writer keeps the batch and retries with backoff while requests go on filling the buffer;
past ``capacity`` waiting answers, new ones are dropped, counted in
``affinity_responses_dropped_total`` and logged (once per burst), never silently. On shutdown the
writer stores what is left.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence

from service import telemetry
from service.events import Answer, EventStore

logger = logging.getLogger(__name__)

Pending = Answer
"""``(recommendation_id, method, user_id, item_ids, source, model_name, version, unix time,
reasons, exploration_seed, exploration_day)``."""


class ResponseRecorder:
    """Buffers answers and writes them to ``store`` in a background thread."""

    def __init__(
        self,
        store: EventStore,
        *,
        capacity: int = 100_000,
        interval: float = 0.2,
        batch: int = 5_000,
    ) -> None:
        self.store = store
        self.capacity = capacity
        self.interval = interval
        self.batch = batch
        self._buffer: deque[Pending] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dropping = False
        self.recorded = 0
        self.dropped = 0

    def record(
        self,
        recommendation_id: str,
        method: str,
        user_id: str | None,
        item_ids: list[str],
        source: str,
        model_name: str,
        model_version: str,
        *,
        reasons: Sequence[int] | None = None,
        exploration_seed: int | None = None,
        exploration_day: int | None = None,
        experiment: str | None = None,
        arm: str | None = None,
        at: float | None = None,
    ) -> None:
        """Queue one answer (called on the request path: no I/O, no lock). ``reasons``: one
        ``Reason`` code per item, ``None`` when all are the model's; the exploration's seed and
        day when the list had one; the live experiment and arm that answered, if any; ``at``:
        when it was served (unix seconds; default now)."""
        if len(self._buffer) >= self.capacity:
            self._drop()
            return
        self._buffer.append(
            (
                recommendation_id,
                method,
                user_id,
                item_ids,
                source,
                model_name,
                model_version,
                time.time() if at is None else at,
                reasons,
                exploration_seed,
                exploration_day,
                experiment,
                arm,
            )
        )

    def _drop(self) -> None:
        self.dropped += 1
        telemetry.RESPONSES_DROPPED.inc()
        if not self._dropping:
            self._dropping = True
            logger.warning(
                "response recorder: %d answers wait to be recorded (the limit); dropping new "
                "ones until the event store catches up (affinity_responses_dropped_total)",
                self.capacity,
            )

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="affinity-recorder", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the writer after storing what is buffered (for at most ``timeout`` seconds)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._buffer:
            logger.warning(
                "response recorder: %d answers were not recorded at shutdown", len(self._buffer)
            )
            telemetry.RESPONSES_DROPPED.inc(len(self._buffer))

    def flush(self) -> int:
        """Store everything buffered now; returns how many were stored (raises on failure,
        leaving the batch in the buffer)."""
        total = 0
        while self._buffer:
            total += self._write_batch()
        return total

    def _write_batch(self) -> int:
        taken: list[Pending] = []
        buffer = self._buffer
        while buffer and len(taken) < self.batch:
            taken.append(buffer.popleft())
        if not taken:
            return 0
        try:
            self.store.record_answers(taken)
        except Exception:
            buffer.extendleft(reversed(taken))  # back in front, in order, for the retry
            raise
        self.recorded += len(taken)
        telemetry.RESPONSES_RECORDED.inc(len(taken))
        if self._dropping and len(buffer) < self.capacity // 2:
            self._dropping = False
            logger.info("response recorder: caught up; recording every answer again")
        return len(taken)

    def _run(self) -> None:
        backoff = self.interval
        failing = False
        while True:
            stopping = self._stop.wait(backoff)
            try:
                while self._buffer:
                    self._write_batch()
            except Exception as exc:
                if not failing:
                    logger.warning("response recorder: cannot write to the event store: %s", exc)
                failing = True
                backoff = min(backoff * 2, 5.0)
                if stopping:
                    return
                continue
            if failing:
                logger.info("response recorder: writing to the event store again")
            failing = False
            backoff = self.interval
            if stopping:
                return
