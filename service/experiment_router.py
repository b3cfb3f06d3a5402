"""A worker's side of live experiments: which model answers each user while an experiment runs.

:class:`ExperimentRouter` polls the event store's running experiment (every
``experiment_poll_seconds``) and keeps one immutable :class:`Routing`, replaced by a single
attribute assignment as the server's model is: a request reads it once. Each arm's model is
loaded, verified and followed by a :class:`~service.loader.ModelLoader` of its own, exactly as
the served model is (an arm naming the served model shares its holder: no second copy). A
routing is put in place once its arms' models are loaded, so no user starts on the wrong arm.

An arm whose model is missing or broken does not fail its users' requests: they get the served
model, the response still names their arm (assignment is intention to treat: a user's arm never
changes), and the fallback is logged and counted (``affinity_experiment_fallbacks_total``) while
the arm's loader keeps trying.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from models.artifact import find_artifact_dir
from models.errors import InvalidInputError
from registry import mlflow_store
from service.config import ServeSettings, parse_registry_uri
from service.events import EventStore
from service.experiments import (
    BUCKETS,
    Arm,
    Experiment,
    ExperimentBook,
    ExperimentConfig,
    bucket_with,
    keyed_hasher,
    salt_key,
)
from service.loader import LoadedModel, ModelHolder, ModelLoader
from service.polling import Poller
from service.wire import experiment_fields

logger = logging.getLogger(__name__)

FALLBACKS = Counter(
    "affinity_experiment_fallbacks",
    "Requests of an experiment arm's users answered by the served model (the arm's model was "
    "missing or broken)",
    ["experiment", "arm"],
)
_FALLBACK_LOG_SECONDS = 60.0
"""At most one warning per arm per this many seconds (the counter counts every fallback)."""


def arm_uri(settings: ServeSettings, model: str) -> str:
    """The model URI of an arm's ``model`` on a server configured by ``settings``."""
    if model.startswith("models:/"):
        return model
    if settings.is_registry:
        name, _, _ = parse_registry_uri(settings.model_uri)
        return f"models:/{name}/{model}" if model.isdigit() else f"models:/{name}@{model}"
    if model == "champion":
        return settings.model_uri  # a local directory serves itself as the champion
    return str(Path(model).expanduser())


class ArmLoader:
    """The model of one arm URI: its holder, and the loader that fills and follows it."""

    def __init__(self, settings: ServeSettings, uri: str) -> None:
        self.uri = uri
        self.holder = ModelHolder()
        self.loader = ModelLoader(settings.model_copy(update={"model_uri": uri}), self.holder)
        self.error = ""

    def load(self) -> None:
        """Load the model now (errors are kept, not raised) and follow its alias from now on."""
        try:
            if not self.loader.load_initial():
                self.error = f"{self.uri} could not be loaded (see the log)"
        except Exception as exc:  # a broken or missing model: its users fall back
            self.error = f"{self.uri}: {exc}"
            logger.error("experiment arm model %s cannot be loaded: %s", self.uri, exc)
        else:
            if self.holder.current is not None:
                self.error = ""
        self.loader.start_polling()

    def stop(self) -> None:
        self.loader.stop()


@dataclass
class ArmRoute:
    """How one arm is served on this worker."""

    name: str
    holder: ModelHolder
    shared: bool
    """True when the arm serves the server's own model (its holder is the server's)."""
    wire: bytes
    """The arm's ``experiment`` and ``arm`` fields of ``RecommendResponse``, encoded once."""
    loader: ArmLoader | None = None
    fallbacks: int = 0
    _warned_at: float = field(default=-_FALLBACK_LOG_SECONDS)

    @property
    def error(self) -> str:
        if self.holder.current is not None:
            return ""
        return self.loader.error if self.loader is not None and self.loader.error else "not loaded"

    def fell_back(self, experiment: str) -> None:
        self.fallbacks += 1
        FALLBACKS.labels(experiment, self.name).inc()
        now = time.monotonic()
        if now - self._warned_at >= _FALLBACK_LOG_SECONDS:
            self._warned_at = now
            logger.warning(
                "experiment %s: arm %s has no model (%s); its users get the served model",
                experiment,
                self.name,
                self.error,
                extra={"experiment": experiment, "arm": self.name},
            )


@dataclass(frozen=True)
class Routing:
    """A running experiment as one worker serves it (immutable; replaced whole)."""

    experiment: Experiment
    hasher: Any
    """The salt's keyed hasher (service/experiments.py ``keyed_hasher``)."""
    arm_of_bucket: bytes
    """The index into :attr:`live` of every bucket's arm."""
    live: tuple[ArmRoute, ...]
    shadows: tuple[ArmRoute, ...]

    @property
    def name(self) -> str:
        return self.experiment.name

    def arm_for(self, user_id: str) -> ArmRoute:
        """The arm of ``user_id``: one keyed hash and two lookups."""
        return self.live[self.arm_of_bucket[bucket_with(user_id, self.hasher)]]

    def serving(self, arm: ArmRoute, main: ModelHolder) -> LoadedModel:
        """The model that answers ``arm``'s users now: its own, or the served one (counted)."""
        loaded = arm.holder.current
        if loaded is None:
            arm.fell_back(self.name)
            return main.get()
        return loaded


