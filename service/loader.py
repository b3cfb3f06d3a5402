"""Model lifecycle of the server: load from the registry or a directory, cache, follow the alias.

The serving model lives in a :class:`ModelHolder` as one immutable :class:`LoadedModel`, replaced
by a single attribute assignment; each request reads it once, so in-flight requests finish on the
model they started with. A :class:`ModelLoader` does the initial load (falling back to the on-disk
cache of the last good model when the registry cannot be reached) and polls the alias, swapping
only after download, checksum verification, loading and warm-up all succeeded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from models.artifact import find_artifact_dir, load_artifact, verify_artifact
from models.errors import NotReadyError
from models.ranking import RankingPipeline
from protos.affinity.v1 import recommender_pb2 as pb
from registry import mlflow_store
from service import telemetry
from service.config import ServeSettings, parse_registry_uri
from service.memory import release_freed_memory
from service.wire import ListingEncoder

logger = logging.getLogger(__name__)

LAST_GOOD = "last_good.json"
STALE_DOWNLOAD_SECONDS = 24 * 3600
"""Age after which a leftover download directory (from a crashed process) is deleted."""


@dataclass(frozen=True)
class ModelMeta:
    """Which model answers: what ``ModelRef`` and ``GetModelInfo`` report."""

    name: str
    version: str
    run_id: str
    algorithm: str
    source_uri: str
    dataset_fingerprint: str = ""
    from_cache: bool = False
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    trained_at: datetime | None = None
    """When the artifact was written (its manifest's ``created_at``)."""
    data_until: datetime | None = None
    """The newest interaction the model was fitted on (``trained_at`` for artifacts that do
    not say): the live view folds in a user's events after it."""

    @cached_property
    def ref(self) -> pb.ModelRef:
        """The responses' model reference, built once per served model (responses copy it)."""
        return pb.ModelRef(
            name=self.name, version=self.version, run_id=self.run_id, algorithm=self.algorithm
        )


@dataclass(frozen=True)
class LoadedModel:
    """A ranking pipeline and its description, swapped into service together."""

    pipeline: RankingPipeline
    meta: ModelMeta

    @cached_property
    def encoder(self) -> ListingEncoder:
        """Writes this model's listing responses (built on first use, kept with the model)."""
        return ListingEncoder(self.pipeline, self.meta.ref)


class ModelHolder:
    """The model currently serving; replaced atomically, read once per request."""

    def __init__(self) -> None:
        self._current: LoadedModel | None = None
        self._listeners: list[Callable[[LoadedModel], None]] = []
        self._swap_lock = threading.Lock()
        self.swaps = 0
        """How many times a model was put into service."""

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def get(self) -> LoadedModel:
        """The serving model; raises :class:`NotReadyError` before the first load."""
        loaded = self._current
        if loaded is None:
            raise NotReadyError("no model is loaded yet; retry shortly")
        return loaded

    def add_listener(self, listener: Callable[[LoadedModel], None]) -> None:
        """Call ``listener(loaded)`` after every swap (and now, if a model is already loaded)."""
        self._listeners.append(listener)
        if self._current is not None:
            listener(self._current)

    def swap(self, loaded: LoadedModel) -> None:
        """Put ``loaded`` into service; requests already running keep their model."""
        with self._swap_lock:
            previous = self._current
            self._current = loaded  # the one assignment requests observe
            self.swaps += 1
            for listener in self._listeners:
                try:
                    listener(loaded)
                except Exception:
                    logger.exception("model swap listener failed")
        meta = loaded.meta
        telemetry.MODEL_SWAPS.inc()
        telemetry.set_model(meta.name, meta.version, meta.run_id, meta.algorithm, meta.from_cache)
        logger.info(
            "serving model %s version %s (%s, run %s)%s; previous: %s",
            meta.name,
            meta.version or "-",
            meta.algorithm,
            meta.run_id or "-",
            " from cache" if meta.from_cache else "",
            f"version {previous.meta.version}" if previous else "none",
        )


def warm_up(pipeline: RankingPipeline) -> None:
    """Run a few real queries so the first user request does not pay for lazy initialisation."""
    users, items = pipeline.vocabularies()
    k = min(10, max(1, len(items)))
    first_item = items.id(0) if len(items) else None
    if len(users):
        pipeline.recommend(users.id(0), k)
    if first_item is not None:
        pipeline.recommend("\x00warm-up", k, recent_item_ids=[first_item])
        pipeline.similar_items([first_item], k)
    pipeline.popular(k)
    pipeline.popular(k, trending=True)


def _fail(stage: str) -> None:
    telemetry.MODEL_LOAD_FAILURES.labels(stage=stage).inc()


def load_directory(
    directory: Path, meta: ModelMeta, *, dislike_weight: float = 0.0, approximate: bool = True
) -> LoadedModel:
    """Verify, load and warm up the artifact in ``directory``; counts failures by stage.

    ``dislike_weight`` > 0 gives the pipeline a :class:`models.ranking.DislikeStage`;
    ``approximate=False`` leaves out the approximate index the artifact may ship."""
    try:
        manifest = verify_artifact(directory)
    except Exception:
        _fail("verify")
        raise
    try:
        bundle = load_artifact(directory, verify=False)  # verified just above
        pipeline = RankingPipeline.from_bundle(
            bundle, dislike_weight=dislike_weight, approximate=approximate
        )
    except Exception:
        _fail("load")
        raise
    try:
        warm_up(pipeline)
    except Exception:
        _fail("warmup")
        raise
    info = manifest.get("info") or {}
    meta = replace(
        meta,
        algorithm=str(manifest.get("algorithm", "")),
        dataset_fingerprint=str(manifest.get("dataset_fingerprint", "")),
        run_id=meta.run_id or str(info.get("run_id", "")),
        loaded_at=datetime.now(UTC),
    )
    trained_at = _instant(manifest.get("created_at"))
    data_until = _instant(info.get("data_until")) or trained_at
    meta = replace(meta, trained_at=trained_at, data_until=data_until)
    return LoadedModel(pipeline, meta)


def _instant(text: object) -> datetime | None:
    """An ISO 8601 time from a manifest as an aware UTC datetime (``None`` when absent/bad)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9@._-]", "_", name) or "model"


class ModelCache:
    """The last good model of each model URI (``NAME@ALIAS`` or ``NAME@vVERSION``), on disk.

    Layout: ``<cache_dir>/<key>/<version>/`` (the artifact) and ``<cache_dir>/<key>/``
    ``last_good.json``, where ``key`` names the URI, so servers of different aliases can share
    one cache directory. Writes go through a private temporary directory and ``os.replace``, so
    several worker processes can share one cache.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()

    def _dir(self, key: str) -> Path:
        return self.root / _safe_name(key)

    def scratch(self, key: str) -> Path:
        """A fresh private directory to download into (inside the cache, so renames are cheap)."""
        base = self._dir(key)
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".download-{os.getpid()}-", dir=base))

    def store(self, key: str, meta: ModelMeta, artifact_dir: Path) -> Path:
        """Keep ``artifact_dir`` as the last good model of ``key``; returns its new path."""
        base = self._dir(key)
        target = base / _safe_name(meta.version)
        if target.exists():
            shutil.rmtree(artifact_dir, ignore_errors=True)  # another worker cached it already
        else:
            try:
                os.replace(artifact_dir, target)
            except OSError:
                shutil.rmtree(artifact_dir, ignore_errors=True)
        record = {"version": meta.version, "run_id": meta.run_id, "source_uri": meta.source_uri}
        tmp = base / f".{LAST_GOOD}.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, base / LAST_GOOD)
        self._prune(base, keep=target.name)
        return target

    def _prune(self, base: Path, keep: str) -> None:
        stale = time.time() - STALE_DOWNLOAD_SECONDS
        for child in base.iterdir():
            if not child.is_dir() or child.name == keep:
                continue
            # Dot directories are downloads in progress (maybe another worker's) unless old.
            if not child.name.startswith(".") or child.stat().st_mtime < stale:
                shutil.rmtree(child, ignore_errors=True)

    def last_good(self, key: str) -> tuple[Path, dict[str, Any]] | None:
        """The cached artifact directory and its record, or ``None`` when nothing is cached."""
        base = self._dir(key)
        try:
            record = json.loads((base / LAST_GOOD).read_text())
        except (OSError, ValueError):
            return None
        path = base / _safe_name(str(record.get("version", "")))
        return (path, record) if path.is_dir() else None


