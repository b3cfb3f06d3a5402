"""Live experiments: which arm (model) answers which user, stored durably, the same on every worker.

An experiment names two or more arms, each a registered model (an alias such as ``champion`` or
``challenger``, or a version number) with a share of the users; shadow arms rank the same
requests without being shown. A user's arm follows from hashing ``(salt, user id)`` into
:data:`BUCKETS` buckets and the experiment's **allocation**, the arm of every bucket, kept in
the configuration itself. So a user's arm is the same on every request, worker and restart, and
does not depend on which model an alias points at. Changing the shares moves only as many
buckets as the change needs (:func:`reallocate`): the users of the arms that keep their share
never move.

Experiments live in the event store's ``experiments`` table (:class:`ExperimentBook`), so every
worker and host sees the same ones; at most one runs at a time (per store), and a stopped one
keeps its configuration for its report.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import insert, select, update

from models.errors import ConflictError, InvalidInputError, NotFoundError
from service.events import EXPERIMENTS, MAX_ID, EventStore

BUCKETS = 10_000
"""Users are hashed into this many buckets; a share is a whole number of buckets (0.01%)."""
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""Experiment and arm names: what fits a label, a file name and an MLflow tag."""
METRICS = ("ctr", "conversion", "revenue")
"""Primary metrics an experiment can be decided on: click-through rate per impression, share of
users who converted, and revenue per user."""
RUNNING, STOPPED = "running", "stopped"


class ExperimentError(ConflictError):
    """An experiment request that conflicts with the stored state (FAILED_PRECONDITION)."""


class ExperimentNotFound(NotFoundError):
    """No experiment of that name (NOT_FOUND)."""


def salt_key(salt: str) -> bytes:
    """The hash key of ``salt`` (any length: keyed BLAKE2b takes at most 64 bytes)."""
    return hashlib.blake2b(salt.encode("utf-8", "surrogatepass"), digest_size=32).digest()


def bucket_of(user_id: str, key: bytes) -> int:
    """The bucket in ``[0, BUCKETS)`` of ``user_id`` under a :func:`salt_key`; stable across
    processes, hosts and Python versions (keyed BLAKE2b, not Python's salted ``hash``)."""
    digest = hashlib.blake2b(
        user_id.encode("utf-8", "surrogatepass"), digest_size=8, key=key
    ).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def keyed_hasher(key: bytes) -> Any:
    """A keyed BLAKE2b ready for :func:`bucket_with` (copying it skips the key setup)."""
    return hashlib.blake2b(digest_size=8, key=key)


def bucket_with(user_id: str, hasher: Any) -> int:
    """:func:`bucket_of` with a :func:`keyed_hasher` of the same key (the request path)."""
    h = hasher.copy()
    h.update(user_id.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest(), "big") % BUCKETS


def bucket(user_id: str, salt: str) -> int:
    """The user's bucket in ``[0, BUCKETS)`` under ``salt``."""
    return bucket_of(user_id, salt_key(salt))


class Arm(BaseModel):
    """One arm: a name, the registered model it serves, and its share of users."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    model: str
    """A registry alias (``champion``, ``challenger``) or version number (``7``) of the served
    model's name; on a server started from a local directory, a directory path."""
    share: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of the users (a multiple of 0.0001); 0 for a shadow arm."""
    shadow: bool = False
    """Ranks every request of the experiment and records its list, never returned."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError(
                f"{value!r} is not a name: 1-64 letters, digits, '_', '.', '-', "
                "starting with a letter or digit"
            )
        return value

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        value = value.strip()
        if not value or len(value) > 1000:
            raise ValueError("must be an alias, a version number or a path (1-1000 characters)")
        return value

    @property
    def buckets(self) -> int:
        return round(self.share * BUCKETS)


