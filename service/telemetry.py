"""Prometheus metrics of the server: requests, latency, response sources, the model lifecycle and
the events stored.

The metric objects are module-level so every server in a process shares them. With several worker
processes the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers start and serves the
merged view of all of them on ``--metrics-port``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

REQUESTS = Counter(
    "affinity_requests_total",
    "gRPC requests answered, by method and status code.",
    ["method", "code"],
)
LATENCY = Histogram(
    "affinity_request_latency_seconds",
    "Time to answer a gRPC request, by method and status code.",
    ["method", "code"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
RESPONSES_BY_SOURCE = Counter(
    "affinity_responses_by_source_total",
    "Successful responses by where the list came from (personalized, fold_in, popular).",
    ["method", "source"],
)
IN_FLIGHT = Gauge(
    "affinity_requests_in_flight",
    "Recommender requests being handled right now.",
    multiprocess_mode="livesum",
)
REJECTED = Counter(
    "affinity_requests_rejected_total",
    "Requests refused with RESOURCE_EXHAUSTED because too many were in flight.",
)
MODEL_INFO = Gauge(
    "affinity_model_info",
    "The model being served (value 1), labelled by name, version, run id and algorithm.",
    ["name", "version", "run_id", "algorithm", "from_cache"],
    multiprocess_mode="liveall",
)
MODEL_SWAPS = Counter("affinity_model_swaps_total", "Models loaded and put into service.")
MODEL_LOAD_FAILURES = Counter(
    "affinity_model_load_failures_total",
    "Attempts to load a model that failed, by stage (resolve, download, verify, load, warmup).",
    ["stage"],
)
EVENTS = Counter(
    "affinity_events_total",
    "Events offered to the event store, by outcome (accepted, duplicate, rejected).",
    ["outcome"],
)
EVENTS_REJECTED = Counter(
    "affinity_events_rejected_total",
    "Events rejected by validation, by the field that failed (event_id, timestamp, value, ...).",
    ["field"],
)
RESPONSES_RECORDED = Counter(
    "affinity_responses_recorded_total",
    "Answers (Recommend, SimilarItems, Popular) stored in the event store for attribution.",
)
RESPONSES_DROPPED = Counter(
    "affinity_responses_dropped_total",
    "Answers not recorded because the recorder's buffer was full (or left at shutdown).",
)
LIVE_APPLIED = Counter(
    "affinity_live_requests_total",
    "Recommend requests changed by the live view, by what it applied "
    "(fold_in: events since training; dislike; erased).",
    ["effect"],
)
ERASURES = Counter("affinity_user_erasures_total", "Users erased with DeleteUser.")

_model_labels: dict[str, str] | None = None
_model_lock = threading.Lock()


def set_model(name: str, version: str, run_id: str, algorithm: str, from_cache: bool) -> None:
    """Point the model info gauge at the model now serving."""
    global _model_labels
    labels = {
        "name": name,
        "version": version,
        "run_id": run_id,
        "algorithm": algorithm,
        "from_cache": str(from_cache).lower(),
    }
    with _model_lock:
        if _model_labels is not None:
            with contextlib.suppress(KeyError):
                MODEL_INFO.remove(*_model_labels.values())
        MODEL_INFO.labels(**labels).set(1)
        _model_labels = labels


def start_metrics_server(port: int, host: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``port`` in a daemon thread (merging workers in multiprocess mode)."""
    multiproc_dir = os.environ.get(MULTIPROC_ENV)
    registry: CollectorRegistry = REGISTRY
    if multiproc_dir:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=multiproc_dir)
    start_http_server(port, addr=host, registry=registry)
    logger.info("metrics on http://%s:%d/metrics", host, port)


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges from the merged view."""
    multiproc_dir = os.environ.get(MULTIPROC_ENV)
    if multiproc_dir and Path(multiproc_dir).is_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, multiproc_dir)