def configure_mlflow_http(settings: ServeSettings) -> None:
    """Make registry calls fail in seconds, not minutes, when the tracking server is down."""
    mlflow_store.configure_http(
        retries=settings.registry_retries, timeout_seconds=settings.registry_timeout_seconds
    )


class ModelLoader:
    """Loads the configured model into a holder and keeps it in line with the registry alias."""

    def __init__(self, settings: ServeSettings, holder: ModelHolder) -> None:
        self.settings = settings
        self.holder = holder
        self.cache = ModelCache(settings.cache_dir)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refused: set[str] = set()  # versions whose artifact failed verification or loading
        self._refresh_lock = threading.Lock()
        if settings.is_registry:
            self.name, self.alias, self.version = parse_registry_uri(settings.model_uri)
            self.cache_key = f"{self.name}@{self.alias or 'v' + str(self.version)}"
        else:
            self.name = Path(settings.model_uri).expanduser().resolve().name
            self.alias, self.version = None, None
            self.cache_key = self.name

    # -------------------------------------------------------------- registry
    def resolve(self) -> tuple[str, str]:
        """The registry ``(version, run_id)`` the URI points at now."""
        return mlflow_store.resolve(
            self.name,
            alias=self.alias,
            version=self.version,
            tracking_uri=self.settings.tracking_uri,
        )

    def _download(self, version: str) -> Path:
        scratch = self.cache.scratch(self.cache_key)
        try:
            found = mlflow_store.download_model(
                f"models:/{self.name}/{version}", scratch, tracking_uri=self.settings.tracking_uri
            )
            if found != scratch:
                # Keep only the Affinity artifact: the pyfunc wrapper is not needed to serve.
                artifact = self.cache.scratch(self.cache_key)
                shutil.rmtree(artifact)
                os.replace(found, artifact)
                shutil.rmtree(scratch, ignore_errors=True)
                return artifact
            return scratch
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    def _load_version(self, version: str, run_id: str) -> LoadedModel:
        try:
            artifact = self._download(version)
        except Exception:
            _fail("download")
            raise
        meta = ModelMeta(
            name=self.name,
            version=version,
            run_id=run_id,
            algorithm="",
            source_uri=self.settings.model_uri,
        )
        try:
            loaded = load_directory(
                artifact,
                meta,
                dislike_weight=self.settings.dislike_weight,
                approximate=self.settings.ann,
            )
        except BaseException:
            # Retrying would fetch the same bytes: skip this version until the alias moves.
            self._refused.add(version)
            shutil.rmtree(artifact, ignore_errors=True)
            raise
        self.cache.store(self.cache_key, loaded.meta, artifact)
        return loaded

    # --------------------------------------------------------------- loading
    def load_initial(self) -> bool:
        """Load the first model; returns whether one is serving.

        A local directory that cannot be loaded raises (nothing would ever fix it); a registry
        failure falls back to the cached last good model and otherwise leaves the server
        NOT_SERVING while the poller keeps trying.
        """
        if not self.settings.is_registry:
            path = Path(self.settings.model_uri).expanduser()
            meta = ModelMeta(
                name=self.name, version="", run_id="", algorithm="", source_uri=str(path)
            )
            self.holder.swap(
                load_directory(
                    find_artifact_dir(path),
                    meta,
                    dislike_weight=self.settings.dislike_weight,
                    approximate=self.settings.ann,
                )
            )
            return True
        try:
            return self.refresh()
        except Exception as exc:
            logger.warning(
                "cannot load %s from the registry (%s); trying the local cache",
                self.settings.model_uri,
                _reason(exc),
            )
        return self._load_cached()

    def _load_cached(self) -> bool:
        cached = self.cache.last_good(self.cache_key)
        if cached is None:
            logger.error("no cached model of %s in %s", self.settings.model_uri, self.cache.root)
            return False
        path, record = cached
        meta = ModelMeta(
            name=self.name,
            version=str(record.get("version", "")),
            run_id=str(record.get("run_id", "")),
            algorithm="",
            source_uri=self.settings.model_uri,
            from_cache=True,
        )
        try:
            loaded = load_directory(
                path,
                meta,
                dislike_weight=self.settings.dislike_weight,
                approximate=self.settings.ann,
            )
        except Exception as exc:
            logger.error("cached model in %s is unusable: %s", path, _reason(exc))
            return False
        logger.warning("serving cached version %s of %s from %s", meta.version, self.name, path)
        self.holder.swap(loaded)
        return True

    def refresh(self) -> bool:
        """Check the registry once and swap if it points at another version; True if serving.

        Raises when the registry cannot be asked or the new version cannot be loaded; the
        model already serving stays in place either way.
        """
        with self._refresh_lock:
            return self._refresh()

    def _refresh(self) -> bool:
        try:
            version, run_id = self.resolve()
        except Exception:
            _fail("resolve")
            raise
        current = self.holder.current
        if current is not None and current.meta.version == version:
            if current.meta.from_cache:
                # The registry is back and agrees with the cache: no reload needed.
                self.holder.swap(
                    LoadedModel(current.pipeline, replace(current.meta, from_cache=False))
                )
            return True
        if version in self._refused:
            return current is not None
        logger.info("loading %s version %s", self.name, version)
        self.holder.swap(self._load_version(version, run_id))
        return True

    # --------------------------------------------------------------- polling
    def start_polling(self) -> None:
        """Check the alias every ``poll_seconds`` in a daemon thread (registry URIs only)."""
        needs_poll = self.settings.is_registry and (
            self.alias is not None or not self._pinned_and_fresh()
        )
        if self.settings.poll_seconds <= 0 or not needs_poll or self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._poll, name="affinity-model-poller", daemon=True
        )
        self._thread.start()

    def _poll(self) -> None:
        released_after = self.holder.swaps
        while not self._stop.wait(self.settings.poll_seconds):
            if self.holder.swaps != released_after:
                # A model replaced before this tick is out of use by now (requests take
                # milliseconds): hand the memory it freed back to the OS.
                released_after = self.holder.swaps
                release_freed_memory()
            try:
                self.refresh()
            except Exception as exc:
                logger.error(
                    "model refresh failed, keeping the current model: %s",
                    _reason(exc),
                    exc_info=logger.isEnabledFor(logging.DEBUG),
                )
            if self.alias is None and self._pinned_and_fresh():
                return  # a pinned version never changes once loaded from the registry

    def _pinned_and_fresh(self) -> bool:
        current = self.holder.current
        return current is not None and not current.meta.from_cache

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


__all__ = [
    "LoadedModel",
    "ModelCache",
    "ModelHolder",
    "ModelLoader",
    "ModelMeta",
    "configure_mlflow_http",
    "find_artifact_dir",
    "load_directory",
    "warm_up",
]
