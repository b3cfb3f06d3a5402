"""A small Python client of the Affinity gRPC API, returning plain dataclasses.

Example::

    with AffinityClient("localhost:50051", token="s3cret") as client:
        result = client.recommend("user-42", k=10, recent_item_ids=["item-7"])
        for item in result.items:
            print(item.item_id, item.score)

Ranking rules go with a list request as ``rules``: a ``RankingRules`` message, or a mapping of
its fields (field names as in the ``.proto``)::

    client.recommend(
        "user-42",
        k=10,
        rules={
            "diversity": {"max_per_category": 3, "mmr": 0.2},
            "boosts": [{"categories": ["sale"], "factor": 1.5}],
            "promotion": {"categories": ["new"], "share": 0.2},
        },
    )

Each item says why it is there (``Item.reason``: ``model``, ``boosted``, ``promoted`` or
``explored``).

Events go back with :meth:`AffinityClient.log_events`; an UNAVAILABLE error there means nothing
was acknowledged, and the same events (same ids) should be sent again.

Several replicas: give a list of ``host:port`` addresses, or one ``dns:///NAME:PORT`` name that
resolves to all of them (a Kubernetes headless Service); calls then go round-robin over the
replicas whose health service reports SERVING::

    AffinityClient(["10.0.0.5:50051", "10.0.0.6:50051"])
    AffinityClient("dns:///affinity.recs.svc.cluster.local:50051")

Errors surface as :class:`grpc.RpcError` with the server's status code and message.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, NamedTuple

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from models.errors import InvalidInputError
from protos.affinity.v1 import recommender_pb2 as pb
from protos.affinity.v1 import recommender_pb2_grpc as pb_grpc

_SOURCE_NAMES = {
    pb.SOURCE_UNSPECIFIED: "",
    pb.SOURCE_PERSONALIZED: "personalized",
    pb.SOURCE_FOLD_IN: "fold_in",
    pb.SOURCE_POPULAR: "popular",
}
_REASON_NAMES = {
    pb.REASON_MODEL: "model",
    pb.REASON_BOOSTED: "boosted",
    pb.REASON_PROMOTED: "promoted",
    pb.REASON_EXPLORED: "explored",
}

HEALTH_CHECKED_SERVICE = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
"""The name a balanced client watches on each replica's health service; the server reports it
as it reports ``""``: NOT_SERVING until a model is loaded and once it is shutting down."""

BALANCED_SCHEMES = ("dns:", "ipv4:", "ipv6:")
"""Targets with these name-resolver schemes may stand for several replicas."""

Rules = pb.RankingRules | Mapping[str, Any]
"""A list's ranking rules: the message, or a mapping of its fields (``{"diversity":
{"max_per_category": 3}}``)."""


@dataclass(frozen=True)
class Item:
    """One recommended item."""

    item_id: str
    score: float
    item_type: str = ""
    category: str = ""
    reason: str = "model"
    """Why it is in the list: ``model``, ``boosted``, ``promoted`` or ``explored``."""


@dataclass(frozen=True)
class ModelRef:
    """The model that answered a request."""

    name: str
    version: str
    run_id: str
    algorithm: str


@dataclass(frozen=True)
class Result:
    """A ranked list (best first) and where it came from."""

    items: list[Item]
    model: ModelRef
    recommendation_id: str
    source: str = ""
    """``personalized``, ``fold_in`` or ``popular`` (``Recommend`` only)."""
    experiment: str = ""
    """The live experiment the user is in (``Recommend`` while one runs; else empty)."""
    arm: str = ""
    """The user's arm of :attr:`experiment`."""
    stage: str = ""
    """The user's lifecycle stage (``Recommend`` while the server's stage strategies are on)."""
    strategy: str = ""
    """The strategy the user's stage gave the list (``personalized``, ``new_user``, ...)."""

    @property
    def item_ids(self) -> list[str]:
        return [item.item_id for item in self.items]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelInfo:
    """What ``GetModelInfo`` reports about the model in service."""

    model: ModelRef
    loaded_at: datetime | None
    num_users: int
    num_items: int
    source_uri: str
    from_cache: bool
    dataset_fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["loaded_at"] = self.loaded_at.isoformat() if self.loaded_at else None
        return data


