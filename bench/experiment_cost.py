"""What a live experiment costs ``Recommend``: throughput and memory, with and without, in one run.

Three ``affinity serve`` of the same champion side by side, each with ``--workers`` workers
pinned to the same CPUs (as ``bench.rules`` and ``bench.live``) and over its own SQLite event
store, with the live view and response recording on as by default:

- ``none``: no experiment;
- ``ab``: a running experiment of two live arms, 50% each: the champion and a challenger (a
  second copy of the model, loaded from another directory: two resident models per worker);
- ``shadow``: the champion for everyone, and the challenger as a shadow arm that ranks every
  request again and records its list.

The experiments are stored in each server's event store before it starts, as
``affinity experiment start`` would. The request mix is ``--requests`` distinct known users
(k=10, shuffled), sent by :mod:`bench.loadgen` (closed loop) to each server in alternating
slices (none, ab, shadow, none, ...), so background load on a shared machine falls on all alike;
rows are pooled over ``--rounds``. Before measuring, every answer of ``ab`` is checked to name
its arm, and the arms' shares over the mix are counted. Memory: the resident set of each
server's process after the load (one model against two).

Prints Markdown tables and the command, and writes ``bench/results/experiment-cost.json``::

    python -m bench.experiment_cost
    python -m bench.experiment_cost --size tiny --duration 4 --rounds 2 --concurrency 1
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from bench.common import log
from bench.live import RECOMMEND, model_artifact, pinned_cpus, sqlite_store, user_ids
from bench.loadgen import LoadResult, alternate_rows, format_table

VARIANTS = ("none", "ab", "shadow")


def store_experiment(uri: str, variant: str, challenger: Path) -> None:
    """Write ``variant``'s running experiment into the event store at ``uri``."""
    from service.events import EventStore
    from service.experiments import ExperimentBook, parse_config

    if variant == "none":
        return
    arms: list[dict[str, Any]] = [{"name": "champion", "model": "champion"}]
    if variant == "ab":
        arms[0]["share"] = 0.5
        arms.append({"name": "challenger", "model": str(challenger), "share": 0.5})
    else:
        arms[0]["share"] = 1.0
        arms.append({"name": "challenger", "model": str(challenger), "shadow": True})
    with EventStore.open(uri) as store:
        ExperimentBook(store).start(parse_config({"name": f"bench-{variant}", "arms": arms}))


