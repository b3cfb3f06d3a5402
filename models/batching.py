"""Serve concurrent single requests together: one pass over the catalog for a whole batch.

"More like this" on a factor model cannot prune its search (every unit vector has norm 1), so
each request reads every item vector. :class:`ScoreBatcher` lets requests that arrive while one
is being searched wait and be searched together in the next batch, so a lone request pays no
delay and a busy server reads the item vectors once per batch instead of once per request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

MAX_BATCH = 64
"""Most requests searched together (bounds the score block a batch allocates)."""


class _Slot:
    __slots__ = ("done", "error", "lead", "request", "result")

    def __init__(self, request: Any) -> None:
        self.request = request
        # A lock taken at birth: a waiting thread blocks on acquire() until the leader releases
        # it, the cheapest wake-up Python has (an Event goes through a Condition and its locks).
        self.done = threading.Lock()
        self.done.acquire()
        self.lead = False
        self.result: Any = None
        self.error: BaseException | None = None


class ScoreBatcher:
    """Serves concurrent single requests together, with no added delay for a lone one.

    The first request to arrive computes at once; requests arriving while a batch is computing
    queue up, and when it finishes the oldest waiting request is woken to compute everything
    queued so far in one call of ``run`` (leader/follower hand-off: results are never computed
    by a thread whose own answer is already done). ``run`` takes a list of requests and returns
    one result per request, in order.
    """

    def __init__(
        self, run: Callable[[list[Any]], Sequence[Any]], max_batch: int = MAX_BATCH
    ) -> None:
        self._run = run
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Slot] = []
        self._busy = False
        self.batches = 0
        self.scored = 0

    def __call__(self, request: Any) -> Any:
        """The result of ``run`` for this one ``request``."""
        slot = _Slot(request)
        with self._lock:
            self._queue.append(slot)
            lead = not self._busy
            self._busy = True
        if not lead:
            slot.done.acquire()
            if not slot.lead:
                return self._result(slot)
        self._run_batch(slot)
        return self._result(slot)

    @staticmethod
    def _result(slot: _Slot) -> Any:
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _run_batch(self, own: _Slot) -> None:
        with self._lock:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
        try:
            results = self._run([s.request for s in batch])
            for result, s in zip(results, batch, strict=True):
                s.result = result
        except BaseException as exc:
            for s in batch:
                s.error = exc
        self.batches += 1
        self.scored += len(batch)
        with self._lock:
            if self._queue:
                nxt = self._queue[0]
                nxt.lead = True  # it takes over the queue (itself included) when woken
                nxt.done.release()
            else:
                self._busy = False
        for s in batch:
            if s is not own:
                s.done.release()
