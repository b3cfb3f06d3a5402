"""A worker's view of users' lifecycle stages, and the strategy each stage gives their lists.

``affinity segments`` (affinity/segments.py) writes every user's stage to the event store's
``user_segments`` table, replacing it whole. :class:`StageView` reads the table once at start-up
and again whenever a new computation appears (it checks every ``stage_poll_seconds``: one
``max(computed_at), count(*)`` query), and keeps an immutable :class:`StageTable`, replaced by one
attribute assignment. For each model it serves, the table becomes a numpy array of stage codes
over the model's user vocabulary (one byte per user, built once per table and model) plus a small
dict of the users the model does not know; a request costs a vocabulary lookup and an index.

Users the table does not hold: ``new`` when the model does not know them either (a first visit),
``active`` when it does (the model saw them; the next computation will place them). An erased
user is gone from the table after the next computation, and meanwhile keeps their stage.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

import numpy as np
from prometheus_client import Counter
from sqlalchemy import func, select

from models.lifecycle import STAGES
from models.strategies import ACTIVE_CODE, NEW_CODE, STAGE_CODES, Strategy, StrategyConfig
from models.vocabulary import MISSING, Vocabulary
from service.events import USER_SEGMENTS, EventStore
from service.polling import Poller
from service.wire import stage_fields

logger = logging.getLogger(__name__)

RESPONSES_BY_STAGE = Counter(
    "affinity_stage_responses",
    "Recommend answers by the user's lifecycle stage and the strategy it gave the list",
    ["stage", "strategy"],
)
VOCABULARY_MAPS = 4
"""Models whose user vocabulary a table is mapped onto at once (the served one, experiment arms)."""


@lru_cache(maxsize=64)
def stage_counter(stage: str, strategy: str) -> Counter:
    """The labelled child of ``RESPONSES_BY_STAGE``, looked up once per (stage, strategy)."""
    return RESPONSES_BY_STAGE.labels(stage=stage, strategy=strategy)


@dataclass(frozen=True)
class Placement:
    """What a user's stage means for their list: the stage, its strategy and the response's
    ``stage`` and ``strategy`` fields, encoded once."""

    stage: str
    strategy_name: str
    strategy: Strategy | None
    """None for ``personalized`` (the plain ranking)."""
    wire: bytes


@dataclass(frozen=True, eq=False)
class StageTable:
    """One ``affinity segments`` computation as this worker holds it (immutable)."""

    user_ids: np.ndarray
    """The users of ``user_segments`` (object array of str)."""
    codes: np.ndarray
    """Each user's stage code (``uint8``, an index into :data:`models.lifecycle.STAGES`)."""
    computed_at: datetime | None
    """When the computation ran (None: the table was empty)."""

    @classmethod
    def empty(cls) -> StageTable:
        return cls(np.empty(0, dtype=object), np.empty(0, dtype=np.uint8), None)

    def __len__(self) -> int:
        return len(self.user_ids)


@dataclass(frozen=True, eq=False)
class _Mapped:
    """A table over one model's users: a code per model user, and the table's other users."""

    table: StageTable
    vocabulary: Vocabulary
    codes: np.ndarray
    others: dict[str, int]


def map_onto(table: StageTable, users: Vocabulary) -> tuple[np.ndarray, dict[str, int]]:
    """``table``'s stage codes per user of ``users`` (``active`` for the model's users the table
    lacks) and, by id, the table's users ``users`` does not hold."""
    codes = np.full(len(users), ACTIVE_CODE, dtype=np.uint8)
    if not len(table):
        return codes, {}
    index = users.lookup(table.user_ids.tolist())
    known = index != MISSING
    codes[index[known]] = table.codes[known]
    outside = np.flatnonzero(~known)
    others = dict(zip(table.user_ids[outside].tolist(), table.codes[outside].tolist(), strict=True))
    return codes, others


def read_table(store: EventStore) -> StageTable:
    """Every user's stage from ``user_segments`` (unknown stage names are left out, logged)."""
    stmt = select(USER_SEGMENTS.c.user_id, USER_SEGMENTS.c.stage, USER_SEGMENTS.c.computed_at)
    with store.engine.connect() as conn:
        rows = conn.execute(stmt).all()
    if not rows:
        return StageTable.empty()
    ids = np.array([r.user_id for r in rows], dtype=object)
    raw = [STAGE_CODES.get(r.stage, -1) for r in rows]
    codes = np.array(raw, dtype=np.int16)
    bad = codes < 0
    if bad.any():
        logger.warning("user_segments: %d rows with an unknown stage left out", int(bad.sum()))
    return StageTable(ids[~bad], codes[~bad].astype(np.uint8), max(r.computed_at for r in rows))