@contextmanager
def serving(
    artifact: Path, uri: str, label: str, logs: Path, *, workers: int, cpus: str
) -> Iterator[tuple[int, Any]]:
    """``affinity serve`` of ``artifact`` over the event store ``uri``; yields port and process."""
    port = common.free_port()
    command = [str(common.BIN / "affinity"), "serve", "--model", str(artifact)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    command += ["--poll-seconds", "0", "--log-level", "WARNING", "--events-uri", uri]
    command += ["--cpus", cpus]
    env = {**os.environ, "PYTHONPATH": str(common.ROOT)}
    logs.mkdir(parents=True, exist_ok=True)
    with common.running(
        command, common.grpc_ready(port), env=env, log_path=logs / f"serve-{label}.log"
    ) as proc:
        yield port, proc


def check_arms(port: int, users: list[str], variant: str) -> dict[str, Any]:
    """Every answer names the experiment's arm (``ab``) or none (``none``, ``shadow``'s live arm
    is the champion): the experiment is known to run before it is measured."""
    import grpc

    from protos.affinity.v1 import recommender_pb2 as pb
    from protos.affinity.v1 import recommender_pb2_grpc as pb_grpc

    arms: Counter[str] = Counter()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.RecommenderStub(channel)
        for user in users:
            reply = stub.Recommend(pb.RecommendRequest(user_id=user, k=10), timeout=10)
            arms[reply.arm or "-"] += 1
    expected = {"none": {"-"}, "ab": {"champion", "challenger"}, "shadow": {"champion"}}[variant]
    if set(arms) != expected:
        raise SystemExit(f"{variant}: answers name arms {dict(arms)}, expected {expected}")
    return dict(arms)


def resident_mib(proc: Any) -> float:
    """The largest resident set among the server's processes (its worker), in MiB."""
    sizes = [common.memory_of(pid).get("Rss", 0.0) for pid in common.process_tree(proc.pid)]
    return max(sizes, default=0.0)


def cost(args: argparse.Namespace, command: str) -> dict[str, Any]:
    from protos.affinity.v1 import recommender_pb2 as pb

    artifact = model_artifact(args)
    workdir = Path(args.workdir) / "experiments"
    challenger = workdir / "challenger"
    if challenger.exists():
        shutil.rmtree(challenger)
    shutil.copytree(artifact, challenger)  # the same bytes, loaded again: a second model
    users, _ = user_ids(artifact)
    rng = np.random.default_rng(args.seed)
    mix = rng.choice(users, size=min(args.requests, len(users)), replace=False).tolist()
    bodies = [pb.RecommendRequest(user_id=u, k=10).SerializeToString() for u in mix]
    cpus = args.cpus or pinned_cpus(args.workers)
    report: dict[str, Any] = {
        "command": command,
        "size": args.size,
        "artifact": str(artifact),
        "workers": args.workers,
        "cpus": cpus,
        "requests_in_mix": len(mix),
        "duration_s": args.duration,
        "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
    }
    results: list[LoadResult] = []
    with ExitStack() as stack:
        servers: dict[str, tuple[int, Any]] = {}
        for variant in args.variants:
            uri = stack.enter_context(sqlite_store(workdir, f"experiment-{variant}"))
            store_experiment(uri, variant, challenger)
            servers[variant] = stack.enter_context(
                serving(artifact, uri, variant, workdir / "logs", workers=args.workers, cpus=cpus)
            )
        report["arms"] = {
            v: check_arms(port, mix[: args.check_users], v) for v, (port, _) in servers.items()
        }
        log(f"arms over {args.check_users} users: {report['arms']}")
        targets = {v: f"grpc://127.0.0.1:{port}/{RECOMMEND}" for v, (port, _) in servers.items()}
        results += alternate_rows(
            targets,
            bodies,
            concurrencies=args.concurrency,
            duration=args.duration,
            rounds=args.rounds,
            processes=args.client_processes,
            log=log,
        )
        report["resident_mib"] = {v: resident_mib(proc) for v, (_, proc) in servers.items()}
    report["results"] = [r.to_json() for r in results]
    report["ratios"] = {
        f"{v} / none, c={c}": _rps(results, c, v) / _rps(results, c, "none")
        for c in args.concurrency
        for v in args.variants
        if v != "none" and "none" in args.variants
    }
    print(
        f"\n`{command}` ({args.size} model, {args.workers} worker(s) pinned to CPU {cpus}, "
        f"{len(mix)} users, {args.rounds} alternating slices of "
        f"{args.duration / args.rounds:g} s per row)\n"
    )
    print(format_table(results))
    print("| ratio | req/s |\n|---|---:|")
    print("".join(f"| {k} | {v:.3f} |\n" for k, v in report["ratios"].items()))
    print("| server | resident MiB after the load |\n|---|---:|")
    print("".join(f"| {k} | {v:,.0f} |\n" for k, v in report["resident_mib"].items()))
    out = Path(args.results) / "experiment-cost.json"
    common.write_json(out, report)
    log(f"wrote {out}")
    return report


def _rps(results: list[LoadResult], c: int, label: str) -> float:
    return next(r.rps for r in results if r.label == label and r.concurrency == c)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiment_cost", description=__doc__)
    common.add_model_options(parser)
    parser.add_argument("--cpus", help="affinity serve --cpus (default: the last --workers CPUs)")
    parser.add_argument("--workers", type=int, default=1, help="server workers (default 1)")
    common.add_load_options(parser)
    parser.add_argument("--check-users", type=int, default=200, help="users checked for arms")
    parser.add_argument(
        "--variants",
        type=lambda s: s.split(","),
        default=list(VARIANTS),
        help=f"servers measured side by side, from {', '.join(VARIANTS)}",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown --variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "bench.experiment_cost", *given])
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    cost(args, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
