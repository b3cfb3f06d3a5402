"""What a loaded serving worker pays for a piece of work, against the same work in a quiet loop.

A ranking rule adds some tens of microseconds to ``pipeline.recommend`` timed in process, and
two to four times that to each ``Recommend`` of a loaded server (``bench.rules``,
``docs/benchmarks.md``). This benchmark measures where that comes from, by the CPU time a
worker spends per request rather than by throughput alone:

* rule variants (``off``, ``cap``, ``mmr``, ``boost``, ``promotion``, ``on``: the servers of
  :mod:`bench.rules`), whose quiet cost is the servicer's own (``RecommenderServicer.Recommend``
  called in a loop in this process, without gRPC or a recorder, the mean over the request mix);
* probes that add a fixed piece of work ahead of every ``Recommend`` of a server without rules:
  ``python:N`` (a Python loop of ``N`` additions: interpreter work, no data), ``scan:N`` (a
  compiled loop over ``N`` rows of a 20,000 x 64 float32 matrix from a random start: ``N x 256``
  bytes of data, as a search's first block reads) and ``spin:N`` (the same loop over the same 64
  rows every time: the same arithmetic on 16 KiB); ``scan-nogil:N`` and ``spin-nogil:N`` release
  the GIL while they run. The probe is loaded into the worker by a
  ``sitecustomize`` module in a temporary directory put first on its ``PYTHONPATH`` (the product
  carries no hook); its quiet cost is timed in this process.

Every server is ``affinity serve --workers 1`` pinned to one CPU (recording on, as deployed),
loaded in alternating slices by :mod:`bench.loadgen` (closed loop); per slice the worker's CPU
time (every process and thread of it, from ``/proc``) is divided by the requests it answered.
The quiet costs are timed pinned to the same CPU, with BLAS on one thread. Prints a Markdown
table (CPU per request, what each variant adds over ``off``, the quiet cost and their ratio)
and the command, and writes ``bench/results/worker-cpu.json``::

    python -m bench.worker_cpu
    python -m bench.worker_cpu --variants off,boost,promotion,python:1500,scan:1000,spin:1000
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from bench.common import log
from bench.live import RECOMMEND, model_artifact, served, sqlite_store
from bench.loadgen import LoadSpec, run_load

ROWS, DIMS = 20_000, 64
"""The probes' matrix: the benchmark catalog's item factors' shape."""

PROBE = textwrap.dedent(
    '''
    """Adds the work AFFINITY_BENCH_PROBE names ahead of every Recommend (bench.worker_cpu)."""
    import os

    _probe = os.environ.get("AFFINITY_BENCH_PROBE")
    if _probe:
        from bench.worker_cpu import probe_work
        import service.servicer as _servicer

        _work = probe_work(_probe)
        _recommend = _servicer.RecommenderServicer.Recommend

        def Recommend(self, request, context):
            _work()
            return _recommend(self, request, context)

        _servicer.RecommenderServicer.Recommend = Recommend
    '''
)


def probe_work(spec: str) -> Callable[[], None]:
    """The work of probe ``spec`` (``python:N``, ``scan:N`` or ``spin:N``), compiled and ready."""
    kind, _, count = spec.partition(":")
    n = int(count)
    if kind == "python":

        def python() -> None:
            total = 0
            for i in range(n):
                total += i

        return python
    free = kind.endswith("-nogil")
    kind = kind.removesuffix("-nogil")
    if kind not in ("scan", "spin"):
        raise ValueError(f"unknown probe {spec!r}: python:N, scan:N or spin:N (-nogil allowed)")
    if kind == "scan" and not 0 < n <= ROWS:
        raise ValueError(f"scan:N takes 1 to {ROWS} rows, got {n}")
    from numba import njit

    matrix = np.random.default_rng(0).random((ROWS, DIMS), dtype=np.float32)

    @njit(cache=False, nogil=free)
    def rows_sum(m: np.ndarray, start: int, count: int, wrap: int) -> float:
        total = 0.0
        for i in range(count):
            row = start + (i % wrap)
            for j in range(m.shape[1]):
                total += m[row, j]
        return total

    rows_sum(matrix, 0, 1, 1)  # compile before the first request
    rng = np.random.default_rng(1)
    if kind == "scan":
        return lambda: rows_sum(matrix, int(rng.integers(0, ROWS - n + 1)), n, n)
    return lambda: rows_sum(matrix, 0, n, min(n, 64))