class ExperimentConfig(BaseModel):
    """A validated experiment definition (what ``affinity experiment start`` and the admin RPC
    take); :attr:`allocation` is filled in by :class:`ExperimentBook`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    arms: list[Arm]
    control: str = ""
    """The arm the others are compared with (default: the first live arm)."""
    salt: str = ""
    """Mixed into the user hash (default: the name), so two experiments split users apart."""
    primary_metric: Literal["ctr", "conversion", "revenue"] = "ctr"
    min_users: int = Field(1000, ge=1, le=100_000_000)
    """Users per arm before ``--promote-when-better`` may decide."""
    allocation: list[tuple[int, int, str]] = Field(default_factory=list)
    """The arm of every bucket as ``(start, end, arm)`` runs (end exclusive)."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return Arm._name(value)

    @field_validator("salt")
    @classmethod
    def _salt(cls, value: str) -> str:
        if len(value) > MAX_ID:
            raise ValueError(f"at most {MAX_ID} characters")
        return value

    @model_validator(mode="after")
    def _arms(self) -> ExperimentConfig:
        names = [arm.name for arm in self.arms]
        if len(self.arms) < 2:
            raise ValueError("arms: an experiment needs at least two arms")
        if len(set(names)) != len(names):
            raise ValueError("arms: arm names must be unique")
        live = [arm for arm in self.arms if not arm.shadow]
        if not live:
            raise ValueError("arms: at least one arm must be live (not shadow)")
        for i, arm in enumerate(self.arms):
            if arm.shadow and arm.share:
                raise ValueError(f"arms.{i}.share: a shadow arm takes no share of the users")
            if not arm.shadow and arm.share <= 0:
                raise ValueError(f"arms.{i}.share: a live arm needs a share above 0")
            if abs(arm.share * BUCKETS - arm.buckets) > 1e-6:
                raise ValueError(f"arms.{i}.share: {arm.share} is not a multiple of 0.0001")
        total = sum(arm.buckets for arm in live)
        if total != BUCKETS:
            raise ValueError(f"arms: the live arms' shares add up to {total / BUCKETS:g}, not 1")
        if not self.control:
            self.control = live[0].name
        elif self.control not in {arm.name for arm in live}:
            raise ValueError(f"control: {self.control!r} is not one of the live arms")
        if not self.salt:
            self.salt = self.name
        return self

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)

    @property
    def live_arms(self) -> list[Arm]:
        return [arm for arm in self.arms if not arm.shadow]

    @property
    def shadow_arms(self) -> list[Arm]:
        return [arm for arm in self.arms if arm.shadow]

    def bucket_arms(self) -> np.ndarray:
        """The index (into :attr:`arms`) of every bucket's arm, from :attr:`allocation`."""
        index = {arm.name: i for i, arm in enumerate(self.arms)}
        out = np.full(BUCKETS, -1, dtype=np.int16)
        for start, end, name in self.allocation:
            out[start:end] = index[name]
        return out

    def assign(self, user_id: str) -> str:
        """The arm of ``user_id`` (slow path for tools; the server keeps :meth:`bucket_arms`)."""
        return self.arms[int(self.bucket_arms()[bucket(user_id, self.salt)])].name