@dataclass(frozen=True)
class Event:
    """One thing a user did, to send with :meth:`AffinityClient.log_events`."""

    event_id: str
    user_id: str
    item_id: str
    event: str
    timestamp: datetime | None = None
    """Timezone-aware; ``None``: the server's time on arrival."""
    value: float | None = None
    """``None``: 1."""
    price: float | None = None
    recommendation_id: str = ""
    shown_item_ids: Sequence[str] = field(default_factory=tuple)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        """An event from a mapping of the same names; ``timestamp`` may be ISO 8601 text."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(
                f"unknown event field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
                field=unknown[0],
            )
        values = dict(data)
        timestamp = values.get("timestamp")
        if isinstance(timestamp, str):
            try:
                values["timestamp"] = datetime.fromisoformat(timestamp)
            except ValueError:
                raise InvalidInputError(
                    f"timestamp {timestamp!r} is not ISO 8601", field="timestamp"
                ) from None
        try:
            return cls(**values)
        except TypeError as exc:  # a required field is missing
            raise InvalidInputError(f"event: {exc}") from None

    def to_proto(self) -> pb.Event:
        message = pb.Event(
            event_id=self.event_id,
            user_id=self.user_id,
            item_id=self.item_id,
            event=self.event,
            recommendation_id=self.recommendation_id or "",
            shown_item_ids=list(self.shown_item_ids),
        )
        if self.timestamp is not None:
            if self.timestamp.tzinfo is None:
                raise InvalidInputError(
                    f"event {self.event_id!r}: timestamp must be timezone-aware", field="timestamp"
                )
            message.timestamp.FromDatetime(self.timestamp.astimezone(UTC))
        if self.value is not None:
            message.value = self.value
        if self.price is not None:
            message.price = self.price
        return message


_EVENT_STATUS_NAMES = {
    pb.EVENT_STATUS_UNSPECIFIED: "",
    pb.EVENT_STATUS_ACCEPTED: "accepted",
    pb.EVENT_STATUS_DUPLICATE: "duplicate",
    pb.EVENT_STATUS_REJECTED: "rejected",
}


@dataclass(frozen=True)
class EventOutcome:
    """What the server did with one event."""

    event_id: str
    status: str
    """``accepted``, ``duplicate`` or ``rejected``."""
    reason: str = ""
    """Why it was rejected (starts with the field's name)."""
    field: str = ""


@dataclass(frozen=True)
class LogEventsResult:
    """One outcome per event sent, in order, and their counts."""

    outcomes: list[EventOutcome]
    accepted: int
    duplicates: int
    rejected: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeleteUserResult:
    """What an erasure removed, and when it took effect."""

    user_id: str
    events_deleted: int
    responses_deleted: int
    erased_at: datetime

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["erased_at"] = self.erased_at.isoformat()
        return data


@dataclass(frozen=True)
class UserProfileInfo:
    """A user's profile (``GetUserProfile``; the fields are the proto's ``UserProfile``)."""

    user_id: str
    first_seen: datetime | None
    last_seen: datetime | None
    active_days_7: int
    active_days_30: int
    active_days_90: int
    event_counts: dict[str, int]
    """Events by name, most frequent first."""
    monetary: float
    orders: int
    recency_score: int
    frequency_score: int
    monetary_score: int
    tier: str
    stage: str
    stage_since: datetime | None
    activated_at: datetime | None
    top_categories: dict[str, float]
    """Category -> share of the user's interactions, largest first."""
    item_types: dict[str, float]
    recent_item_ids: list[str]
    segments_as_of: datetime | None
    """When the segments it starts from were computed (``None``: live events only)."""
    live_events: int

    @classmethod
    def from_message(cls, message: pb.UserProfile) -> UserProfileInfo:
        def when(name: str) -> datetime | None:
            if not message.HasField(name):
                return None
            return getattr(message, name).ToDatetime(tzinfo=UTC)  # type: ignore[no-any-return]

        return cls(
            user_id=message.user_id,
            first_seen=when("first_seen"),
            last_seen=when("last_seen"),
            active_days_7=int(message.active_days_7),
            active_days_30=int(message.active_days_30),
            active_days_90=int(message.active_days_90),
            event_counts={c.name: int(c.count) for c in message.event_counts},
            monetary=float(message.monetary),
            orders=int(message.orders),
            recency_score=int(message.recency_score),
            frequency_score=int(message.frequency_score),
            monetary_score=int(message.monetary_score),
            tier=message.tier,
            stage=message.stage,
            stage_since=when("stage_since"),
            activated_at=when("activated_at"),
            top_categories={s.name: float(s.share) for s in message.top_categories},
            item_types={s.name: float(s.share) for s in message.item_types},
            recent_item_ids=list(message.recent_item_ids),
            segments_as_of=when("segments_as_of"),
            live_events=int(message.live_events),
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name, value in data.items():
            if isinstance(value, datetime):
                data[name] = value.isoformat()
        return data


@dataclass(frozen=True)
class ExperimentInfo:
    """An experiment as the server reports it (``GetExperiment`` and the admin RPCs)."""

    name: str
    status: str
    revision: int
    arms: list[dict[str, Any]]
    """``name``, ``model``, ``share``, ``shadow`` of each arm."""
    control: str
    salt: str
    primary_metric: str
    min_users: int
    allocation: list[str]
    created_at: datetime
    updated_at: datetime
    serving: list[dict[str, Any]]
    """Per arm on the answering worker: ``arm``, ``ready``, ``model_version``, ``error``,
    ``fallbacks`` (empty unless the experiment runs)."""

    @classmethod
    def from_proto(cls, message: pb.Experiment) -> ExperimentInfo:
        spec = message.spec
        return cls(
            name=spec.name,
            status=message.status,
            revision=int(message.revision),
            arms=[
                {"name": a.name, "model": a.model, "share": a.share, "shadow": a.shadow}
                for a in spec.arms
            ],
            control=spec.control,
            salt=spec.salt,
            primary_metric=spec.primary_metric,
            min_users=int(spec.min_users),
            allocation=list(message.allocation),
            created_at=message.created_at.ToDatetime(tzinfo=UTC),
            updated_at=message.updated_at.ToDatetime(tzinfo=UTC),
            serving=[
                {
                    "arm": s.arm,
                    "ready": s.ready,
                    "model_version": s.model.version,
                    "error": s.error,
                    "fallbacks": int(s.fallbacks),
                }
                for s in message.arms
            ],
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        data["updated_at"] = self.updated_at.isoformat()
        return data


def _model(ref: pb.ModelRef) -> ModelRef:
    return ModelRef(ref.name, ref.version, ref.run_id, ref.algorithm)


def _items(items: Sequence[pb.ScoredItem]) -> list[Item]:
    return [
        Item(
            i.item_id,
            float(i.score),
            i.item_type,
            i.category,
            _REASON_NAMES.get(i.reason, str(i.reason)),
        )
        for i in items
    ]


def ranking_rules(rules: Rules | None) -> pb.RankingRules | None:
    """``rules`` as a ``RankingRules`` message (a mapping is parsed by field name; an unknown
    field raises :class:`InvalidInputError` naming it)."""
    if rules is None or isinstance(rules, pb.RankingRules):
        return rules
    try:
        return json_format.ParseDict(dict(rules), pb.RankingRules())
    except json_format.ParseError as exc:
        raise InvalidInputError(f"rules: {exc}", field="rules") from None


def _address(target: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    host, colon, port = target.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInputError(f"target {target!r} is not host:port", field="target")
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        raise InvalidInputError(
            f"target {target!r}: several targets must be IP addresses (the channel cannot "
            "re-resolve a list of names); give one dns:///NAME:PORT target instead, which "
            "balances over every address the name resolves to",
            field="target",
        ) from None


def channel_target(target: str | Sequence[str]) -> tuple[str, bool]:
    """The gRPC channel target of ``target`` and whether calls are balanced over replicas.

    A single ``host:port`` (or a one-item list) is used as it is, on one connection. Several
    ``host:port`` IP addresses become one ``ipv4:`` or ``ipv6:`` target, and a target with one
    of :data:`BALANCED_SCHEMES` (``dns:///NAME:PORT``) is kept; both are balanced. Raises
    :class:`InvalidInputError` for an empty list, host names or mixed address families in a
    list, or a ``dns:`` target among others.
    """
    targets = [target] if isinstance(target, str) else list(target)
    if not targets:
        raise InvalidInputError("no target given", field="target")
    if len(targets) == 1:
        return targets[0], targets[0].startswith(BALANCED_SCHEMES)
    if any("/" in t or t.startswith(BALANCED_SCHEMES) for t in targets):
        raise InvalidInputError(
            "a target with a scheme (dns:///NAME:PORT) must be the only one", field="target"
        )
    addresses = [_address(t) for t in targets]
    versions = {a.version for a in addresses}
    if len(versions) > 1:
        raise InvalidInputError(
            "targets mix IPv4 and IPv6 addresses; list one family", field="target"
        )
    ports = [t.rpartition(":")[2] for t in targets]
    if versions == {4}:
        return "ipv4:" + ",".join(f"{a}:{p}" for a, p in zip(addresses, ports, strict=True)), True
    return "ipv6:" + ",".join(f"[{a}]:{p}" for a, p in zip(addresses, ports, strict=True)), True


def balanced_service_config(service: str = HEALTH_CHECKED_SERVICE) -> str:
    """The channel's service config for several replicas: round-robin over the connected ones,
    skipping those whose health service reports ``service`` as anything but SERVING (each
    connection watches it with ``grpc.health.v1.Health/Watch``)."""
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "healthCheckConfig": {"serviceName": service},
        }
    )


class AffinityClient:
    """Calls one Affinity server, or several replicas of it; safe to share between threads.

    ``target`` is ``host:port``, a list of them, or ``dns:///NAME:PORT``; several replicas
    (a list, or a name that resolves to several addresses) get a channel that sends each call to
    the next replica that is connected and reports SERVING, so a replica that drains or has no
    model yet stops getting calls (see :func:`channel_target`). Pass ``root_certificates`` (PEM
    bytes) to use TLS (an empty ``b""`` uses the system roots), ``token`` for bearer-token auth,
    and ``timeout`` as the deadline in seconds of every call. ``options`` are gRPC channel
    options; a ``grpc.service_config`` among them replaces the balanced one.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        timeout: float = 5.0,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        # balanced: calls go round-robin over the replicas that report SERVING.
        self.target, self.balanced = channel_target(target)
        self.timeout = timeout
        channel_options = list(options)
        if self.balanced and not any(name == "grpc.service_config" for name, _ in options):
            channel_options.append(("grpc.service_config", balanced_service_config()))
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates or None)
            self._channel = grpc.secure_channel(self.target, creds, options=channel_options)
        else:
            self._channel = grpc.insecure_channel(self.target, options=channel_options)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._stub = pb_grpc.RecommenderStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> AffinityClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        return method(
            request,
            timeout=self.timeout if timeout is None else timeout,
            metadata=self._metadata,
        )

    @staticmethod
    def _filter(item_types: Sequence[str], categories: Sequence[str]) -> pb.ItemFilter:
        return pb.ItemFilter(item_types=list(item_types), categories=list(categories))

    def recommend(
        self,
        user_id: str,
        k: int = 10,
        *,
        recent_item_ids: Sequence[str] = (),
        exclude_item_ids: Sequence[str] = (),
        item_types: Sequence[str] = (),
        categories: Sequence[str] = (),
        include_seen: bool = False,
        rules: Rules | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Personalized top ``k`` for ``user_id`` (popular items for an unknown user), under
        ``rules`` (the server's default rules for whatever they leave unset)."""
        request = pb.RecommendRequest(
            user_id=user_id,
            k=k,
            recent_item_ids=list(recent_item_ids),
            exclude_item_ids=list(exclude_item_ids),
            filter=self._filter(item_types, categories),
            include_seen=include_seen,
            rules=ranking_rules(rules),
        )
        response = self._call(self._stub.Recommend, request, timeout)
        return Result(
            _items(response.items),
            _model(response.model),
            response.recommendation_id,
            _SOURCE_NAMES.get(response.source, ""),
            response.experiment,
            response.arm,
            response.stage,
            response.strategy,
        )

    def similar_items(
        self,
        item_ids: Sequence[str],
        k: int = 10,
        *,
        exclude_item_ids: Sequence[str] = (),
        item_types: Sequence[str] = (),
        categories: Sequence[str] = (),
        rules: Rules | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Items most similar to all of ``item_ids`` (never the query items themselves);
        ``rules``: diversity, boosts and promotion."""
        request = pb.SimilarItemsRequest(
            item_ids=list(item_ids),
            k=k,
            exclude_item_ids=list(exclude_item_ids),
            filter=self._filter(item_types, categories),
            rules=ranking_rules(rules),
        )
        response = self._call(self._stub.SimilarItems, request, timeout)
        return Result(_items(response.items), _model(response.model), response.recommendation_id)

    def popular(
        self,
        k: int = 10,
        *,
        trending: bool = False,
        exclude_item_ids: Sequence[str] = (),
        item_types: Sequence[str] = (),
        categories: Sequence[str] = (),
        rules: Rules | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Most popular (or trending) items within the filter; ``rules``: diversity, boosts and
        promotion."""
        request = pb.PopularRequest(
            k=k,
            trending=trending,
            exclude_item_ids=list(exclude_item_ids),
            filter=self._filter(item_types, categories),
            rules=ranking_rules(rules),
        )
        response = self._call(self._stub.Popular, request, timeout)
        return Result(_items(response.items), _model(response.model), response.recommendation_id)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """The model currently serving."""
        info = self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        loaded_at = info.loaded_at.ToDatetime(tzinfo=UTC) if info.HasField("loaded_at") else None
        return ModelInfo(
            model=_model(info.model),
            loaded_at=loaded_at,
            num_users=int(info.num_users),
            num_items=int(info.num_items),
            source_uri=info.source_uri,
            from_cache=info.from_cache,
            dataset_fingerprint=info.dataset_fingerprint,
        )

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """``SERVING``, ``NOT_SERVING`` or ``SERVICE_UNKNOWN`` from the standard health service.

        A balanced client asks one of the replicas that report SERVING; with none it fails
        UNAVAILABLE."""
        response = self._health.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=self.timeout if timeout is None else timeout,
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def log_events(
        self, events: Sequence[Event | Mapping[str, Any]], *, timeout: float | None = None
    ) -> LogEventsResult:
        """Send one batch of events (1 to the server's maximum, default 1000).

        OK means every accepted event is committed. On UNAVAILABLE nothing was acknowledged:
        send the same events again (a retry of a stored id is answered ``duplicate``).
        """
        request = pb.LogEventsRequest(
            events=[
                (ev if isinstance(ev, Event) else Event.from_dict(ev)).to_proto() for ev in events
            ]
        )
        response = self._call(self._stub.LogEvents, request, timeout)
        return LogEventsResult(
            outcomes=[
                EventOutcome(o.event_id, _EVENT_STATUS_NAMES.get(o.status, ""), o.reason, o.field)
                for o in response.outcomes
            ],
            accepted=int(response.accepted),
            duplicates=int(response.duplicates),
            rejected=int(response.rejected),
        )

    def delete_user(
        self, user_id: str, *, admin_token: str | None = None, timeout: float | None = None
    ) -> DeleteUserResult:
        """Erase ``user_id`` (an admin RPC): their events and recorded responses are deleted
        and the server treats them as unknown from now on. Sends ``admin_token`` as the bearer
        token when given (else the client's ``token``, which must then be the admin token)."""
        metadata = (("authorization", f"Bearer {admin_token}"),) if admin_token else self._metadata
        response = self._stub.DeleteUser(
            pb.DeleteUserRequest(user_id=user_id),
            timeout=self.timeout if timeout is None else timeout,
            metadata=metadata,
        )
        return DeleteUserResult(
            user_id=user_id,
            events_deleted=int(response.events_deleted),
            responses_deleted=int(response.responses_deleted),
            erased_at=response.erased_at.ToDatetime(tzinfo=UTC),
        )

    def user_profile(self, user_id: str, *, timeout: float | None = None) -> UserProfileInfo:
        """``user_id``'s profile: activity, value, stage and tier, tastes and recent items
        (``GetUserProfile``). Raises ``grpc.RpcError`` NOT_FOUND for a user with none."""
        response = self._stub.GetUserProfile(
            pb.GetUserProfileRequest(user_id=user_id),
            timeout=self.timeout if timeout is None else timeout,
            metadata=self._metadata,
        )
        return UserProfileInfo.from_message(response)

    # ---------------------------------------------------------- experiments
    def _admin(self, admin_token: str | None) -> Any:
        return (("authorization", f"Bearer {admin_token}"),) if admin_token else self._metadata

    def start_experiment(
        self,
        name: str,
        arms: Sequence[tuple[str, str, float] | tuple[str, str, float, bool]],
        *,
        control: str = "",
        salt: str = "",
        primary_metric: str = "",
        min_users: int = 0,
        admin_token: str | None = None,
        timeout: float | None = None,
    ) -> ExperimentInfo:
        """Start experiment ``name`` (an admin RPC) with ``arms`` as ``(name, model, share)``
        or ``(name, model, 0, True)`` for a shadow arm."""
        spec = pb.ExperimentSpec(
            name=name,
            control=control,
            salt=salt,
            primary_metric=primary_metric,
            min_users=min_users,
        )
        for arm in arms:
            shadow = bool(arm[3]) if len(arm) > 3 else False  # type: ignore[misc]
            spec.arms.add(name=arm[0], model=arm[1], share=float(arm[2]), shadow=shadow)
        response = self._stub.StartExperiment(
            pb.StartExperimentRequest(spec=spec),
            timeout=self.timeout if timeout is None else timeout,
            metadata=self._admin(admin_token),
        )
        return ExperimentInfo.from_proto(response)

    def update_experiment(
        self,
        name: str,
        shares: Mapping[str, float],
        *,
        admin_token: str | None = None,
        timeout: float | None = None,
    ) -> ExperimentInfo:
        """Change the live arms' shares of experiment ``name`` (an admin RPC)."""
        response = self._stub.UpdateExperiment(
            pb.UpdateExperimentRequest(name=name, shares=dict(shares)),
            timeout=self.timeout if timeout is None else timeout,
            metadata=self._admin(admin_token),
        )
        return ExperimentInfo.from_proto(response)

    def stop_experiment(
        self, name: str, *, admin_token: str | None = None, timeout: float | None = None
    ) -> ExperimentInfo:
        """Stop experiment ``name`` (an admin RPC)."""
        response = self._stub.StopExperiment(
            pb.StopExperimentRequest(name=name),
            timeout=self.timeout if timeout is None else timeout,
            metadata=self._admin(admin_token),
        )
        return ExperimentInfo.from_proto(response)

    def experiment(self, name: str, *, timeout: float | None = None) -> ExperimentInfo:
        """Experiment ``name`` as stored, with its arms' models on the answering worker."""
        response = self._call(self._stub.GetExperiment, pb.GetExperimentRequest(name=name), timeout)
        return ExperimentInfo.from_proto(response)

    def experiments(self, *, timeout: float | None = None) -> list[ExperimentInfo]:
        """Every experiment, running or stopped, oldest first."""
        response = self._call(self._stub.ListExperiments, pb.ListExperimentsRequest(), timeout)
        return [ExperimentInfo.from_proto(e) for e in response.experiments]

    # ------------------------------------------------------------ audiences
    def find_audience(
        self,
        *,
        item_ids: Sequence[str] = (),
        category: str = "",
        stages: Sequence[str] = (),
        tiers: Sequence[str] = (),
        last_seen_within_days: float | None = None,
        exclude_interacted: bool = False,
        max_users: int = 1000,
        max_audiences_per_user: int = 0,
        cap_window_days: float = 0.0,
        record: bool = False,
        name: str = "",
        admin_token: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[AudienceMember]:
        """The users most likely to engage with ``item_ids`` or ``category`` (exactly one),
        best first, as the server streams them (an admin RPC; see ``FindAudienceRequest`` in
        the ``.proto`` for each filter). ``record`` stores the audience (named ``name``) so it
        counts toward its members' frequency cap. ``timeout`` bounds the whole stream."""
        request = pb.FindAudienceRequest(
            item_ids=list(item_ids),
            category=category,
            stages=list(stages),
            tiers=list(tiers),
            exclude_interacted=exclude_interacted,
            max_users=max_users,
            max_audiences_per_user=max_audiences_per_user,
            cap_window_days=cap_window_days,
            record=record,
            name=name,
            batch_size=CLIENT_BATCH,
        )
        if last_seen_within_days is not None:
            request.last_seen_within_days = last_seen_within_days
        stream = self._stub.FindAudience(
            request,
            timeout=self.timeout if timeout is None else timeout,
            metadata=self._admin(admin_token),
        )
        for message in stream:
            for member in message.batch or (message,):
                yield AudienceMember(member.user_id, member.score, int(member.rank))


CLIENT_BATCH = 1000
"""Members per message the client asks ``FindAudience`` for: one message per member costs
about a tenth of a millisecond each in Python gRPC; a thousand share one."""


class AudienceMember(NamedTuple):
    """One user of an audience: their score against the items (higher: more likely to engage)
    and their rank (1 for the best)."""

    user_id: str
    score: float
    rank: int
