"""Ingest benchmark: acknowledged events per second through ``LogEvents``.

Starts ``affinity serve`` with one worker on a tiny model (the model does not matter here) and a
fresh event store, then ``--processes`` client processes, each with ``--threads`` threads and its
own channel, send batches of ``--batch`` new events as fast as the answers come back, for
``--seconds`` after a warm-up, all clients over the same window. Counted: events answered
``accepted`` (committed), and the CPU time the server process and the clients used in that
window (``/proc``), per 1,000 acknowledged events: the clients share the machine's cores with the
server, so the rate alone understates what one worker can do. The server runs with its defaults
(the live view and its tail, the response recorder) unless ``--no-live`` or ``--no-record``.
Runs SQLite, and PostgreSQL when ``--postgres-uri`` is given (a schema of its own, dropped
afterwards; the database server's own CPU is not counted). Prints a Markdown table and the
command, and writes ``<workdir>/events.json``::

    python -m bench.events --postgres-uri postgresql+psycopg://USER:PASSWORD@HOST/DB
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shlex
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench import common
from bench.common import log, tiny_artifact

WARMUP_SECONDS = 2.0


def _client(
    port: int, batch: int, threads: int, seconds: float, queue: Any, go: Any, start_at: Any
) -> None:
    """One client process: ``threads`` senders, started together with the other clients at
    ``start_at`` (wall clock); reports (accepted, requests, errors, CPU seconds) for the window
    after the warm-up."""
    import grpc

    from protos.affinity.v1 import recommender_pb2 as pb
    from protos.affinity.v1 import recommender_pb2_grpc as pb_grpc

    prefix = uuid.uuid4().hex[:12]
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(threads)]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=30)
    queue.put("ready")
    go.wait()
    start = start_at.value
    measure_from, stop_at = start + WARMUP_SECONDS, start + WARMUP_SECONDS + seconds
    totals = [0, 0, 0]
    lock = threading.Lock()
    cpu: list[float] = []

    def sender(t: int) -> None:
        accepted = requests = errors = 0
        # The raw stub: the client's dataclass conversion would take CPU from the server.
        stub = pb_grpc.RecommenderStub(channels[t])
        n = 0
        time.sleep(max(0.0, start - time.time()))
        while (now := time.time()) < stop_at:
            events = []
            for _ in range(batch):
                n += 1
                events.append(
                    pb.Event(
                        event_id=f"{prefix}-{t}-{n}",
                        user_id=f"u{n % 1000}",
                        item_id=f"i{n % 20}",
                        event="click",
                    )
                )
            try:
                response = stub.LogEvents(pb.LogEventsRequest(events=events), timeout=30)
            except Exception:
                if now >= measure_from:
                    errors += 1
                continue
            if now >= measure_from and time.time() <= stop_at:
                accepted += response.accepted
                requests += 1
        with lock:
            totals[0] += accepted
            totals[1] += requests
            totals[2] += errors

    def clock() -> None:
        time.sleep(max(0.0, measure_from - time.time()))
        cpu.append(time.process_time())
        time.sleep(max(0.0, stop_at - time.time()))
        cpu.append(time.process_time())

    pool = [threading.Thread(target=sender, args=(t,)) for t in range(threads)]
    pool.append(threading.Thread(target=clock))
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    for channel in channels:
        channel.close()
    queue.put((*totals, cpu[1] - cpu[0]))


def measure(uri: str, label: str, args: argparse.Namespace, artifact: Path) -> dict[str, Any]:
    """Serve ``uri`` with one worker and load it; the row of the table."""
    port = common.free_port()
    command = [str(common.BIN / "affinity"), "serve", "--model", str(artifact)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--poll-seconds", "0", "--log-level", "WARNING", "--events-uri", uri]
    command += ["--max-in-flight", str(max(64, args.processes * args.threads))]
    env = {**os.environ, "PYTHONPATH": str(common.ROOT)}
    if args.no_live:
        env["AFFINITY_LIVE"] = "false"
    if args.no_record:
        env["AFFINITY_RECORD_RESPONSES"] = "false"
    log(f"{label}: serving {uri.split('@')[-1]} on port {port}")
    spawn = mp.get_context("spawn")
    with common.running(
        command, common.grpc_ready(port), env=env, log_path=args.workdir / f"serve-{label}.log"
    ) as server:
        queue: Any = spawn.Queue()
        go, start_at = spawn.Event(), spawn.Value("d", 0.0)
        procs = [
            spawn.Process(
                target=_client,
                args=(port, args.batch, args.threads, args.seconds, queue, go, start_at),
            )
            for _ in range(args.processes)
        ]
        for proc in procs:
            proc.start()
        for _ in procs:
            queue.get(timeout=120)  # "ready": imported and connected
        start_at.value = time.time() + 0.2
        go.set()
        time.sleep(max(0.0, start_at.value + WARMUP_SECONDS - time.time()))
        server_cpu = common.cpu_seconds(server.pid)
        time.sleep(max(0.0, start_at.value + WARMUP_SECONDS + args.seconds - time.time()))
        server_cpu = common.cpu_seconds(server.pid) - server_cpu
        results = [queue.get(timeout=args.seconds + 120) for _ in procs]
        for proc in procs:
            proc.join()
    accepted = sum(r[0] for r in results)
    requests = sum(r[1] for r in results)
    errors = sum(r[2] for r in results)
    client_cpu = sum(r[3] for r in results)
    per_1000 = 1000 / max(accepted, 1)
    return {
        "database": label,
        "events_per_s": accepted / args.seconds,
        "requests_per_s": requests / args.seconds,
        "mean_batch_ms": 1000 * args.seconds * args.processes * args.threads / max(requests, 1),
        "errors": errors,
        "server_cpu_ms_per_1000": 1000 * server_cpu * per_1000,
        "server_cores": server_cpu / args.seconds,
        "client_cpu_ms_per_1000": 1000 * client_cpu * per_1000,
    }


def _postgres_schema(base: str) -> tuple[str, Any]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    schema = f"bench_events_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))

    def drop() -> None:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False), drop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=common.ROOT / "bench/results/events")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--batch", type=int, default=100, help="events per request")
    parser.add_argument("--processes", type=int, default=4, help="client processes")
    parser.add_argument("--threads", type=int, default=4, help="threads per client process")
    parser.add_argument("--postgres-uri", help="also measure this PostgreSQL database")
    parser.add_argument("--no-live", action="store_true", help="serve without the live view")
    parser.add_argument(
        "--no-record", action="store_true", help="serve without the response recorder"
    )
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    artifact = tiny_artifact(args.workdir / "model")
    rows = []
    sqlite_path = args.workdir / f"events-{uuid.uuid4().hex[:8]}.db"
    try:
        rows.append(measure(f"sqlite:///{sqlite_path}", "sqlite", args, artifact))
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{sqlite_path}{suffix}").unlink(missing_ok=True)
    if args.postgres_uri:
        uri, drop = _postgres_schema(args.postgres_uri)
        try:
            rows.append(measure(uri, "postgresql", args, artifact))
        finally:
            drop()
    shown = [a if not a.startswith("postgresql") else "$POSTGRES_URI" for a in sys.argv[1:]]
    command = shlex.join(["python", "-m", "bench.events", *shown])
    print(f"\n`{command}` ({os.cpu_count()} CPUs, 1 worker, batches of {args.batch}, ", end="")
    print(f"{args.processes} processes x {args.threads} threads)\n")
    print(
        "| database | acknowledged events/s | requests/s | mean batch latency ms | errors "
        "| server CPU ms / 1,000 events | server cores busy | client CPU ms / 1,000 events |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['database']} | {row['events_per_s']:,.0f} | {row['requests_per_s']:,.0f} "
            f"| {row['mean_batch_ms']:.1f} | {row['errors']} "
            f"| {row['server_cpu_ms_per_1000']:.1f} | {row['server_cores']:.2f} "
            f"| {row['client_cpu_ms_per_1000']:.1f} |"
        )
    common.write_json(args.workdir / "events.json", {"command": command, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