def quiet_probe(spec: str, calls: int = 3000) -> float:
    """Microseconds one call of probe ``spec`` takes in a loop here (after a warm-up)."""
    work = probe_work(spec)
    for _ in range(calls // 10):
        work()
    start = time.perf_counter()
    for _ in range(calls):
        work()
    return (time.perf_counter() - start) / calls * 1e6


def quiet_servicer(artifact: Path, settings: dict[str, str], bodies: list[bytes]) -> float:
    """Microseconds one ``RecommenderServicer.Recommend`` takes here under the rule settings
    ``settings`` (the server's defaults), without gRPC and without a recorder: the mean over
    ``bodies``, three passes after a warm-up one."""
    from protos.affinity.v1 import recommender_pb2 as pb
    from service.config import ServeSettings
    from service.loader import ModelHolder, ModelLoader
    from service.rules import RuleDefaults, RuleResolver
    from service.servicer import RecommenderServicer

    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        config = ServeSettings(model_uri=str(artifact), poll_seconds=0)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    holder = ModelHolder()
    ModelLoader(config, holder).load_initial()
    servicer = RecommenderServicer(
        holder, rules=RuleResolver(RuleDefaults.from_settings(config), max_ids=config.max_ids)
    )

    class Context:
        def time_remaining(self) -> None:
            return None

    context = Context()
    requests = [pb.RecommendRequest.FromString(b) for b in bodies]
    for request in requests:
        servicer.Recommend(request, context)
    start = time.perf_counter()
    for _ in range(3):
        for request in requests:
            servicer.Recommend(request, context)
    return (time.perf_counter() - start) / (3 * len(requests)) * 1e6


def measure(args: argparse.Namespace, command: str) -> dict[str, Any]:
    from threadpoolctl import threadpool_limits

    from bench.rules import variants as rule_variants
    from protos.affinity.v1 import recommender_pb2 as pb

    artifact = model_artifact(args)
    rules = rule_variants(artifact)
    probes = [v for v in args.variants if ":" in v]
    unknown = [v for v in args.variants if ":" not in v and v not in rules]
    if unknown or "off" not in args.variants:
        raise SystemExit(
            f"--variants needs off and takes {', '.join(rules)} or probes; got {unknown}"
        )
    for spec in probes:
        probe_work(spec)  # a bad probe fails here, not in a server
    with np.load(artifact / "vocab.npz", allow_pickle=False) as vocab:
        users = vocab["user_ids"]
    rng = np.random.default_rng(args.seed)
    mix = rng.choice(users, size=min(args.requests, len(users)), replace=False).tolist()
    bodies = [pb.RecommendRequest(user_id=u, k=10).SerializeToString() for u in mix]
    cpu = args.cpu
    report: dict[str, Any] = {
        "command": command,
        "size": args.size,
        "cpu": cpu,
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
    }
    # Quiet costs first, pinned to the servers' CPU, before any server runs.
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    quiet: dict[str, float] = {}
    try:
        with threadpool_limits(1):
            for spec in probes:
                quiet[spec] = quiet_probe(spec)
            for name in args.variants:
                if ":" not in name:
                    quiet[name] = quiet_servicer(artifact, rules[name][1], bodies[:500])
    finally:
        os.sched_setaffinity(0, before)
    log(f"quiet costs (us): { {k: round(v, 1) for k, v in quiet.items()} }")
    spent = {name: 0.0 for name in args.variants}
    answered = {name: 0 for name in args.variants}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as hook:
        Path(hook, "sitecustomize.py").write_text(PROBE)
        stores = Path(args.workdir) / "worker-cpu"
        servers: dict[str, tuple[int, int]] = {}
        for name in args.variants:
            settings = dict(rules["off" if ":" in name else name][1])
            if ":" in name:
                settings["AFFINITY_BENCH_PROBE"] = name
                settings["PYTHONPATH"] = os.pathsep.join([hook, str(common.ROOT)])
            label = name.replace(":", "-")
            uri = stack.enter_context(sqlite_store(stores, label))
            port, process = stack.enter_context(
                served(
                    artifact,
                    uri,
                    label,
                    stores / "logs",
                    workers=1,
                    cpus=str(cpu),
                    settings=settings,
                )
            )
            servers[name] = port, process.pid

        def load(name: str, seconds: float) -> Any:
            port = servers[name][0]
            spec = LoadSpec(
                target=f"grpc://127.0.0.1:{port}/{RECOMMEND}",
                payloads=bodies,
                duration=seconds,
                concurrency=args.concurrency,
                processes=args.client_processes,
            )
            return run_load(spec)

        for name in args.variants:
            load(name, 2.0)  # warm-up: first requests, the recorder's tables
        for round_ in range(args.rounds):
            for name in args.variants:
                pid = servers[name][1]
                start = common.cpu_seconds(pid)
                result = load(name, args.duration / args.rounds)
                spent[name] += common.cpu_seconds(pid) - start
                answered[name] += result.ok
            log(f"round {round_ + 1}/{args.rounds} done")
    per_request = {n: spent[n] / max(1, answered[n]) * 1e6 for n in args.variants}
    seconds = args.duration
    rows = []
    for name in args.variants:
        added = per_request[name] - per_request["off"]
        if ":" in name:
            quiet_added = quiet[name]
        elif name == "off":
            quiet_added = 0.0
        else:
            quiet_added = quiet[name] - quiet["off"]
        rows.append(
            {
                "variant": name,
                "rps": answered[name] / seconds,
                "cpu_us_per_request": per_request[name],
                "added_us": added,
                "quiet_us": quiet[name],
                "quiet_added_us": quiet_added,
                "ratio": added / quiet_added if name != "off" and quiet_added > 0 else None,
            }
        )
    report["rows"] = rows
    return report


def render(report: dict[str, Any]) -> str:
    lines = [
        f"`{report['command']}` (one worker pinned to CPU {report['cpu']}, closed loop "
        f"c={report['concurrency']}, {report['rounds']} alternating slices)",
        "",
        "| variant | req/s | worker CPU us / request | added over off | quiet cost us "
        "| quiet added | added / quiet |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else ""
        added = f"{row['added_us']:+.1f}" if row["variant"] != "off" else ""
        lines.append(
            f"| {row['variant']} | {row['rps']:,.0f} | {row['cpu_us_per_request']:.1f} | {added} "
            f"| {row['quiet_us']:.1f} | {row['quiet_added_us']:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_cpu", description=__doc__)
    common.add_model_options(parser)
    parser.add_argument(
        "--variants",
        type=lambda s: s.split(","),
        default=["off", "boost", "promotion", "python:1500", "scan:1000", "spin:1000"],
        help="off (required), rule variants of bench.rules, probes python:N, scan:N, spin:N "
        "(scan-nogil:N, spin-nogil:N release the GIL)",
    )
    parser.add_argument("--cpu", type=int, default=(os.cpu_count() or 1) - 1)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=24.0, help="measured seconds per row")
    parser.add_argument("--rounds", type=int, default=3, help="alternating slices per row")
    parser.add_argument("--requests", type=int, default=2000, help="distinct users in the mix")
    parser.add_argument("--client-processes", type=int, default=1)
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "bench.worker_cpu", *given])
    report = measure(args, command)
    print(render(report))
    print(f"\n{command}")
    common.write_json(Path(args.results) / "worker-cpu.json", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