class ExperimentRouter:
    """Follows the event store's running experiment and routes users to its arms' models."""

    def __init__(self, settings: ServeSettings, main: ModelHolder) -> None:
        self.settings = settings
        self.main = main
        self.routing: Routing | None = None
        """What requests read (once each); ``None`` while no experiment runs."""
        self.book: ExperimentBook | None = None
        self._loaders: dict[str, ArmLoader] = {}
        self._lock = threading.Lock()
        self._poller = Poller(
            "affinity-experiments",
            settings.experiment_poll_seconds,
            self.refresh,
            "reading the running experiment failed; keeping the routing",
        )

    def check_models(self, config: ExperimentConfig) -> None:
        """Refuse an experiment whose arm names a model that does not exist (the field named).

        A model that exists but later breaks is not refused here: its users fall back.
        """
        for i, arm in enumerate(config.arms):
            uri = arm_uri(self.settings, arm.model)
            if uri == self.settings.model_uri:
                continue
            try:
                if uri.startswith("models:/"):
                    name, alias, version = parse_registry_uri(uri)
                    mlflow_store.resolve(
                        name, alias=alias, version=version, tracking_uri=self.settings.tracking_uri
                    )
                else:
                    find_artifact_dir(Path(uri))
            except Exception as exc:
                raise InvalidInputError(
                    f"arms.{i}.model: {arm.model!r} ({uri}) cannot be found: {exc}",
                    field=f"arms.{i}.model",
                ) from None

    def wake(self) -> None:
        """Read the running experiment now instead of at the next poll."""
        self._poller.wake()

    def attach(self, store: EventStore) -> None:
        """Start following ``store``'s experiments (once the event store is open)."""
        self.book = ExperimentBook(store)
        try:
            self.refresh()
        except Exception as exc:
            logger.error("cannot read the running experiment yet: %s", exc)
        self._poller.start()

    def refresh(self) -> None:
        """Read the running experiment and put its routing in place if it changed."""
        book = self.book
        if book is None:
            return
        running = book.running()
        with self._lock:
            current = self.routing
            if running is None:
                if current is not None:
                    logger.info(
                        "experiment %s stopped: every user gets the served model", current.name
                    )
                self.routing = None
                self._release(set())
                return
            if (
                current is not None
                and current.name == running.name
                and current.experiment.revision == running.revision
            ):
                return
            routing = self._build(running, current)
            self.routing = routing
            self._release(
                {
                    arm.loader.uri
                    for arm in (*routing.live, *routing.shadows)
                    if arm.loader is not None
                }
            )
        logger.info(
            "experiment %s (revision %d) routes users: %s",
            running.name,
            running.revision,
            ", ".join(f"{a.name} {a.share:g}" for a in running.config.live_arms),
            extra={"experiment": running.name},
        )

    def _build(self, experiment: Experiment, previous: Routing | None) -> Routing:
        config = experiment.config
        counts = {}
        if previous is not None and previous.name == experiment.name:
            counts = {a.name: a.fallbacks for a in (*previous.live, *previous.shadows)}
        live = tuple(self._route(config, arm, counts) for arm in config.live_arms)
        shadows = tuple(self._route(config, arm, counts) for arm in config.shadow_arms)
        index = {arm.name: i for i, arm in enumerate(config.live_arms)}
        of_bucket = bytearray(BUCKETS)
        for start, end, name in config.allocation:
            of_bucket[start:end] = bytes([index[name]]) * (end - start)
        hasher = keyed_hasher(salt_key(config.salt))
        return Routing(experiment, hasher, bytes(of_bucket), live, shadows)

    def _route(self, config: ExperimentConfig, arm: Arm, counts: dict[str, int]) -> ArmRoute:
        uri = arm_uri(self.settings, arm.model)
        wire = experiment_fields(config.name, arm.name)
        if uri == self.settings.model_uri:
            return ArmRoute(arm.name, self.main, True, wire, fallbacks=counts.get(arm.name, 0))
        loader = self._loaders.get(uri)
        if loader is None:
            loader = ArmLoader(self.settings, uri)
            loader.load()  # before the routing is in place: no user starts on a fallback
            self._loaders[uri] = loader
        return ArmRoute(
            arm.name, loader.holder, False, wire, loader, fallbacks=counts.get(arm.name, 0)
        )

    def _release(self, keep: set[str]) -> None:
        for uri in [uri for uri in self._loaders if uri not in keep]:
            self._loaders.pop(uri).stop()

    def stop(self) -> None:
        self._poller.stop()
        with self._lock:
            self._release(set())