def table_version(store: EventStore) -> tuple[datetime | None, int]:
    """What says whether ``user_segments`` changed: its computation time and row count."""
    stmt = select(func.max(USER_SEGMENTS.c.computed_at), func.count())
    with store.engine.connect() as conn:
        when, count = conn.execute(stmt).one()
    return when, int(count)


class StageView:
    """Each user's lifecycle stage on this worker, and the placement (strategy) it gives."""

    def __init__(self, config: StrategyConfig, poll_seconds: float = 300.0) -> None:
        self.config = config
        self.poll_seconds = poll_seconds
        self.table = StageTable.empty()
        """What requests read (once each); replaced whole by :meth:`refresh`."""
        self.placements = tuple(
            self._placement(stage, str(getattr(config, stage))) for stage in STAGES
        )
        """One :class:`Placement` per stage code."""
        self.store: EventStore | None = None
        self._version: tuple[datetime | None, int] | None = None
        self._mapped: dict[int, _Mapped] = {}
        self._lock = threading.Lock()
        self._poller = Poller(
            "affinity-stages",
            poll_seconds,
            self.refresh,
            "reading user_segments failed; keeping the stages",
        )

    def _placement(self, stage: str, name: str) -> Placement:
        return Placement(stage, name, self.config.strategy(name), stage_fields(stage, name))

    # ------------------------------------------------------------ requests
    def place(self, user_id: str, users: Vocabulary) -> Placement:
        """The placement of ``user_id`` for a model whose users are ``users``."""
        mapped = self._mapped.get(id(users))
        table = self.table
        if mapped is None or mapped.table is not table or mapped.vocabulary is not users:
            mapped = self._map(table, users)
        index = users.get(user_id)
        if index != MISSING:
            return self.placements[mapped.codes[index]]
        return self.placements[mapped.others.get(user_id, NEW_CODE)]

    def _map(self, table: StageTable, users: Vocabulary) -> _Mapped:
        with self._lock:
            mapped = self._mapped.get(id(users))
            if mapped is not None and mapped.table is table and mapped.vocabulary is users:
                return mapped  # another thread mapped it meanwhile
            codes, others = map_onto(table, users)
            mapped = _Mapped(table, users, codes, others)
            if len(self._mapped) >= VOCABULARY_MAPS and id(users) not in self._mapped:
                self._mapped.clear()
            self._mapped[id(users)] = mapped
            return mapped

    def prepare(self, users: Vocabulary) -> None:
        """Map the table onto ``users`` now (a model just loaded), not on a request."""
        self._map(self.table, users)

    # ------------------------------------------------------------ the store
    def attach(self, store: EventStore) -> None:
        """Read ``store``'s stages now and follow its new computations from now on."""
        self.store = store
        try:
            self.refresh()
        except Exception as exc:
            logger.error("cannot read user_segments yet: %s", exc)
        self._poller.start()

    def wake(self) -> None:
        """Check the store now instead of at the next poll."""
        self._poller.wake()

    def refresh(self) -> bool:
        """Reload the stages if ``affinity segments`` wrote a new computation; returns whether
        it did."""
        store = self.store
        if store is None:
            return False
        version = table_version(store)
        if version == self._version:
            return False
        table = read_table(store)
        users = [m.vocabulary for m in list(self._mapped.values())]
        self.table = table  # one assignment: a request sees the old table or the new one
        self._version = version
        for vocabulary in users:  # the models in service, mapped here rather than on a request
            self.prepare(vocabulary)
        counts = np.bincount(table.codes, minlength=len(STAGES))
        logger.info(
            "lifecycle stages of %d users (computed %s): %s",
            len(table),
            table.computed_at.isoformat() if table.computed_at is not None else "never",
            ", ".join(f"{s} {int(n)}" for s, n in zip(STAGES, counts, strict=True)),
        )
        return True

    def stop(self) -> None:
        self._poller.stop()