def parse_config(data: dict[str, Any]) -> ExperimentConfig:
    """Validate ``data``; raises :class:`InvalidInputError` naming the first bad field."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        field_name = where or message.split(":", 1)[0]
        text = f"{where}: {message}" if where else message
        raise InvalidInputError(f"experiment {text}", field=field_name) from None


def reallocate(
    arms: Sequence[Arm], previous: Sequence[tuple[int, int, str]] = ()
) -> list[tuple[int, int, str]]:
    """The allocation of ``arms``' shares that moves the fewest buckets away from ``previous``.

    Buckets of removed arms and the highest buckets of arms whose share shrank are freed; arms
    whose share grew take freed buckets, lowest first, in arm order. Without a previous
    allocation the live arms take consecutive ranges in their order.
    """
    live = [arm for arm in arms if not arm.shadow]
    want = {arm.name: arm.buckets for arm in live}
    owner = np.full(BUCKETS, -1, dtype=np.int32)
    index = {arm.name: i for i, arm in enumerate(live)}
    for start, end, name in previous:
        if name in index:
            owner[start:end] = index[name]
    for i, arm in enumerate(live):
        held = np.flatnonzero(owner == i)
        if len(held) > want[arm.name]:
            owner[held[want[arm.name] :]] = -1
    free = list(np.flatnonzero(owner == -1))
    for i, arm in enumerate(live):
        missing = want[arm.name] - int(np.count_nonzero(owner == i))
        if missing > 0:
            owner[free[:missing]] = i
            free = free[missing:]
    return _runs(owner, [arm.name for arm in live])


def _runs(owner: np.ndarray, names: list[str]) -> list[tuple[int, int, str]]:
    edges = np.flatnonzero(np.diff(owner)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [BUCKETS]])
    return [(int(s), int(e), names[int(owner[s])]) for s, e in zip(starts, ends, strict=True)]


@dataclass(frozen=True)
class Experiment:
    """A stored experiment: its configuration, status and revision."""

    config: ExperimentConfig
    status: str
    revision: int
    created_at: datetime
    updated_at: datetime

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def running(self) -> bool:
        return self.status == RUNNING

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "revision": self.revision,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "config": self.config.model_dump(mode="json"),
        }


class ExperimentBook:
    """The experiments of an event store: start, change shares, stop, read."""

    def __init__(self, store: EventStore) -> None:
        self.store = store

    def _write(self) -> Any:
        """A write transaction that takes the database's write lock up front (``BEGIN
        IMMEDIATE`` on SQLite): a read-then-write transaction would otherwise fail at once,
        instead of waiting, when another writer (the response recorder) holds the lock."""
        return self.store.engine.execution_options(affinity_write=True).begin()

    def _row(self, conn: Any, name: str) -> Any:
        return (
            conn.execute(select(EXPERIMENTS).where(EXPERIMENTS.c.name == name)).mappings().first()
        )

    def get(self, name: str) -> Experiment:
        with self.store.engine.connect() as conn:
            row = self._row(conn, name)
        if row is None:
            raise ExperimentNotFound(f"no experiment named {name!r}")
        return _experiment(row)

    def list(self) -> list[Experiment]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(EXPERIMENTS).order_by(EXPERIMENTS.c.created_at)).mappings()
            return [_experiment(row) for row in rows]

    def running(self) -> Experiment | None:
        """The running experiment, if any (what every worker polls)."""
        with self.store.engine.connect() as conn:
            row = (
                conn.execute(select(EXPERIMENTS).where(EXPERIMENTS.c.status == RUNNING))
                .mappings()
                .first()
            )
        return None if row is None else _experiment(row)

    def start(self, config: ExperimentConfig) -> Experiment:
        """Store and run a new experiment (or run a stopped one of the same name again with this
        configuration, keeping its buckets where the shares allow)."""
        now = datetime.now(UTC)
        with self._write() as conn:
            other = (
                conn.execute(select(EXPERIMENTS.c.name).where(EXPERIMENTS.c.status == RUNNING))
                .scalars()
                .first()
            )
            if other is not None:
                raise ExperimentError(
                    f"experiment {other!r} is running; stop it before starting {config.name!r}"
                )
            row = self._row(conn, config.name)
            previous = _experiment(row).config.allocation if row is not None else []
            if row is not None and _experiment(row).config.salt != config.salt:
                previous = []  # another salt reshuffles every user anyway
            config = config.model_copy(update={"allocation": reallocate(config.arms, previous)})
            data = config.model_dump(mode="json")
            if row is None:
                conn.execute(
                    insert(EXPERIMENTS).values(
                        name=config.name,
                        config=data,
                        status=RUNNING,
                        revision=1,
                        created_at=now,
                        updated_at=now,
                    )
                )
            else:
                conn.execute(
                    update(EXPERIMENTS)
                    .where(EXPERIMENTS.c.name == config.name)
                    .values(
                        config=data,
                        status=RUNNING,
                        revision=EXPERIMENTS.c.revision + 1,
                        updated_at=now,
                    )
                )
        return self.get(config.name)

    def set_shares(self, name: str, shares: dict[str, float]) -> Experiment:
        """Change the live arms' shares of a running experiment, moving the fewest users."""
        with self._write() as conn:
            row = self._row(conn, name)
            if row is None:
                raise ExperimentNotFound(f"no experiment named {name!r}")
            current = _experiment(row).config
            unknown = sorted(set(shares) - {arm.name for arm in current.live_arms})
            if unknown:
                raise InvalidInputError(
                    f"shares name {unknown[0]!r}, not a live arm of {name!r}", field="shares"
                )
            arms = [
                arm.model_copy(update={"share": shares.get(arm.name, arm.share)})
                if not arm.shadow
                else arm
                for arm in current.arms
            ]
            data = current.model_dump(mode="json")
            data["arms"] = [arm.model_dump(mode="json") for arm in arms]
            config = parse_config(data)
            config.allocation = reallocate(config.arms, current.allocation)
            conn.execute(
                update(EXPERIMENTS)
                .where(EXPERIMENTS.c.name == name)
                .values(
                    config=config.model_dump(mode="json"),
                    revision=EXPERIMENTS.c.revision + 1,
                    updated_at=datetime.now(UTC),
                )
            )
        return self.get(name)

    def stop(self, name: str) -> Experiment:
        """Stop ``name``: every worker goes back to the champion alone; its records stay."""
        with self._write() as conn:
            row = self._row(conn, name)
            if row is None:
                raise ExperimentNotFound(f"no experiment named {name!r}")
            if row["status"] != STOPPED:
                conn.execute(
                    update(EXPERIMENTS)
                    .where(EXPERIMENTS.c.name == name)
                    .values(
                        status=STOPPED,
                        revision=EXPERIMENTS.c.revision + 1,
                        updated_at=datetime.now(UTC),
                    )
                )
        return self.get(name)


def _experiment(row: Any) -> Experiment:
    data = row["config"]
    if isinstance(data, str):
        data = json.loads(data)
    config = ExperimentConfig.model_validate(data)
    return Experiment(
        config=config,
        status=row["status"],
        revision=int(row["revision"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )
