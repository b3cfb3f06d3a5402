"""What the console's pages show, read from the one source of each fact: the gRPC API (the
serving model, experiments, profiles, recommendations, audiences), the event store (answers,
events, segments), MLflow (the runs behind model versions, the last segments computation) and
the server's Prometheus metrics (:mod:`service.console.metrics`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from sqlalchemy import func, select

from models.lifecycle import STAGES
from protos.affinity.v1 import recommender_pb2 as pb
from protos.affinity.v1 import recommender_pb2_grpc as pb_grpc
from service.client import AffinityClient, ExperimentInfo, ModelInfo, Result
from service.events import (
    EVENTS,
    MAX_ID,
    RESPONSES,
    SEGMENT_HISTORY,
    USER_SEGMENTS,
    Event,
    EventStore,
)

logger = logging.getLogger(__name__)

SEGMENTS_EXPERIMENT = "affinity-segments"
"""The MLflow experiment ``affinity segments`` logs its runs to (affinity/segments.py)."""
NO_PREVIOUS, GONE = "(none)", "(gone)"
"""The transition matrix's row of newcomers and column of users no longer there."""
MAX_LISTED = 200
"""Users listed for one cell of the transition matrix."""
MAX_AUDIENCE_PREVIEW = 100_000
"""The largest audience the console counts (a bigger one is exported, not previewed)."""


class Unavailable(Exception):
    """A part of a page that cannot be shown now; the message says why (shown on the page)."""


def rpc_problem(exc: grpc.RpcError) -> str:
    """A one-line account of a failed call, for the page."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return "the server does not answer this yet (UNIMPLEMENTED)"
    name = code.name if code is not None else "ERROR"
    return f"{name}: {details or 'no details'}"


# --------------------------------------------------------------------- the gRPC API


@dataclass
class Api:
    """The gRPC API as the console uses it: :class:`AffinityClient` for the calls it has, and
    the generated stub for ``GetUserProfile`` and ``FindAudience`` (their proto messages are the
    contract the pages render)."""

    target: str
    token: str | None = None
    admin_token: str | None = None
    root_certificates: bytes | None = None
    timeout: float = 5.0
    _client: AffinityClient | None = field(default=None, init=False, repr=False)
    _channel: grpc.Channel | None = field(default=None, init=False, repr=False)

    @property
    def client(self) -> AffinityClient:
        if self._client is None:
            self._client = AffinityClient(
                self.target,
                token=self.token,
                root_certificates=self.root_certificates,
                timeout=self.timeout,
            )
        return self._client

    @property
    def stub(self) -> pb_grpc.RecommenderStub:
        if self._channel is None:
            if self.root_certificates is not None:
                creds = grpc.ssl_channel_credentials(self.root_certificates or None)
                self._channel = grpc.secure_channel(self.target, creds)
            else:
                self._channel = grpc.insecure_channel(self.target)
        return pb_grpc.RecommenderStub(self._channel)

    def _metadata(self, admin: bool = False) -> tuple[tuple[str, str], ...]:
        token = self.admin_token if admin else self.token
        return (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._channel is not None:
            self._channel.close()

    def model_info(self) -> ModelInfo:
        return self.client.model_info()

    def experiments(self) -> list[ExperimentInfo]:
        return self.client.experiments()

    def recommend(self, user_id: str, k: int = 10) -> Result:
        return self.client.recommend(user_id, k)

    def similar_items(self, item_ids: Sequence[str], k: int = 5) -> Result:
        return self.client.similar_items(item_ids, k)

    def user_profile(self, user_id: str) -> pb.UserProfile:
        response: pb.UserProfile = self.stub.GetUserProfile(
            pb.GetUserProfileRequest(user_id=user_id),
            timeout=self.timeout,
            metadata=self._metadata(),
        )
        return response

    def find_audience(self, request: pb.FindAudienceRequest) -> Iterator[pb.AudienceMember]:
        """The audience's members, streamed best first (an admin RPC)."""
        call: Iterator[pb.AudienceMember] = self.stub.FindAudience(
            request, timeout=max(self.timeout, 60.0), metadata=self._metadata(admin=True)
        )
        return call

    def start_experiment(
        self, name: str, arms: Sequence[tuple[str, str, float, bool]], **options: Any
    ) -> ExperimentInfo:
        return self.client.start_experiment(name, arms, admin_token=self.admin_token, **options)

    def stop_experiment(self, name: str) -> ExperimentInfo:
        return self.client.stop_experiment(name, admin_token=self.admin_token)


# --------------------------------------------------------------------- MLflow


@dataclass(frozen=True)
class RunFacts:
    """The MLflow run behind a model version: when it trained and on how much data."""

    run_id: str
    started: datetime | None
    train_rows: int | None
    train_users: int | None
    train_items: int | None
    fingerprint: str = ""


def run_facts(tracking_uri: str | None, run_id: str) -> RunFacts | None:
    """The run's start time and training-data sizes; ``None`` when MLflow has no such run."""
    if not run_id:
        return None
    try:
        from mlflow.tracking import MlflowClient

        run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except Exception as exc:  # an unreachable tracking server: the page says so
        logger.info("console: no run %s: %s", run_id, exc)
        return None
    metrics = run.data.metrics

    def count(*names: str) -> int | None:
        for name in names:
            if name in metrics:
                return int(metrics[name])
        return None

    started = run.info.start_time
    return RunFacts(
        run_id=run_id,
        started=datetime.fromtimestamp(started / 1000, UTC) if started else None,
        train_rows=count("split_train_rows", "data_n_interactions", "data_rows"),
        train_users=count("split_train_users", "data_n_users"),
        train_items=count("split_train_items", "data_n_items"),
        fingerprint=str(run.data.tags.get("dataset_fingerprint", "")),
    )


@dataclass(frozen=True)
class Transitions:
    """Who moved between stages at the last ``affinity segments`` computation."""

    rows: list[str]
    cols: list[str]
    users: list[list[int]]
    as_of: str
    previous_as_of: str | None
    run_id: str


def last_transitions(tracking_uri: str | None) -> Transitions | None:
    """The transition matrix the last segments run logged (``transitions/transitions.json``)."""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        experiment = client.get_experiment_by_name(SEGMENTS_EXPERIMENT)
        if experiment is None:
            return None
        runs = client.search_runs(
            [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
        )
        if not runs:
            return None
        run = runs[0]
        data = _load_dict(client, run.info.run_id)
    except Exception as exc:
        logger.info("console: no transitions: %s", exc)
        return None
    return Transitions(
        rows=[str(r) for r in data["from"]],
        cols=[str(c) for c in data["to"]],
        users=[[int(n) for n in row] for row in data["users"]],
        as_of=str(data.get("as_of") or ""),
        previous_as_of=data.get("previous_as_of"),
        run_id=run.info.run_id,
    )


def _load_dict(client: Any, run_id: str) -> dict[str, Any]:
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="affinity-console-") as tmp:
        path = client.download_artifacts(run_id, "transitions/transitions.json", tmp)
        with open(path, encoding="utf-8") as handle:
            loaded: dict[str, Any] = json.load(handle)
    return loaded


# --------------------------------------------------------------------- the event store


@dataclass(frozen=True)
class Swap:
    """A model version's first recorded answer: when it went live (per experiment arm)."""

    model_name: str
    model_version: str
    arm: str
    first_served: datetime
    answers: int


def recent_swaps(store: EventStore, now: datetime, days: float = 30, limit: int = 10) -> list[Swap]:
    """The model versions that answered within ``days``, newest first: a version's first
    recorded answer is when it went into service (the recorder keeps every answer)."""
    since = now - timedelta(days=days)
    arm = func.coalesce(RESPONSES.c.arm, "")
    stmt = (
        select(
            RESPONSES.c.model_name,
            RESPONSES.c.model_version,
            arm.label("arm"),
            func.min(RESPONSES.c.served_at).label("first"),
            func.count().label("answers"),
        )
        .where(RESPONSES.c.served_at >= since, RESPONSES.c.method != "shadow")
        .group_by(RESPONSES.c.model_name, RESPONSES.c.model_version, arm)
    )
    with store.engine.connect() as conn:
        rows = conn.execute(stmt).all()
    swaps = [
        Swap(r.model_name, r.model_version, r.arm, _utc(r.first), int(r.answers)) for r in rows
    ]
    return sorted(swaps, key=lambda s: s.first_served, reverse=True)[:limit]


