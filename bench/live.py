"""Live events benchmarks: how fresh the live view is, and what the loop costs ``Recommend``.

``freshness``: a real ``affinity serve`` (``--workers 2`` sharing the port with SO_REUSEPORT, the
live view and response recording on, as by default) over a fresh event store. For each of
``--events`` distinct known users, on a new connection: ``Recommend`` (k=10), then ``LogEvents``
with a ``like`` of the list's top item; from the moment that ``LogEvents`` is answered, the user
is polled with ``Recommend`` every ``--probe-interval`` seconds, each probe on a new connection
(its own subchannel, so the kernel hashes it to either worker). A probe *reflects* the event when
the liked item is no longer in the list. Each of ``--parallel`` threads waits a random fraction
of the poll interval before its next event, so events arrive at random phases of the workers'
polls. Measured from the acknowledgement to the answer of

* the first probe that reflects it (what a client that reconnects at random sees), and
* the first reflecting probe answered by each worker, the slower of the two being when the event
  is visible everywhere (the worker that acknowledged it applies it at once; the other reads it
  from the store within ``live_poll_seconds``).

The worker that answered is known from the ``recommendation_id``, whose first 16 hex digits are a
per-process prefix. SQLite, and PostgreSQL when ``--postgres-uri`` (or
``AFFINITY_TEST_POSTGRES_URI``) is given (a schema of its own, dropped afterwards).

``cost``: two servers of the same model side by side, one with the live view and response
recording on (the defaults), one with both off (``AFFINITY_LIVE=false``,
``AFFINITY_RECORD_RESPONSES=false``). Before measuring, ``--live-fraction`` of the request mix's
users get ``LogEvents`` on the "on" server (likes and a dislike each), so their requests fold in
their events and run the dislike stage. Then the same load generator (:mod:`bench.loadgen`) runs
``Recommend`` for known users against each in alternating slices (on, off, on, off, ...), so
background load on a shared machine falls on both alike; rows are pooled over ``--rounds``.
``--variants`` adds servers that split the difference (recording only, live only, the dislike
stage off). The servers' own counters say how many requests the live view changed and how many
answers were recorded; an in-process breakdown times the pipeline's paths (a known user alone,
with live items, with a dislike) and recording one answer.

Both print Markdown tables and the command, and write JSON under ``bench/results/``::

    python -m bench.live all --postgres-uri postgresql+psycopg://USER:PASSWORD@HOST/DB
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from bench.common import SIZES, log, tiny_artifact
from bench.loadgen import LoadResult, alternate_rows, format_table
from service.cpus import available_cpus, format_cpu_list

RECOMMEND = "affinity.v1.Recommender/Recommend"
RESULTS = common.ROOT / "bench" / "results"
POSTGRES_ENV = "AFFINITY_TEST_POSTGRES_URI"
PREFIX = 16
"""Leading hex digits of a ``recommendation_id`` that name the worker process that answered."""


# ------------------------------------------------------------------ models


def model_artifact(args: argparse.Namespace) -> Path:
    """The served model: ``tiny`` built here, or the serving benchmark's registered champion."""
    workdir = Path(args.workdir)
    if args.size == "tiny":
        return tiny_artifact(workdir / "tiny" / "artifact")
    catalog = SIZES[args.size]
    workdir = workdir / catalog.name
    workdir.mkdir(parents=True, exist_ok=True)
    data = common.generate(catalog, workdir)
    if not (workdir / "artifact" / "manifest.json").is_file():
        log(f"fitting and registering ALS (64 factors) on {catalog.name}")
        common.register_quick(data, workdir)
    return common.champion_artifact(workdir)


