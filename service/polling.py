"""A worker's background readers of the event store: one daemon thread that calls ``tick`` every
``seconds``, or at once when woken, until stopped.

The experiment router (service/experiment_router.py) and the stage view (service/stages.py)
each follow a table other processes write; a tick that fails (the database briefly away) is
logged and the next one tried, and what the worker serves stays as it was.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Poller:
    """Calls ``tick`` in thread ``name`` every ``seconds``; :meth:`wake` calls it now."""

    def __init__(self, name: str, seconds: float, tick: Callable[[], object], failure: str) -> None:
        self.name = name
        self.seconds = seconds
        self.tick = tick
        self.failure = failure
        """Logged, with the exception, when a tick fails."""
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def wake(self) -> None:
        """Tick now instead of at the next interval."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.seconds)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.tick()
            except Exception as exc:
                logger.error("%s: %s", self.failure, exc)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