def _utc(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Rates:
    """Answers recorded and events received over the last hour, per minute."""

    answers: int
    events: int
    answers_by_method: dict[str, int]
    events_by_name: dict[str, int]
    minutes: float

    @property
    def answers_per_minute(self) -> float:
        return self.answers / self.minutes

    @property
    def events_per_minute(self) -> float:
        return self.events / self.minutes


def hour_rates(store: EventStore, now: datetime) -> Rates:
    """Every worker's answers and events of the last hour, from the store."""
    since = now - timedelta(hours=1)
    with store.engine.connect() as conn:
        answers: dict[Any, Any] = dict(
            conn.execute(
                select(RESPONSES.c.method, func.count())
                .where(RESPONSES.c.served_at >= since)
                .group_by(RESPONSES.c.method)
            ).all()
        )
        events: dict[Any, Any] = dict(
            conn.execute(
                select(EVENTS.c.event, func.count())
                .where(EVENTS.c.received_at >= since)
                .group_by(EVENTS.c.event)
            ).all()
        )
    return Rates(
        answers=int(sum(answers.values())),
        events=int(sum(events.values())),
        answers_by_method={str(k): int(v) for k, v in sorted(answers.items())},
        events_by_name={str(k): int(v) for k, v in sorted(events.items())},
        minutes=60.0,
    )


@dataclass(frozen=True)
class Segments:
    """Users per stage and tier now, and the sizes at each computation."""

    stages: dict[str, int]
    tiers: dict[str, int]
    users: int
    as_of: datetime | None
    computed_at: datetime | None
    history: dict[str, list[tuple[datetime, int]]]
    """Stage -> (as_of, users) at each computation, oldest first."""
    tier_history: dict[str, list[tuple[datetime, int]]]


def segments(store: EventStore) -> Segments:
    """The stored segments (``user_segments``) and their history (``segment_history``)."""
    with store.engine.connect() as conn:
        stage_rows = conn.execute(
            select(USER_SEGMENTS.c.stage, func.count()).group_by(USER_SEGMENTS.c.stage)
        ).all()
        tier_rows = conn.execute(
            select(USER_SEGMENTS.c.tier, func.count()).group_by(USER_SEGMENTS.c.tier)
        ).all()
        when = conn.execute(
            select(func.max(USER_SEGMENTS.c.as_of), func.max(USER_SEGMENTS.c.computed_at))
        ).one()
        history_rows = conn.execute(
            select(
                SEGMENT_HISTORY.c.as_of,
                SEGMENT_HISTORY.c.kind,
                SEGMENT_HISTORY.c.name,
                SEGMENT_HISTORY.c.users,
            ).order_by(SEGMENT_HISTORY.c.as_of)
        ).all()
    found = {str(s): int(n) for s, n in stage_rows}
    stages = {name: found.pop(name, 0) for name in STAGES} | found
    tiers = {str(t): int(n) for t, n in sorted(tier_rows, key=lambda r: -int(r[1]))}
    history: dict[str, list[tuple[datetime, int]]] = {}
    tier_history: dict[str, list[tuple[datetime, int]]] = {}
    for row in history_rows:
        target = history if row.kind == "stage" else tier_history
        target.setdefault(str(row.name), []).append((_utc(row.as_of), int(row.users)))
    return Segments(
        stages=stages,
        tiers=tiers,
        users=sum(stages.values()),
        as_of=_utc(when[0]) if when[0] is not None else None,
        computed_at=_utc(when[1]) if when[1] is not None else None,
        history={name: history[name] for name in STAGES if name in history},
        tier_history=tier_history,
    )


@dataclass(frozen=True)
class CellUsers:
    """The users of one cell of the transition matrix, as far as the store can tell."""

    user_ids: list[str]
    total: int
    note: str


def cell_users(
    store: EventStore, frm: str, to: str, previous_as_of: datetime | None, limit: int = MAX_LISTED
) -> CellUsers:
    """Users who went from stage ``frm`` to ``to`` at the last computation (each user's row
    keeps the stage the computation before gave them, ``previous_stage``; NULL for newcomers).
    Users no longer there (``(gone)``) are not stored any more.
    """
    if to == GONE:
        return CellUsers([], 0, "users no longer in the segments are not stored any more")
    seg = USER_SEGMENTS.c
    where = [seg.stage == to]
    if previous_as_of is None:
        note = "no previous computation: every user of the stage is new to it"
    elif frm == NO_PREVIOUS:
        where.append(seg.previous_stage.is_(None))
        note = "users the previous computation did not have"
    elif frm == to:
        where.append(seg.previous_stage == frm)
        note = f"users who stayed in {to}"
    else:
        where.append(seg.previous_stage == frm)
        note = f"users who moved from {frm} to {to}"
    with store.engine.connect() as conn:
        total = int(conn.execute(select(func.count()).where(*where)).scalar_one())
        ids = conn.execute(
            select(seg.user_id).where(*where).order_by(seg.user_id).limit(limit)
        ).scalars()
        return CellUsers([str(u) for u in ids], total, note)


def recent_events(store: EventStore, user_id: str, limit: int = 20) -> list[Event]:
    return store.events_for_user(user_id[:MAX_ID], limit=limit)
