"""The one settings schema of the gRPC server: defaults, environment variables and validation.

Every field reads the environment variable named in its ``validation_alias`` (``AFFINITY_PORT``,
...); command-line options override the environment. Bad values fail at start-up, before the port
opens, with a message naming the field and its variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.errors import InvalidInputError
from service.cpus import default_workers, validate_spec

if TYPE_CHECKING:
    from models.strategies import StrategyConfig

DEFAULT_MODEL_URI = "models:/affinity@champion"
MAX_CONNECTION_AGE_LIMIT = 2_000_000.0
"""Largest connection age or grace in seconds (gRPC takes milliseconds as a 32-bit int)."""


def _embedded_tracking_uri() -> str:
    # The same embedded default as `affinity train` (training/tracking.py): ./mlflow.db.
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def _default_events_uri() -> str:
    # The event store's own default (service/events.py): ./events.db.
    return f"sqlite:///{Path.cwd().resolve() / 'events.db'}"


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "affinity"


class ServeSettings(BaseSettings):
    """Configuration of ``affinity serve`` (one process or a supervisor with N workers)."""

    model_config = SettingsConfigDict(
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        validate_default=True,
        use_attribute_docstrings=True,
    )

    model_uri: str = Field(DEFAULT_MODEL_URI, validation_alias="AFFINITY_MODEL_URI", min_length=1)
    """Model: ``models:/NAME@ALIAS`` (followed), ``models:/NAME/VERSION`` or a local directory."""

    tracking_uri: str | None = Field(
        default_factory=_embedded_tracking_uri, validation_alias="MLFLOW_TRACKING_URI"
    )
    """MLflow tracking and registry URI; unset, the embedded store ``./mlflow.db``."""

    host: str = Field("[::]", validation_alias="AFFINITY_HOST", min_length=1)
    """Address to bind; ``[::]`` listens on every interface."""

    port: int = Field(50051, validation_alias="AFFINITY_PORT", ge=0, le=65535)
    """gRPC port; 0 picks a free port (single worker only)."""

    workers: int = Field(
        default_factory=default_workers, validation_alias="AFFINITY_WORKERS", ge=1, le=256
    )
    """Server processes sharing the port with SO_REUSEPORT; 1 serves in-process. Default: one per
    CPU this process may use (its CPU affinity, capped by a container's CPU quota)."""

    cpus: str = Field("auto", validation_alias="AFFINITY_CPUS", min_length=1)
    """CPUs the server processes are pinned to, one per worker: ``auto`` (those this process may
    run on, when there are as many workers as CPUs), a list like ``2-5,8``, or ``off``. Pinned, a
    worker's threads hand requests over on one CPU instead of waking each other across CPUs
    (see ``service/cpus.py``)."""

    metrics_port: int = Field(0, validation_alias="AFFINITY_METRICS_PORT", ge=0, le=65535)
    """Port of the Prometheus ``/metrics`` endpoint; 0 turns metrics off."""

    metrics_host: str = Field("0.0.0.0", validation_alias="AFFINITY_METRICS_HOST", min_length=1)
    """Address ``/metrics`` binds: every interface by default (a scraper in another container
    must reach it); ``127.0.0.1`` keeps it on the host."""

    poll_seconds: float = Field(30.0, validation_alias="AFFINITY_POLL_SECONDS", ge=0)
    """How often to check the registry alias for a new version; 0 never checks."""

    tls_cert: Path | None = Field(None, validation_alias="AFFINITY_TLS_CERT")
    """PEM certificate chain for TLS; needs ``tls_key``. Without both the server is plaintext."""

    tls_key: Path | None = Field(None, validation_alias="AFFINITY_TLS_KEY")
    """PEM private key matching ``tls_cert``."""

    token: SecretStr | None = Field(None, validation_alias="AFFINITY_TOKEN")
    """Bearer token clients must send (``authorization: Bearer <token>``); unset: no auth."""

    max_k: int = Field(1000, validation_alias="AFFINITY_MAX_K", ge=1)
    """Largest ``k`` a request may ask for."""

    max_ids: int = Field(1000, validation_alias="AFFINITY_MAX_IDS", ge=1)
    """Most ids allowed in any repeated request field (recent, exclude, item_ids, filters)."""

    max_events: int = Field(1000, validation_alias="AFFINITY_MAX_EVENTS", ge=1, le=100_000)
    """Most events one ``LogEvents`` request may carry."""

    events_uri: str = Field(
        default_factory=_default_events_uri, validation_alias="AFFINITY_EVENTS_URI", min_length=1
    )
    """Event store: ``sqlite:///PATH`` or ``postgresql+psycopg://USER:PASSWORD@HOST/DB``; unset,
    the SQLite file ``./events.db``. Each worker opens it at start-up, before the port opens."""

    extra_events: str = Field("", validation_alias="AFFINITY_EXTRA_EVENTS")
    """Event names ``LogEvents`` accepts beside the training vocabulary, ``impression`` and
    ``dislike``, comma-separated (``wishlist,rate``); they count as interactions in live
    fold-in. Training weighs them with its own ``--event-weight`` option."""

    max_future_skew_seconds: float = Field(
        300.0, validation_alias="AFFINITY_MAX_FUTURE_SKEW_SECONDS", ge=0
    )
    """An event stamped more than this far ahead of the server's clock is rejected."""

    ann: bool = Field(True, validation_alias="AFFINITY_ANN")
    """Use the approximate index a large catalog's artifact ships (``models/ann.py``); off, every
    list comes from the exact search (more CPU per list, the lists the index only approximates)."""

    live: bool = Field(True, validation_alias="AFFINITY_LIVE")
    """Fold each known user's events since the model's training data into their lists, and
    apply dislikes and erasures at once (``service/live.py``); off, only what a request carries
    (``recent_item_ids``) personalizes it."""

    live_poll_seconds: float = Field(
        0.25, validation_alias="AFFINITY_LIVE_POLL_SECONDS", gt=0, le=60
    )
    """How often each worker reads the events and erasures other workers stored."""

    experiment_poll_seconds: float = Field(
        2.0, validation_alias="AFFINITY_EXPERIMENT_POLL_SECONDS", gt=0, le=600
    )
    """How often each worker reads the event store's running experiment (service/experiments.py):
    a started, changed or stopped experiment reaches every worker within this time."""

    stage_strategies: str = Field("off", validation_alias="AFFINITY_STAGE_STRATEGIES")
    """Lifecycle-stage strategies (``models/strategies.py``): ``off``; ``default``, each stage's
    measured default (``dormant`` and ``churned``: ``win_back``, the others ``personalized``,
    ``docs/quality.md``); or a JSON object over
    those defaults, stage -> strategy (``personalized``, ``new_user``, ``win_back``) and the
    strategies' settings: ``{"at_risk": "win_back", "new_user": {"new_share": 0.1}}``. On, each
    worker reads the stages from the event store's ``user_segments`` and ``Recommend`` names the
    user's stage and strategy."""

    stage_poll_seconds: float = Field(
        300.0, validation_alias="AFFINITY_STAGE_POLL_SECONDS", gt=0, le=86_400
    )
    """How often each worker checks ``user_segments`` for a new ``affinity segments``
    computation (and reloads the stages when there is one)."""

    live_window_days: float = Field(7.0, validation_alias="AFFINITY_LIVE_WINDOW_DAYS", gt=0)
    """Events received this long ago at most are loaded at start-up; retrain at least as often."""

    dislike_weight: float = Field(0.5, validation_alias="AFFINITY_DISLIKE_WEIGHT", ge=0, le=10)
    """How far a disliked item's neighbours fall in that user's lists (0: only the item itself
    is removed; 1: its nearest neighbour falls from the top to the bottom of the candidates)."""

    rules_max_per_category: int = Field(0, validation_alias="AFFINITY_RULES_MAX_PER_CATEGORY", ge=0)
    """Default ranking rule: at most this many items of one category per list; 0: no cap. Every
    default rule applies to lists whose request leaves that field unset (``RankingRules``)."""

    rules_mmr: float = Field(
        0.0, validation_alias="AFFINITY_RULES_MMR", ge=0, le=1, allow_inf_nan=False
    )
    """Default relevance/diversity trade-off (maximal marginal relevance) in [0, 1]; 0: off."""

    rules_boosts: str = Field("", validation_alias="AFFINITY_RULES_BOOSTS")
    """Default boosts, ``;``-separated ``FILTER:FACTOR`` such as ``category=sale:1.5`` (a filter
    is ``category=A|B,item_type=T`` terms); empty: none."""

    rules_promotion: str = Field("", validation_alias="AFFINITY_RULES_PROMOTION")
    """Default promotion, ``FILTER:SHARE`` (``category=new:0.2``: a fifth of the places, spread
    through the list, for the best new items); empty: none."""

    rules_explore_share: float = Field(
        0.0, validation_alias="AFFINITY_RULES_EXPLORE_SHARE", ge=0, le=1, allow_inf_nan=False
    )
    """Default exploration: this share of a user's list goes to new, little-known items; 0: off."""

    rules_explore_max_age_days: float = Field(
        7.0, validation_alias="AFFINITY_RULES_EXPLORE_MAX_AGE_DAYS", gt=0, allow_inf_nan=False
    )
    """Explorable items first appeared in the catalog at most this many days ago."""

    rules_explore_seed: int = Field(0, validation_alias="AFFINITY_RULES_EXPLORE_SEED")
    """Seed of the exploration draw (recorded with each answer)."""

    rules_explore_max_interactions: int | None = Field(
        None, validation_alias="AFFINITY_RULES_EXPLORE_MAX_INTERACTIONS", ge=0
    )
    """Explorable items have at most this many users in the training data; unset: no limit."""

    rules_rotation_rate: float = Field(
        0.0, validation_alias="AFFINITY_RULES_ROTATION_RATE", ge=0, le=1, allow_inf_nan=False
    )
    """Default rotation: an item just shown to the user loses this share of the candidates'
    score range, decaying with its half-life; 0: off. Above 0 the live view keeps users' shown
    items, from this worker's answers and the recorded ones of the others."""

    rules_rotation_half_life_seconds: float = Field(
        86_400.0,
        validation_alias="AFFINITY_RULES_ROTATION_HALF_LIFE_SECONDS",
        gt=0,
        allow_inf_nan=False,
    )
    """Half-life of the rotation's demotion; shown items are kept for four of them."""

    rules_rotation_allowed: bool = Field(False, validation_alias="AFFINITY_RULES_ROTATION_ALLOWED")
    """Keep users' recently shown items so requests may ask for rotation even when the default
    rate is 0 (the live view then tails the recorded answers); off, a request's rotation is
    INVALID_ARGUMENT unless the default rate is above 0."""

    record_responses: bool = Field(True, validation_alias="AFFINITY_RECORD_RESPONSES")
    """Record every Recommend, SimilarItems and Popular answer (id, user, items, model, time) in
    the event store, off the request path: the impressions attribution joins events to."""

    response_buffer: int = Field(
        100_000, validation_alias="AFFINITY_RESPONSE_BUFFER", ge=1, le=10_000_000
    )
    """Answers waiting to be recorded; past it new ones are dropped, counted in
    ``affinity_responses_dropped_total`` and logged."""

    admin_token: SecretStr | None = Field(None, validation_alias="AFFINITY_ADMIN_TOKEN")
    """Bearer token of the admin RPCs (``DeleteUser``), distinct from ``token``; unset, admin
    RPCs are refused (PERMISSION_DENIED)."""

    max_message_bytes: int = Field(
        4 * 1024 * 1024, validation_alias="AFFINITY_MAX_MESSAGE_BYTES", ge=1024, le=1 << 30
    )
    """Largest request or response message in bytes; bigger requests get RESOURCE_EXHAUSTED."""

    max_concurrent_streams: int = Field(
        1000, validation_alias="AFFINITY_MAX_CONCURRENT_STREAMS", ge=1, le=100_000
    )
    """Requests one client connection may have open at once (HTTP/2 streams). Clients wait for a
    free stream; a burst sent before the connection's settings arrive gets UNAVAILABLE."""

    max_in_flight: int = Field(64, validation_alias="AFFINITY_MAX_IN_FLIGHT", ge=1, le=100_000)
    """Requests handled at once per process; more are refused with RESOURCE_EXHAUSTED."""

    cache_dir: Path = Field(
        default_factory=_default_cache_dir, validation_alias="AFFINITY_CACHE_DIR"
    )
    """Where the last good model is kept, to serve it when the registry is unreachable."""

    log_format: Literal["json", "text"] = Field("text", validation_alias="AFFINITY_LOG_FORMAT")
    """``json``: one JSON object per line; ``text``: human-readable lines."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", validation_alias="AFFINITY_LOG_LEVEL"
    )
    """Lowest level of log records written."""

    grace_seconds: float = Field(10.0, validation_alias="AFFINITY_GRACE_SECONDS", ge=0)
    """On SIGTERM, how long in-flight requests may take to finish before the server stops."""

    max_connection_age_seconds: float = Field(
        300.0,
        validation_alias="AFFINITY_MAX_CONNECTION_AGE_SECONDS",
        ge=0,
        le=MAX_CONNECTION_AGE_LIMIT,
        allow_inf_nan=False,
    )
    """How long a client connection may live before the server asks the client to reconnect
    (an HTTP/2 GOAWAY, give or take a tenth at random so clients do not all reconnect at once);
    0: as long as the client wants. Reconnecting, a client resolves its target's name again, so
    clients of several replicas spread over replicas added since they connected."""

    max_connection_age_grace_seconds: float = Field(
        30.0,
        validation_alias="AFFINITY_MAX_CONNECTION_AGE_GRACE_SECONDS",
        ge=0,
        le=MAX_CONNECTION_AGE_LIMIT,
        allow_inf_nan=False,
    )
    """How long requests still running on a connection past its maximum age may take before it
    is closed; 0: as long as they need."""

    registry_timeout_seconds: int = Field(
        10, validation_alias="AFFINITY_REGISTRY_TIMEOUT_SECONDS", ge=1
    )
    """HTTP timeout of each call to the MLflow tracking server."""

    registry_retries: int = Field(1, validation_alias="AFFINITY_REGISTRY_RETRIES", ge=0, le=10)
    """HTTP retries of each call to the MLflow tracking server (MLflow's default waits minutes)."""

    @field_validator("tls_cert", "tls_key")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file {str(value)!r} does not exist")
        return value

    @field_validator("cpus")
    @classmethod
    def _cpu_spec(cls, value: str) -> str:
        return validate_spec(value)

    @field_validator("token", "admin_token")
    @classmethod
    def _nonblank_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("token must not be blank")
        return value

    @field_validator("extra_events")
    @classmethod
    def _event_names(cls, value: str) -> str:
        for name in value.split(","):
            name = name.strip()
            if len(name) > 64 or (name and not name.replace("_", "").isalnum()):
                raise ValueError(
                    f"event names are letters, digits and underscores, at most 64: {name[:80]!r}"
                )
        return value

    @field_validator("rules_boosts")
    @classmethod
    def _boosts(cls, value: str) -> str:
        from service.rules import parse_boosts

        try:
            parse_boosts(value, "boosts")
        except InvalidInputError as exc:
            raise ValueError(str(exc).removeprefix("boosts: ")) from None
        return value

    @field_validator("rules_promotion")
    @classmethod
    def _promotion(cls, value: str) -> str:
        from service.rules import parse_promotion

        try:
            parse_promotion(value, "promotion")
        except InvalidInputError as exc:
            raise ValueError(str(exc).removeprefix("promotion: ")) from None
        return value

    @field_validator("stage_strategies")
    @classmethod
    def _stage_strategies(cls, value: str) -> str:
        from models.strategies import StrategyConfig

        try:
            StrategyConfig.parse(value, source="stage_strategies")
        except InvalidInputError as exc:
            raise ValueError(str(exc).removeprefix("stage_strategies: ")) from None
        return value

    @field_validator("events_uri")
    @classmethod
    def _database_uri(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            backend = make_url(value).get_backend_name()
        except ArgumentError:
            raise ValueError(
                "not a database URI; use sqlite:///PATH or postgresql+psycopg://..."
            ) from None
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {backend!r}; use SQLite or PostgreSQL")
        return value

    @field_validator("model_uri")
    @classmethod
    def _known_uri(cls, value: str) -> str:
        if value.startswith("models:/"):
            parse_registry_uri(value)  # raises with a reason
        elif "://" in value or value.startswith("runs:/"):
            raise ValueError("use models:/NAME@ALIAS, models:/NAME/VERSION or a local directory")
        elif not Path(value).expanduser().is_dir():
            raise ValueError(f"directory {value!r} does not exist")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ServeSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if (
            self.token is not None
            and self.admin_token is not None
            and self.token.get_secret_value() == self.admin_token.get_secret_value()
        ):
            raise ValueError("admin_token must differ from token (the read token)")
        if self.workers > 1 and self.port == 0:
            raise ValueError("workers > 1 needs a fixed port (port 0 cannot be shared)")
        if self.rules_promotion.strip() and self.rules_explore_share > 0:
            from service.rules import parse_promotion

            promotion = parse_promotion(self.rules_promotion)
            total = (promotion.share if promotion is not None else 0.0) + self.rules_explore_share
            if total > 1.0 + 1e-9:
                raise ValueError(
                    f"rules_promotion's share and rules_explore_share add up to {total:g}, more "
                    "than 1"
                )
        if (self.rules_rotation_rate > 0 or self.rules_rotation_allowed) and not self.live:
            raise ValueError(
                "rotation (rules_rotation_rate > 0 or rules_rotation_allowed) needs live=true: "
                "the live view keeps the items shown to each user"
            )
        return self

    @property
    def extra_event_names(self) -> frozenset[str]:
        return frozenset(n.strip().lower() for n in self.extra_events.split(",") if n.strip())

    @property
    def strategy_config(self) -> StrategyConfig | None:
        """The parsed :attr:`stage_strategies`; None when they are off."""
        from models.strategies import StrategyConfig

        return StrategyConfig.parse(self.stage_strategies, source="stage_strategies")

    @property
    def is_registry(self) -> bool:
        return self.model_uri.startswith("models:/")

    def to_env(self) -> dict[str, str]:
        """These settings as ``AFFINITY_*`` environment variables (for worker processes)."""
        env: dict[str, str] = {}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[str(info.validation_alias)] = str(value)
        return env


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None]:
    """Split ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` into ``(name, alias, version)``."""
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if name and alias and "/" not in name:
            return name, alias, None
    else:
        name, _, version = rest.partition("/")
        if name and version.isdigit():
            return name, None, version
    raise ValueError(f"{uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")


def field_env_name(field: str) -> str:
    """The environment variable of a settings field (for error messages)."""
    info = ServeSettings.model_fields.get(field)
    return str(info.validation_alias) if info is not None else field


def load_settings(**overrides: Any) -> ServeSettings:
    """Settings from the environment with ``overrides`` (``None`` values ignored) on top.

    Raises :class:`InvalidInputError` naming the first bad field and its environment variable.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return ServeSettings(**given)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(part) for part in err.get("loc", ())]
        field = loc[0] if loc else ""
        # Aliased fields report the variable name; map it back to the field for the message.
        for name, info in ServeSettings.model_fields.items():
            if info.validation_alias == field:
                field = name
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if field:
            where = f"{field} ({field_env_name(field)})"
            raise InvalidInputError(f"invalid setting {where}: {msg}", field=field) from None
        raise InvalidInputError(f"invalid settings: {msg}") from None
