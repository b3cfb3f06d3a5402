"""Build and run the gRPC server: one in-process server, or a supervisor of N worker processes.

:func:`create_server` wires servicer, interceptors, health and reflection onto a bound port (tests
use port 0); :func:`serve` adds the model loader, metrics, signals and graceful shutdown;
:func:`supervise` runs ``workers`` copies of ``python -m service.server`` sharing the port with
SO_REUSEPORT, restarts a worker that dies and forwards SIGTERM.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from models.artifact import verify_artifact
from models.errors import AffinityError
from service import telemetry
from service.config import ServeSettings, load_settings
from service.cpus import pin_worker
from service.event_side import EventSide
from service.events import EventStore, GroupCommit
from service.experiment_router import ExperimentRouter
from service.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from service.health import HealthServicer
from service.interceptors import (
    SERVICE,
    AuthInterceptor,
    ConcurrencyLimitInterceptor,
    ErrorInterceptor,
    MetricsInterceptor,
)
from service.live import LiveActivity
from service.loader import ModelHolder, ModelLoader, configure_mlflow_http, find_artifact_dir
from service.logs import configure_logging
from service.memory import settle_heap
from service.recorder import ResponseRecorder
from service.rules import RuleDefaults, RuleResolver
from service.servicer import RecommenderServicer, add_to_server
from service.stages import StageView

logger = logging.getLogger(__name__)

WORKER_ENV = "AFFINITY_WORKER_INDEX"
WORKERS_ENV = "AFFINITY_WORKER_COUNT"
"""Set by the supervisor in each worker's environment (the worker's slot number)."""

HEALTH_SERVICES = ("", SERVICE)
# Threads beyond the in-flight limit, so over-limit requests are refused at once instead of
# waiting for a thread, and health checks always find one.
SPARE_THREADS = 8


def connection_age_options(settings: ServeSettings) -> list[tuple[str, int]]:
    """The server options of ``max_connection_age_seconds`` and its grace (none where 0).

    Clients keep a connection for as long as it works and resolve their target's name only to
    make a new one, so without a maximum age a replica added later gets no traffic from clients
    that connected before it; with one, each client reconnects every few minutes and spreads
    over the replicas its name resolves to then.
    """
    if settings.max_connection_age_seconds <= 0:
        return []
    age_ms = max(1, round(settings.max_connection_age_seconds * 1000))
    options = [("grpc.max_connection_age_ms", age_ms)]
    if settings.max_connection_age_grace_seconds > 0:
        grace_ms = max(1, round(settings.max_connection_age_grace_seconds * 1000))
        options.append(("grpc.max_connection_age_grace_ms", grace_ms))
    return options


def create_server(
    settings: ServeSettings,
    holder: ModelHolder,
    *,
    health_servicer: HealthServicer | None = None,
    reuse_port: bool = False,
    store: EventStore | None = None,
    live: LiveActivity | None = None,
    recorder: ResponseRecorder | None = None,
    on_servicer: Callable[[RecommenderServicer], None] | None = None,
) -> tuple[grpc.Server, int]:
    """A bound, not yet started server for ``holder``'s model; returns it and its port.

    ``LogEvents`` and ``DeleteUser`` write to ``store`` (the caller opens and closes it); without
    one they answer UNAVAILABLE. ``live`` and ``recorder`` (started and stopped by the caller)
    fold users' events into their lists and record every answer; ``on_servicer`` receives the
    servicer (to attach an event store later: ``service/event_side.py``). Health reports
    NOT_SERVING for ``""`` and ``affinity.v1.Recommender`` until the holder receives its first
    model. Raises :class:`OSError` if the port cannot be bound.
    """
    interceptors: list[grpc.ServerInterceptor] = [
        MetricsInterceptor(),
        AuthInterceptor(
            settings.token.get_secret_value() if settings.token is not None else None,
            settings.admin_token.get_secret_value() if settings.admin_token is not None else None,
        ),
    ]
    interceptors += [ConcurrencyLimitInterceptor(settings.max_in_flight), ErrorInterceptor()]
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=settings.max_in_flight + SPARE_THREADS, thread_name_prefix="affinity-rpc"
        ),
        interceptors=interceptors,
        # Past this many RPCs gRPC answers RESOURCE_EXHAUSTED itself, without queueing them for a
        # thread: under overload the executor's queue would otherwise grow without bound and
        # requests would wait there until their deadline.
        maximum_concurrent_rpcs=settings.max_in_flight + SPARE_THREADS,
        options=[
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
            *connection_age_options(settings),
        ],
    )
    servicer = RecommenderServicer(
        holder,
        max_k=settings.max_k,
        max_ids=settings.max_ids,
        events=GroupCommit(store) if store is not None else None,
        max_events=settings.max_events,
        live=live,
        recorder=recorder,
        # Other workers and hosts record answers every fraction of a second: sweep after that.
        erasure_sweep_seconds=1.0,
        rules=RuleResolver(RuleDefaults.from_settings(settings), max_ids=settings.max_ids),
        experiments=ExperimentRouter(settings, holder),
        stages=stage_view(settings, holder),
    )
    if store is not None and servicer.stages is not None:
        servicer.stages.attach(store)  # the caller stops it (EventSide does when it closes)
    if store is not None:
        # Experiments live in the event store: follow its running one (the caller stops the
        # router with servicer.experiments.stop(); EventSide does when it closes).
        assert servicer.experiments is not None
        servicer.experiments.attach(store)
    if on_servicer is not None:
        on_servicer(servicer)
    add_to_server(servicer, server)
    health_servicer = health_servicer or HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in HEALTH_SERVICES:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def serving(_: object) -> None:
        for name in HEALTH_SERVICES:
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    holder.add_listener(serving)
    reflection.enable_server_reflection(
        (SERVICE, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert is not None and settings.tls_key is not None:
        credentials = grpc.ssl_server_credentials(
            [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return server, port


def stage_view(settings: ServeSettings, holder: ModelHolder) -> StageView | None:
    """The lifecycle-stage view of ``settings`` (None while stage strategies are off), mapping
    each model the holder swaps in onto the stages ahead of its requests."""
    config = settings.strategy_config
    if config is None:
        return None
    view = StageView(config, settings.stage_poll_seconds)
    holder.add_listener(lambda loaded: view.prepare(loaded.pipeline.vocabularies()[0]))
    return view


def _on_signals(handler: signal.Handlers | object) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)  # type: ignore[arg-type]


def serve(settings: ServeSettings, *, worker: bool = False) -> int:
    """Run one server process until SIGTERM/SIGINT; returns the exit status."""
    from threadpoolctl import threadpool_limits

    # Per-request scoring is small; multi-threaded BLAS would only add contention.
    threadpool_limits(1)
    configure_mlflow_http(settings)
    holder = ModelHolder()
    loader = ModelLoader(settings, holder)
    holder.add_listener(settle_heap)  # first: before the listeners that announce the model
    if not settings.is_registry:
        loader.load_initial()  # a broken local directory fails before the port opens
    side = EventSide(settings)
    try:
        health_servicer = HealthServicer()
        server, port = create_server(
            settings,
            holder,
            health_servicer=health_servicer,
            reuse_port=worker,
            on_servicer=side.bind,
        )
        # A bad URI fails here, before the port opens; an unreachable database is retried in
        # the background while the server answers (service/event_side.py).
        side.open()
        return _run_server(settings, holder, loader, server, port, health_servicer, worker=worker)
    finally:
        side.close()


def _run_server(
    settings: ServeSettings,
    holder: ModelHolder,
    loader: ModelLoader,
    server: grpc.Server,
    port: int,
    health_servicer: HealthServicer,
    *,
    worker: bool,
) -> int:
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    _on_signals(request_stop)
    # Pinned last, once nothing can fail before serving: the threads that exist now follow.
    slot, count = 0, settings.workers
    if worker:  # started by supervise(): its settings say 1 worker, the env says which of how many
        slot, count = int(os.environ.get(WORKER_ENV) or 0), int(os.environ.get(WORKERS_ENV) or 1)
    pin_worker(settings.cpus, slot, count)
    server.start()
    scheme = "tls" if settings.tls_cert else "plaintext"
    logger.info("listening on %s:%d (%s)", settings.host, port, scheme, extra={"port": port})
    if settings.metrics_port and not worker:
        telemetry.start_metrics_server(settings.metrics_port, settings.metrics_host)
    if settings.is_registry and not stop.is_set():
        loader.load_initial()
    loader.start_polling()
    stop.wait()
    # Probes see NOT_SERVING first so load balancers drain us while in-flight calls finish.
    health_servicer.enter_graceful_shutdown()
    loader.stop()
    server.stop(settings.grace_seconds).wait()
    logger.info("stopped")
    return 0


def supervise(settings: ServeSettings) -> int:
    """Run ``settings.workers`` worker processes on one port; returns the exit status."""
    if not settings.is_registry:
        # Every worker would fail the same way: check the artifact once, before forking.
        verify_artifact(find_artifact_dir(Path(settings.model_uri).expanduser()))
    multiproc_dir = tempfile.mkdtemp(prefix="affinity-metrics-")
    env = {
        **os.environ,
        **settings.to_env(),
        "AFFINITY_WORKERS": "1",
        WORKERS_ENV: str(settings.workers),
        "AFFINITY_METRICS_PORT": "0",
        telemetry.MULTIPROC_ENV: multiproc_dir,
    }
    # glibc gives each thread that allocates its own malloc arena; with a thread pool and
    # repeated model swaps those arenas keep freed memory. Two arenas bound the growth.
    env.setdefault("MALLOC_ARENA_MAX", "2")
    # Not ``-m service.server``: that would name the worker's logger ``__main__``.
    command = [
        sys.executable,
        "-c",
        "import sys; from service.server import main; sys.exit(main())",
    ]
    stopping = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        logger.info("supervisor received %s: stopping workers", signal.Signals(signum).name)
        stopping.set()

    _on_signals(request_stop)

    def spawn(slot: int) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(command, env={**env, WORKER_ENV: str(slot)})
        logger.info("started worker %d (pid %d)", slot, proc.pid)
        return proc

    workers = [spawn(slot) for slot in range(settings.workers)]
    if settings.metrics_port:
        os.environ[telemetry.MULTIPROC_ENV] = multiproc_dir
        telemetry.start_metrics_server(settings.metrics_port, settings.metrics_host)
    restarts: list[list[float]] = [[] for _ in workers]
    status = 0
    try:
        while not stopping.wait(0.5):
            for slot, proc in enumerate(workers):
                code = proc.poll()
                if code is None:
                    continue
                telemetry.mark_worker_dead(proc.pid)
                now = time.monotonic()
                restarts[slot] = [t for t in restarts[slot] if now - t < 60] + [now]
                if len(restarts[slot]) > 5:
                    logger.error("worker %d keeps dying (exit %s); giving up", slot, code)
                    status = 1
                    stopping.set()
                    break
                logger.warning(
                    "worker %d (pid %d) exited with %s; restarting", slot, proc.pid, code
                )
                workers[slot] = spawn(slot)
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + settings.grace_seconds + 10
        for proc in workers:
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                code = proc.wait()
            if code not in (0, -signal.SIGTERM):
                status = status or 1
        shutil.rmtree(multiproc_dir, ignore_errors=True)
    logger.info("supervisor stopped")
    return status


def run(settings: ServeSettings) -> int:
    """``affinity serve``: one in-process server or a supervisor, per ``settings.workers``."""
    configure_logging(settings.log_format, settings.log_level)
    if settings.workers > 1:
        return supervise(settings)
    return serve(settings)


def main() -> int:
    """Entry point of a worker process started by :func:`supervise` (settings from the env)."""
    try:
        settings = load_settings()
    except AffinityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    try:
        return serve(settings, worker=os.environ.get(WORKER_ENV) is not None)
    except (AffinityError, OSError) as exc:
        logger.error("worker failed: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