def user_ids(artifact: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(artifact / "vocab.npz", allow_pickle=False) as vocab:
        return vocab["user_ids"], vocab["item_ids"]


# ------------------------------------------------------------------ servers and stores
@contextmanager
def serving(*args: Any, **options: Any) -> Iterator[int]:
    """``affinity serve`` of ``artifact`` over the event store ``uri``; yields the port (the
    arguments of :func:`served`)."""
    with served(*args, **options) as (port, _):
        yield port


@contextmanager
def served(
    artifact: Path,
    uri: str,
    label: str,
    logs: Path,
    *,
    workers: int,
    cpus: str,
    settings: dict[str, str],
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """``affinity serve`` of ``artifact`` over the event store ``uri``, with ``workers`` workers
    pinned to ``cpus`` and ``settings`` in its environment; yields the port and the server's
    process (to read its CPU time)."""
    port = common.free_port()
    command = [str(common.BIN / "affinity"), "serve", "--model", str(artifact)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    command += ["--poll-seconds", "0", "--log-level", "WARNING", "--events-uri", uri]
    command += ["--cpus", cpus]
    env = {**os.environ, "PYTHONPATH": str(common.ROOT), **settings}
    logs.mkdir(parents=True, exist_ok=True)
    with common.running(
        command, common.grpc_ready(port), env=env, log_path=logs / f"serve-{label}.log"
    ) as process:
        yield port, process


@contextmanager
def sqlite_store(directory: Path, label: str) -> Iterator[str]:
    """A fresh SQLite event store's URI; its files are removed afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{label}-{uuid.uuid4().hex[:8]}.db"
    try:
        yield f"sqlite:///{path}"
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


@contextmanager
def postgres_store(base: str) -> Iterator[str]:
    """A fresh schema in the PostgreSQL database ``base``; dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    schema = f"bench_live_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def scrape(port: int) -> dict[str, float]:
    """The server's Prometheus counters of the live view and the recorder."""
    import urllib.request

    wanted = (
        "affinity_live_requests_total",
        "affinity_responses_recorded_total",
        "affinity_responses_dropped_total",
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(wanted):
            name, _, value = line.rpartition(" ")
            found[name] = found.get(name, 0.0) + float(value)
    return found


def count_rows(uri: str, table: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(uri)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
    finally:
        engine.dispose()


def pinned_cpus(workers: int) -> str:
    """The last ``workers`` CPUs, one per worker (what ``bench.serving`` uses)."""
    return format_cpu_list((available_cpus() or [])[-workers:]) or "auto"


# ------------------------------------------------------------------ freshness
def _stub(port: int) -> tuple[Any, Any]:
    """A new channel with its own subchannel pool: a new TCP connection, hashed by the kernel to
    either worker (channels share connections through the global pool otherwise)."""
    import grpc

    from protos.affinity.v1 import recommender_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
    )
    return channel, pb_grpc.RecommenderStub(channel)


def _recommend(port: int, user: str) -> tuple[list[str], str]:
    """One ``Recommend`` on a new connection: the list's ids and the answering worker."""
    from protos.affinity.v1 import recommender_pb2 as pb

    channel, stub = _stub(port)
    try:
        reply = stub.Recommend(pb.RecommendRequest(user_id=user, k=10), timeout=10)
    finally:
        channel.close()
    return [item.item_id for item in reply.items], reply.recommendation_id[:PREFIX]


def discover_workers(port: int, user: str, workers: int, seconds: float = 120) -> list[str]:
    """The workers' id prefixes, from ``Recommend`` answers on new connections (the port
    answers as soon as one worker listens; the others may still be loading the model)."""
    seen: set[str] = set()
    deadline = time.monotonic() + seconds
    while len(seen) < workers and time.monotonic() < deadline:
        seen.add(_recommend(port, user)[1])
        time.sleep(0.02)
    return sorted(seen)


def one_event(
    port: int, user: str, event_id: str, workers: set[str], interval: float, max_wait: float
) -> dict[str, Any]:
    """Like the user's top item, then probe until every worker reflects it (see the module
    docstring); times in ms from the acknowledgement."""
    from protos.affinity.v1 import recommender_pb2 as pb

    channel, stub = _stub(port)
    try:
        before = stub.Recommend(pb.RecommendRequest(user_id=user, k=10), timeout=10)
        top = before.items[0].item_id
        event = pb.Event(event_id=event_id, user_id=user, item_id=top, event="like")
        sent = time.perf_counter()
        reply = stub.LogEvents(pb.LogEventsRequest(events=[event]), timeout=10)
        acked = time.perf_counter()
    finally:
        channel.close()
    if reply.accepted != 1:
        raise RuntimeError(f"event {event_id} not accepted: {reply}")
    ack_worker = before.recommendation_id[:PREFIX]
    first: float | None = None
    per_worker: dict[str, float] = {}
    probes: list[tuple[float, str, bool]] = []
    while True:
        items, worker = _recommend(port, user)
        at = 1000 * (time.perf_counter() - acked)
        reflected = top not in items
        probes.append((round(at, 3), worker, reflected))
        if reflected:
            first = at if first is None else first
            per_worker.setdefault(worker, at)
        if set(per_worker) >= workers or at > 1000 * max_wait:
            break
        time.sleep(interval)
    others = [ms for w, ms in per_worker.items() if w != ack_worker]
    # The other workers caught up between their last stale answer and their first fresh one.
    stale_elsewhere = [at for at, w, r in probes if w != ack_worker and not r]
    return {
        "user": user,
        "item": top,
        "acked_at": time.time() - (time.perf_counter() - acked),
        "ack_ms": 1000 * (acked - sent),
        "ack_worker": ack_worker,
        "first_ms": first,
        "first_probe_reflected": probes[0][2],
        "first_probe_same_worker": probes[0][1] == ack_worker,
        "ack_worker_ms": per_worker.get(ack_worker),
        "other_worker_ms": max(others) if others and len(others) == len(workers) - 1 else None,
        "all_workers_ms": max(per_worker.values()) if set(per_worker) >= workers else None,
        "other_worker_last_stale_ms": max(stale_elsewhere) if stale_elsewhere else None,
        "probes": len(probes),
        "stale_probes": sum(not r for _, _, r in probes),
        "probe_log": probes,
    }


def _percentiles(values: list[float | None]) -> dict[str, float]:
    """p50/p95/p99/max of the measured values; ``missing`` counts the events never reflected."""
    got = np.array([v for v in values if v is not None], dtype=np.float64)
    if not len(got):
        return {"n": 0, "missing": len(values)}
    p50, p95, p99 = np.percentile(got, [50, 95, 99])
    return {
        "n": len(got),
        "missing": len(values) - len(got),
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "max": float(got.max()),
    }


def freshness_run(artifact: Path, uri: str, label: str, args: argparse.Namespace) -> dict[str, Any]:
    """One store: serve, send the events from ``--parallel`` threads, summarize."""
    users, _ = user_ids(artifact)
    rng = np.random.default_rng(args.seed)
    chosen = rng.choice(users, size=min(args.events + 1, len(users)), replace=False).tolist()
    probe_user, chosen = chosen[0], chosen[1:]
    settings = {
        "AFFINITY_LIVE": "true",
        "AFFINITY_RECORD_RESPONSES": "true",
        "AFFINITY_LIVE_POLL_SECONDS": str(args.live_poll_seconds),
    }
    run_id = uuid.uuid4().hex[:8]
    records: list[dict[str, Any]] = []
    failures: list[str] = []
    lock = threading.Lock()
    with serving(
        artifact,
        uri,
        f"freshness-{label}",
        Path(args.workdir) / "live" / "logs",
        workers=args.workers,
        cpus=args.cpus or "auto",
        settings=settings,
    ) as port:
        workers = discover_workers(port, probe_user, args.workers)
        if len(workers) < args.workers:
            raise RuntimeError(f"saw {len(workers)} of {args.workers} workers answer")
        log(f"{label}: {len(chosen)} events, workers {', '.join(workers)}")
        started = time.perf_counter()

        def sender(share: list[str], offset: int) -> None:
            # A random pause before each event: without it a thread would send its next event
            # just after the other worker's poll that revealed the previous one, and every
            # event would wait nearly a whole poll interval there.
            pauses = np.random.default_rng([args.seed, offset]).uniform(
                0, args.live_poll_seconds, size=len(share)
            )
            for n, user in enumerate(share):
                time.sleep(pauses[n])
                try:
                    record = one_event(
                        port,
                        user,
                        f"live-{run_id}-{offset}-{n}",
                        set(workers),
                        args.probe_interval,
                        args.max_wait,
                    )
                except Exception as exc:  # count it, keep measuring
                    with lock:
                        failures.append(f"{user}: {exc}")
                    continue
                with lock:
                    records.append(record)

        threads = [
            threading.Thread(target=sender, args=(chosen[t :: args.parallel], t))
            for t in range(args.parallel)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
    return {
        "store": label,
        "events": len(chosen),
        "measured": len(records),
        "failures": failures[:20],
        "failure_count": len(failures),
        "seconds": seconds,
        "workers": workers,
        "first_probe_reflected": float(np.mean([r["first_probe_reflected"] for r in records]))
        if records
        else float("nan"),
        "first_probe_same_worker": float(np.mean([r["first_probe_same_worker"] for r in records]))
        if records
        else float("nan"),
        "probes_per_event": float(np.mean([r["probes"] for r in records])) if records else 0.0,
        "other_worker_bracket_ms": _percentiles(
            [
                r["other_worker_ms"] - r["other_worker_last_stale_ms"]
                for r in records
                if r["other_worker_ms"] is not None and r["other_worker_last_stale_ms"] is not None
            ]
        ),
        "stale_probes": int(sum(r["stale_probes"] for r in records)),
        "ack_ms": _percentiles([r["ack_ms"] for r in records]),
        "first_ms": _percentiles([r["first_ms"] for r in records]),
        "ack_worker_ms": _percentiles([r["ack_worker_ms"] for r in records]),
        "other_worker_ms": _percentiles([r["other_worker_ms"] for r in records]),
        "all_workers_ms": _percentiles([r["all_workers_ms"] for r in records]),
        "records": records,
    }


def render_freshness(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| store | measured from the acknowledgement to | events | p50 ms | p95 ms | p99 ms "
        "| max ms | never |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    measures = (
        ("first_ms", "the first reflecting Recommend"),
        ("ack_worker_ms", "... on the acknowledging worker"),
        ("other_worker_ms", "... on the other worker"),
        ("all_workers_ms", "reflected on every worker"),
        ("ack_ms", "(LogEvents round trip, from the send)"),
    )
    for row in rows:
        for key, name in measures:
            p = row[key]
            if key == "other_worker_ms" and len(row["workers"]) < 2:
                continue
            if not p["n"]:
                lines.append(f"| {row['store']} | {name} | 0 | | | | | {p['missing']} |")
                continue
            lines.append(
                f"| {row['store']} | {name} | {p['n']} | {p['p50']:.1f} | {p['p95']:.1f} "
                f"| {p['p99']:.1f} | {p['max']:.1f} | {p['missing']} |"
            )
    lines.append("")
    for row in rows:
        lines.append(
            f"{row['store']}: first probe reflected {row['first_probe_reflected']:.1%} "
            f"(it landed on the acknowledging worker {row['first_probe_same_worker']:.1%}); "
            f"{row['probes_per_event']:.1f} probes per event, {row['stale_probes']} stale "
            f"answers; {row['failure_count']} failed events; {row['seconds']:.1f} s."
        )
        bracket = row["other_worker_bracket_ms"]
        if bracket["n"]:
            lines[-1] += (
                f" The other worker caught up between its last stale and its first fresh answer,"
                f" {bracket['p50']:.1f} ms apart at the median ({bracket['n']} events with a stale"
                " answer there)."
            )
    return "\n".join(lines) + "\n"


def freshness(args: argparse.Namespace, command: str) -> dict[str, Any]:
    artifact = model_artifact(args)
    stores = Path(args.workdir) / "live"
    rows = []
    with sqlite_store(stores, "freshness") as uri:
        rows.append(freshness_run(artifact, uri, "SQLite", args))
    if args.postgres_uri:
        with postgres_store(args.postgres_uri) as uri:
            rows.append(freshness_run(artifact, uri, "PostgreSQL", args))
    report = {
        "command": command,
        "size": args.size,
        "artifact": str(artifact),
        "workers": args.workers,
        "live_poll_seconds": args.live_poll_seconds,
        "probe_interval_s": args.probe_interval,
        "parallel": args.parallel,
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
        "rows": rows,
    }
    text = render_freshness(rows)
    print(
        f"\n`{command}` (freshness: {args.size} model, {args.workers} worker(s), live poll "
        f"{args.live_poll_seconds:g} s, probes every {args.probe_interval * 1000:g} ms on new "
        f"connections, {args.parallel} users at a time)\n"
    )
    print(text)
    out = Path(args.results) / "live-freshness.json"
    common.write_json(out, report)
    log(f"wrote {out}")
    return report


# ------------------------------------------------------------------ cost
def live_events(
    port: int, users: list[str], items: np.ndarray, per_user: int, seed: int
) -> dict[str, int]:
    """``per_user`` likes and one dislike for each of ``users``, in batches; the counts."""
    from protos.affinity.v1 import recommender_pb2 as pb

    rng = np.random.default_rng(seed)
    run_id = uuid.uuid4().hex[:8]
    events = []
    for u, user in enumerate(users):
        picks = rng.choice(items, size=per_user + 1, replace=False).tolist()
        for n, item in enumerate(picks):
            name = "dislike" if n == per_user else "like"
            events.append(
                pb.Event(event_id=f"c-{run_id}-{u}-{n}", user_id=user, item_id=item, event=name)
            )
    accepted = 0
    channel, stub = _stub(port)
    try:
        for start in range(0, len(events), 500):
            batch = pb.LogEventsRequest(events=events[start : start + 500])
            accepted += stub.LogEvents(batch, timeout=30).accepted
    finally:
        channel.close()
    return {"events": len(events), "accepted": accepted}


def lists_differ(on: int, off: int, users: list[str]) -> float:
    """Share of ``users`` whose list from the "on" server differs from the "off" server's."""
    differ = [_recommend(on, u)[0] != _recommend(off, u)[0] for u in users]
    return float(np.mean(differ)) if differ else float("nan")


VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "on": ("on: live + recording", {"AFFINITY_LIVE": "true", "AFFINITY_RECORD_RESPONSES": "true"}),
    "off": ("off", {"AFFINITY_LIVE": "false", "AFFINITY_RECORD_RESPONSES": "false"}),
    "recording": (
        "recording only",
        {"AFFINITY_LIVE": "false", "AFFINITY_RECORD_RESPONSES": "true"},
    ),
    "live": ("live only", {"AFFINITY_LIVE": "true", "AFFINITY_RECORD_RESPONSES": "false"}),
    "no-dislike-stage": (
        "on, dislike weight 0",
        {
            "AFFINITY_LIVE": "true",
            "AFFINITY_RECORD_RESPONSES": "true",
            "AFFINITY_DISLIKE_WEIGHT": "0",
        },
    ),
}
"""``--variants`` of the cost benchmark: label and settings. ``on`` and ``off`` are the
comparison; the others split the difference (``no-dislike-stage``: disliked items are still
removed, their neighbours not pushed down)."""


def inprocess_costs(
    artifact: Path, users: list[str], items: np.ndarray, seed: int, n: int = 1000
) -> dict[str, float]:
    """Microseconds per call, in this process: the ranking pipeline (as the server builds it,
    with the default dislike weight) for a known user alone, with 3 live items, with 1 disliked
    item, with both; and recording one answer (``EventStore.record_responses`` on SQLite, in
    batches of 500, CPU time)."""
    from datetime import UTC, datetime

    from threadpoolctl import threadpool_limits

    from service.config import ServeSettings
    from service.events import EventStore, Response
    from service.loader import ModelMeta, load_directory

    weight = float(ServeSettings.model_fields["dislike_weight"].default)
    meta = ModelMeta(name="bench", version="1", run_id="", algorithm="", source_uri=str(artifact))
    rng = np.random.default_rng(seed)
    chosen = users[:n]
    picks = {u: rng.choice(items, size=4, replace=False).tolist() for u in chosen}
    out: dict[str, float] = {"dislike_weight": weight}
    with threadpool_limits(1):
        pipeline = load_directory(artifact, meta, dislike_weight=weight).pipeline
        cases: dict[str, Callable[[str], Any]] = {
            "recommend_us": lambda u: pipeline.recommend(u, 10),
            "recommend_3_live_items_us": lambda u: pipeline.recommend(
                u, 10, recent_item_ids=picks[u][:3]
            ),
            "recommend_1_dislike_us": lambda u: pipeline.recommend(
                u, 10, disliked_item_ids=picks[u][3:]
            ),
            "recommend_both_us": lambda u: pipeline.recommend(
                u, 10, recent_item_ids=picks[u][:3], disliked_item_ids=picks[u][3:]
            ),
        }
        for _ in range(2):  # the second pass is kept: caches warm, the kernel compiled
            for name, call in cases.items():
                started = time.perf_counter()
                for u in chosen:
                    call(u)
                out[name] = 1e6 * (time.perf_counter() - started) / len(chosen)
    with sqlite_store(Path(tempfile.gettempdir()), "bench-live-record") as uri:
        store = EventStore.open(uri)
        try:
            answers = [
                Response(
                    recommendation_id=uuid.uuid4().hex,
                    method="Recommend",
                    user_id=u,
                    item_ids=tuple(items[:10].tolist()),
                    source="personalized",
                    model_name="bench",
                    model_version="1",
                    served_at=datetime.now(UTC),
                )
                for u in chosen
            ]
            store.record_responses(answers[:10])
            started = time.process_time()
            for start in range(10, len(answers), 500):
                store.record_responses(answers[start : start + 500])
            out["record_cpu_us"] = 1e6 * (time.process_time() - started) / (len(answers) - 10)
        finally:
            store.close()
    return out


def cost(args: argparse.Namespace, command: str) -> dict[str, Any]:
    from protos.affinity.v1 import recommender_pb2 as pb

    artifact = model_artifact(args)
    users, items = user_ids(artifact)
    rng = np.random.default_rng(args.seed)
    mix = rng.choice(users, size=min(args.requests, len(users)), replace=False).tolist()
    live_users = mix[: max(1, round(args.live_fraction * len(mix)))]
    # Shuffled, so that live users are spread through every slice of the rotation.
    order = rng.permutation(len(mix))
    bodies = [pb.RecommendRequest(user_id=mix[i], k=10).SerializeToString() for i in order.tolist()]
    cpus = args.cpus or pinned_cpus(args.workers)
    stores = Path(args.workdir) / "live"
    grpc_target = "grpc://127.0.0.1:{}/" + RECOMMEND
    report: dict[str, Any] = {
        "command": command,
        "size": args.size,
        "artifact": str(artifact),
        "workers": args.workers,
        "cpus": cpus,
        "variants": {VARIANTS[v][0]: VARIANTS[v][1] for v in args.variants},
        "requests_in_mix": len(mix),
        "live_users": len(live_users),
        "live_events_per_user": f"{args.likes} likes + 1 dislike",
        "duration_s": args.duration,
        "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
    }
    ports: dict[str, int] = {}
    metrics: dict[str, int] = {}
    uris: dict[str, str] = {}
    with ExitStack() as stack:
        for variant in args.variants:
            label, settings = VARIANTS[variant]
            metrics[variant] = common.free_port()
            settings = {
                **settings,
                "AFFINITY_LIVE_POLL_SECONDS": str(args.live_poll_seconds),
                "AFFINITY_METRICS_PORT": str(metrics[variant]),
                "AFFINITY_METRICS_HOST": "127.0.0.1",
            }
            uris[variant] = stack.enter_context(sqlite_store(stores, f"cost-{variant}"))
            ports[variant] = stack.enter_context(
                serving(
                    artifact,
                    uris[variant],
                    f"cost-{variant}",
                    stores / "logs",
                    workers=args.workers,
                    cpus=cpus,
                    settings=settings,
                )
            )
        live = [v for v in args.variants if VARIANTS[v][1]["AFFINITY_LIVE"] == "true"]
        report["live_events"] = {
            v: live_events(ports[v], live_users, items, args.likes, args.seed) for v in live
        }
        time.sleep(2 * args.live_poll_seconds + 0.5)  # every worker has tailed them
        if "on" in ports and "off" in ports:
            report["live_lists_differ"] = lists_differ(ports["on"], ports["off"], live_users[:100])
            log(f"live users' lists differ on / off: {report['live_lists_differ']:.0%}")
        results: list[LoadResult] = []
        recorded_before = {v: count_rows(uris[v], "responses") for v in args.variants}
        counters_before = {v: scrape(metrics[v]) for v in args.variants}
        targets = {VARIANTS[v][0]: grpc_target.format(ports[v]) for v in args.variants}
        results += alternate_rows(
            targets,
            bodies,
            concurrencies=args.concurrency,
            duration=args.duration,
            rounds=args.rounds,
            processes=args.client_processes,
            log=log,
        )
        time.sleep(1.0)  # the recorder writes every 0.2 s
        report["during_run"] = {}
        for variant in args.variants:
            after = scrape(metrics[variant])
            counters = {k: v - counters_before[variant].get(k, 0.0) for k, v in after.items()}
            report["during_run"][VARIANTS[variant][0]] = {
                "requests_counted": sum(
                    r.requests for r in results if r.label == VARIANTS[variant][0]
                ),
                "responses_recorded": count_rows(uris[variant], "responses")
                - recorded_before[variant],
                **{
                    effect: int(
                        counters.get(f'affinity_live_requests_total{{effect="{effect}"}}', 0)
                    )
                    for effect in ("fold_in", "dislike")
                },
                "responses_dropped": int(counters.get("affinity_responses_dropped_total", 0)),
            }
    report["results"] = [r.to_json() for r in results]
    off = VARIANTS["off"][0]
    report["ratios"] = {
        f"{VARIANTS[v][0]} / off, c={c}": _ratio(results, c, VARIANTS[v][0], off)
        for c in args.concurrency
        for v in args.variants
        if v != "off" and "off" in args.variants
    }
    if not args.skip_inprocess:
        log("in-process costs of the pipeline paths and of recording")
        report["inprocess"] = inprocess_costs(artifact, mix, items, args.seed)
    print(
        f"\n`{command}` (cost: {args.size} model, {args.workers} worker(s) pinned to CPU "
        f"{cpus}, {len(live_users)} of {len(mix)} users with live events, "
        f"{args.rounds} alternating slices of {args.duration / args.rounds:g} s per row)\n"
    )
    print(format_table(results))
    print("| ratio | req/s |\n|---|---:|")
    print("".join(f"| {k} | {v:.3f} |\n" for k, v in report["ratios"].items()))
    if "live_lists_differ" in report:
        print(f"Live users' lists differ between on and off: {report['live_lists_differ']:.0%}.")
    print("\n| server | requests counted | answers recorded | fold-in applied | dislikes applied |")
    print("|---|---:|---:|---:|---:|")
    for label, row in report["during_run"].items():
        print(
            f"| {label} | {row['requests_counted']:,} | {row['responses_recorded']:,} "
            f"| {row['fold_in']:,} | {row['dislike']:,} |"
        )
    print(
        "\n(requests counted: after each slice's warm-up second; the servers' counters include it.)"
    )
    if "inprocess" in report:
        cost_us = report["inprocess"]
        print("\n| in-process, per call | us |\n|---|---:|")
        print("".join(f"| {k} | {v:.1f} |\n" for k, v in cost_us.items()))
    out = Path(args.results) / "live-cost.json"
    common.write_json(out, report)
    log(f"wrote {out}")
    return report


def _ratio(results: list[LoadResult], c: int, on: str, off: str) -> float:
    def rps(label: str) -> float:
        return next(r.rps for r in results if r.label == label and r.concurrency == c)

    return rps(on) / rps(off)


# ------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.live", description=__doc__)
    parser.add_argument("benchmark", choices=["freshness", "cost", "all"])
    common.add_model_options(parser)
    parser.add_argument(
        "--live-poll-seconds",
        type=float,
        default=0.25,
        help="AFFINITY_LIVE_POLL_SECONDS of the servers with the live view on",
    )
    parser.add_argument(
        "--cpus",
        help="affinity serve --cpus (default: freshness auto, cost the last --workers CPUs)",
    )
    fresh = parser.add_argument_group("freshness")
    fresh.add_argument("--events", type=int, default=500, help="events (distinct users)")
    fresh.add_argument(
        "--workers", type=int, default=None, help="server workers (default: freshness 2, cost 1)"
    )
    fresh.add_argument("--parallel", type=int, default=4, help="users probed at a time")
    fresh.add_argument("--probe-interval", type=float, default=0.01, help="seconds between probes")
    fresh.add_argument(
        "--max-wait",
        type=float,
        default=5.0,
        help="seconds after which an event counts as never reflected",
    )
    fresh.add_argument(
        "--postgres-uri",
        default=os.environ.get(POSTGRES_ENV),
        help=f"also measure this PostgreSQL database (default: ${POSTGRES_ENV})",
    )
    loop = parser.add_argument_group("cost")
    common.add_load_options(loop)
    loop.add_argument(
        "--live-fraction",
        type=float,
        default=0.1,
        help="share of the mix's users given live events first",
    )
    loop.add_argument("--likes", type=int, default=3, help="likes per live user (and 1 dislike)")
    loop.add_argument(
        "--variants",
        type=lambda s: s.split(","),
        default=["on", "off"],
        help=f"servers measured side by side, from {', '.join(VARIANTS)} (default on,off)",
    )
    loop.add_argument(
        "--skip-inprocess", action="store_true", help="skip the in-process cost breakdown"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown --variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    given = sys.argv[1:] if argv is None else argv
    shown = ["$POSTGRES_URI" if a.startswith("postgresql") else a for a in given]
    command = shlex.join(["python", "-m", "bench.live", *shown])
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, Callable[[argparse.Namespace, str], dict[str, Any]]]] = []
    if args.benchmark in ("freshness", "all"):
        jobs.append(("freshness", freshness))
    if args.benchmark in ("cost", "all"):
        jobs.append(("cost", cost))
    for name, job in jobs:
        run_args = argparse.Namespace(**vars(args))
        if run_args.workers is None:
            run_args.workers = 2 if name == "freshness" else 1
        job(run_args, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
