"""Serving benchmark: Affinity ``Recommend`` vs the transport floor vs ``mlflow models serve``.

For one generated catalog (``--size small``: 20k items / 200k users, ``large``: 200k items / 1M
users; ALS, 64 factors, registered as ``affinity@champion`` in ``<workdir>/mlflow.db``) it runs,
in one go and with the same load generator (:mod:`bench.loadgen`, separate processes):

1. the floor (:mod:`bench.floor`): same gRPC stack and worker count, a fixed response;
2. ``affinity serve`` of the champion: known users (seen excluded, k=10), unknown users folded in
   from 50 recent items, ``SimilarItems``; resident memory per worker; an open-loop run;
3. ``mlflow models serve`` of the same registered model (pyfunc) over REST ``/invocations``;

With ``--compare-with DIR`` (another checkout of Affinity, e.g. ``git worktree add DIR HEAD~1``)
the server of that checkout answers the same requests as ``baseline``, so a change is measured
against the code before it in the same run (ratio ``throughput_vs_baseline``).

All servers run for the whole benchmark and each row is pooled from ``--rounds`` interleaved
slices (floor, Affinity, MLflow, floor, ...), so background load on a shared machine falls on
every target alike and the ratios stay meaningful. Plus, in-process: agreement of the served
lists with a plain float32 ``item_factors @ user`` ranking (recall@10 and exact-list rate), and
model load time / peak memory during a swap. Prints Markdown tables and writes everything to
``<workdir>/<size>/serving-w<workers>.json`` (and ``.md``). Run ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from bench.common import SIZES, log
from bench.loadgen import WARMUP_SECONDS, LoadResult, LoadSpec, format_table, merge, run_load
from service.cpus import available_cpus, format_cpu_list

RECOMMEND = "affinity.v1.Recommender/Recommend"
SIMILAR = "affinity.v1.Recommender/SimilarItems"


# ------------------------------------------------------------------ payloads
def payloads(artifact: Path, n: int = 4000, seed: int = 0) -> dict[str, list[bytes]]:
    """Serialized requests: known users, fold-in users with 50 recent items, similar items, REST."""
    from protos.affinity.v1 import recommender_pb2 as pb

    with np.load(artifact / "vocab.npz", allow_pickle=False) as vocab:
        users, items = vocab["user_ids"], vocab["item_ids"]
    rng = np.random.default_rng(seed)
    known = rng.choice(users, size=n).tolist()
    recent = [rng.choice(items, size=50, replace=False).tolist() for _ in range(n // 4)]
    similar = rng.choice(items, size=n).tolist()
    return {
        "known": [pb.RecommendRequest(user_id=u, k=10).SerializeToString() for u in known],
        "fold_in": [
            pb.RecommendRequest(user_id=f"new-{i}", k=10, recent_item_ids=r).SerializeToString()
            for i, r in enumerate(recent)
        ],
        "similar": [
            pb.SimilarItemsRequest(item_ids=[i], k=10).SerializeToString() for i in similar
        ],
        "rest": [
            json.dumps(
                {"dataframe_split": {"columns": ["user_id"], "data": [[u]]}, "params": {"k": 10}}
            ).encode()
            for u in known
        ],
    }


# ------------------------------------------------------------------ in-process checks
def agreement(artifact: Path, n_users: int = 1000, k: int = 10) -> dict[str, float]:
    """Served lists (pipeline, called from 8 threads) vs a naive per-user float32 ranking."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    from models.artifact import load_artifact
    from models.ranking import RankingPipeline

    with threadpool_limits(1):
        bundle = load_artifact(artifact)
        pipeline = RankingPipeline.from_bundle(bundle)
        model: Any = bundle.model
        rng = np.random.default_rng(1)
        users = rng.choice(len(bundle.users), size=min(n_users, len(bundle.users)), replace=False)
        ids = bundle.users.decode(users)
        with ThreadPoolExecutor(8) as pool:
            served = list(pool.map(lambda u: pipeline.recommend(u, k).indices, ids))
        recall, exact = [], []
        seen = bundle.seen
        for u, got in zip(users, served, strict=True):
            scores = model.item_factors @ model.user_factors[u]
            scores[seen.indices[seen.indptr[u] : seen.indptr[u + 1]]] = -np.inf
            scores[~pipeline.candidate_mask(pipeline_filter())] = -np.inf
            # Exact float32 top k: a wide partition, then (score desc, id asc) among those.
            wide = np.argpartition(-scores, 4 * k)[: 4 * k]
            want = wide[np.lexsort((wide, -scores[wide]))][:k]
            recall.append(len(set(got.tolist()) & set(want.tolist())) / k)
            exact.append(bool(np.array_equal(got, want)))
        scanned = _scanned_fraction(pipeline, users, k)
    return {
        "users": len(users),
        "recall_at_10": float(np.mean(recall)),
        "exact_list_rate": float(np.mean(exact)),
        **scanned,
    }


def _scanned_fraction(pipeline: Any, users: np.ndarray, k: int) -> dict[str, float]:
    """Share of the catalog the norm-ordered index scores exactly per request (percentiles)."""
    from models.search import Query

    index = pipeline._index
    if index is None:
        return {}
    seen = pipeline.bundle.seen
    shares = []
    for u in users:
        blocked = index.positions(seen.indices[seen.indptr[u] : seen.indptr[u + 1]])
        vector = pipeline.bundle.model.user_factors[u]
        shares.append(index.search([Query(vector, k, blocked)])[0].scanned / index.n_items)
    p50, p90, p99 = np.percentile(shares, [50, 90, 99])
    return {"scanned_p50": float(p50), "scanned_p90": float(p90), "scanned_p99": float(p99)}


def pipeline_filter() -> Any:
    from models.ranking import ItemFilter

    return ItemFilter()


LOAD_PROBE = """
import json, resource, sys, time
from threadpoolctl import threadpool_limits
threadpool_limits(1)
from pathlib import Path
from service.loader import ModelMeta, load_directory

def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) / 1024

path = Path(sys.argv[1])
meta = ModelMeta(name='affinity', version='1', run_id='', algorithm='', source_uri=str(path))
base = rss()
t = time.perf_counter(); first = load_directory(path, meta); t1 = time.perf_counter() - t
after_one = rss()
# A swap: the new model is loaded while the old one still serves.
t = time.perf_counter(); second = load_directory(path, meta); t2 = time.perf_counter() - t
after_two = rss()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({'load_seconds': t1, 'swap_load_seconds': t2, 'rss_before_mib': base,
                  'rss_one_model_mib': after_one, 'rss_during_swap_mib': after_two,
                  'peak_rss_mib': peak}))
"""


def load_probe(artifact: Path) -> dict[str, float]:
    """Load time (verify, load, warm-up) and memory of one load and of a swap, in a new process."""
    out = subprocess.run(
        [sys.executable, "-c", LOAD_PROBE, str(artifact)],
        check=True,
        capture_output=True,
        text=True,
        cwd=common.ROOT,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# ------------------------------------------------------------------ load runs
def measure(
    label: str,
    target: str,
    bodies: list[bytes],
    args: argparse.Namespace,
    *,
    concurrency: int = 1,
    rate: float | None = None,
    duration: float | None = None,
) -> LoadResult:
    spec = LoadSpec(
        target=target,
        payloads=bodies,
        duration=duration or args.duration,
        concurrency=concurrency,
        rate=rate,
        processes=args.client_processes,
    )
    return run_load(spec, label)


def describe(result: LoadResult) -> str:
    load = f"c={result.concurrency}" if result.mode == "closed" else f"{result.rate:g}/s"
    return (
        f"{result.label} {load}: {result.rps:,.0f} req/s p50 {result.p50_ms:.2f} "
        f"p99 {result.p99_ms:.2f} errors {result.errors or 0}"
    )


def worker_memory(proc: subprocess.Popen[bytes]) -> list[dict[str, float]]:
    """Memory of the processes that serve: the workers under a supervisor, or the one server."""
    tree = common.process_tree(proc.pid)
    # The supervisor (and the `affinity` launcher) hold no model; workers are the leaves.
    leaves = [pid for pid in tree if common.process_tree(pid) == [pid]]
    return [{"pid": pid, **common.memory_of(pid)} for pid in leaves]


def run(args: argparse.Namespace) -> dict[str, Any]:
    catalog = SIZES[args.size]
    workdir = Path(args.workdir) / catalog.name
    workdir.mkdir(parents=True, exist_ok=True)
    data = common.generate(catalog, workdir)
    if not (workdir / "artifact" / "manifest.json").is_file():
        log(f"fitting and registering ALS (64 factors) on {catalog.name}")
        common.register_quick(data, workdir)
    artifact = common.champion_artifact(workdir)
    bodies = payloads(artifact)
    env = common.tracking_env(workdir)
    report: dict[str, Any] = {
        "catalog": catalog.__dict__,
        "workers": args.workers,
        "mlflow_workers": args.mlflow_workers,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
    }
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    ports = {name: common.free_port() for name in ("floor", "affinity", "mlflow")}
    # Pinned unless told otherwise: the last `workers` CPUs, one per worker (what `--cpus auto`
    # does when the workers cover the machine; with 1 worker on 2 CPUs it needs the list).
    cpus = args.cpus or format_cpu_list((available_cpus() or [])[-args.workers :]) or "auto"
    report["cpus"] = cpus

    def floor_command(port: int, cpus: str) -> list[str]:
        command = [sys.executable, "-m", "bench.floor", "--port", str(port)]
        return [*command, "--workers", str(args.workers), "--cpus", cpus]

    def serve_command(port: int, cpus: str) -> list[str]:
        command = [str(common.BIN / "affinity"), "serve", "--model", str(artifact)]
        command += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(args.workers)]
        return [*command, "--poll-seconds", "0", "--log-level", args.log_level, "--cpus", cpus]

    def baseline_command(tree: Path, port: int, cpus: str) -> list[str]:
        # Run from the other checkout's folder so that its own packages are imported; its
        # command module is affinity.cli, or training.cli in trees from before that move.
        module = "affinity" if (tree / "affinity" / "cli.py").is_file() else "training.cli"
        command = [sys.executable, "-m", module, "serve", "--model", str(artifact)]
        command += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(args.workers)]
        return [*command, "--poll-seconds", "0", "--log-level", args.log_level, "--cpus", cpus]

    floor_cmd = floor_command(ports["floor"], cpus)
    serve_cmd = serve_command(ports["affinity"], cpus)
    mlflow_cmd = [str(common.BIN / "mlflow"), "models", "serve", "-m"]
    mlflow_cmd += [f"models:/{common.MODEL_NAME}@champion", "--env-manager", "local"]
    mlflow_cmd += ["-h", "127.0.0.1", "-p", str(ports["mlflow"]), "-w", str(args.mlflow_workers)]
    grpc = "grpc://127.0.0.1:{}/{}"
    with ExitStack() as stack:
        # All servers run for the whole benchmark and are measured in interleaved slices, so
        # background load on a shared machine hits each of them alike.
        stack.enter_context(
            common.running(
                floor_cmd,
                common.grpc_ready(ports["floor"]),
                env=None,
                log_path=logs / "floor.log",
            )
        )
        affinity = stack.enter_context(
            common.running(
                serve_cmd,
                common.grpc_ready(ports["affinity"]),
                env=env,
                log_path=logs / "serve.log",
            )
        )
        report["memory_idle"] = worker_memory(affinity)
        targets: list[tuple[str, str, list[bytes]]] = [
            ("floor", grpc.format(ports["floor"], RECOMMEND), bodies["known"]),
            ("affinity", grpc.format(ports["affinity"], RECOMMEND), bodies["known"]),
            ("affinity fold-in 50", grpc.format(ports["affinity"], RECOMMEND), bodies["fold_in"]),
            ("affinity similar", grpc.format(ports["affinity"], SIMILAR), bodies["similar"]),
        ]
        if args.unpinned:
            # The same two servers with --cpus off, to show what pinning does in the same run.
            for name, command in (("floor", floor_command), ("affinity", serve_command)):
                port = common.free_port()
                stack.enter_context(
                    common.running(
                        command(port, "off"),
                        common.grpc_ready(port),
                        env=env if name == "affinity" else None,
                        log_path=logs / f"{name}-unpinned.log",
                    )
                )
                targets.append((f"{name} unpinned", grpc.format(port, RECOMMEND), bodies["known"]))
        if args.compare_with is not None:
            port = common.free_port()
            stack.enter_context(
                common.running(
                    baseline_command(args.compare_with.resolve(), port, cpus),
                    common.grpc_ready(port),
                    env=env,
                    log_path=logs / "baseline.log",
                    cwd=args.compare_with.resolve(),
                )
            )
            targets += [
                ("baseline", grpc.format(port, RECOMMEND), bodies["known"]),
                ("baseline fold-in 50", grpc.format(port, RECOMMEND), bodies["fold_in"]),
                ("baseline similar", grpc.format(port, SIMILAR), bodies["similar"]),
            ]
        if not args.skip_mlflow:
            stack.enter_context(
                common.running(
                    mlflow_cmd,
                    common.http_ready(f"http://127.0.0.1:{ports['mlflow']}/ping"),
                    env=env,
                    log_path=logs / "mlflow.log",
                )
            )
            url = f"http://127.0.0.1:{ports['mlflow']}/invocations"
            targets.append(("mlflow serve", url, bodies["rest"]))
        slice_seconds = args.duration / args.rounds + WARMUP_SECONDS
        results: list[LoadResult] = []
        for c in args.concurrency:
            slices: dict[str, list[LoadResult]] = {label: [] for label, _, _ in targets}
            for _ in range(args.rounds):
                for label, target, payload in targets:
                    side = label.startswith(("affinity ", "baseline ")) or label.endswith(
                        " unpinned"
                    )
                    if side and c not in (1, max(args.concurrency)):
                        continue
                    slices[label].append(
                        measure(label, target, payload, args, concurrency=c, duration=slice_seconds)
                    )
            for parts in slices.values():
                if parts:
                    results.append(merge(parts))
                    log(describe(results[-1]))
        report["memory_loaded"] = worker_memory(affinity)
        best = max(r.rps for r in results if r.label == "affinity")
        rate = max(10.0, round(best * 0.7, -1))
        for label, target, payload in targets[:2]:
            results.append(measure(label, target, payload, args, rate=rate))
            log(describe(results[-1]))

    log("checking served lists against the plain float32 ranking")
    report["agreement"] = agreement(artifact)
    log("measuring load and swap")
    report["load"] = load_probe(artifact)
    report["results"] = [r.to_json() for r in results]
    report["ratios"] = ratios(results)
    return report


def ratios(results: list[LoadResult]) -> dict[str, float]:
    """The issue's targets as numbers (``nan`` where a run is missing)."""

    def pick(label: str, c: int) -> LoadResult | None:
        for r in results:
            if r.label == label and r.mode == "closed" and r.concurrency == c:
                return r
        return None

    def best(label: str) -> float:
        return max(
            (r.rps for r in results if r.label == label and r.mode == "closed"),
            default=float("nan"),
        )

    nan = float("nan")
    out: dict[str, float] = {}
    floor1, aff1 = pick("floor", 1), pick("affinity", 1)
    out["throughput_vs_floor"] = best("affinity") / best("floor")
    if floor1 and aff1:
        out["p50_c1_minus_floor_ms"] = aff1.p50_ms - floor1.p50_ms
    aff8 = pick("affinity", 8)
    out["p99_c8_ms"] = aff8.p99_ms if aff8 else nan
    out["throughput_vs_mlflow"] = best("affinity") / best("mlflow serve")
    ml8 = pick("mlflow serve", 8)
    out["p99_c8_mlflow_ms"] = ml8.p99_ms if ml8 else nan
    fold1 = pick("affinity fold-in 50", 1)
    if fold1 and aff1:
        out["fold_in_p50_vs_known"] = fold1.p50_ms / aff1.p50_ms
    if any(r.label == "baseline" for r in results):
        out["throughput_vs_baseline"] = best("affinity") / best("baseline")
        for kind in ("fold-in 50", "similar"):
            mine, theirs = pick(f"affinity {kind}", 8), pick(f"baseline {kind}", 8)
            if mine and theirs:
                out[f"{kind.split()[0]}_throughput_c8_vs_baseline"] = mine.rps / theirs.rps
    if any(r.label == "affinity unpinned" for r in results):
        out["unpinned_throughput_vs_unpinned_floor"] = best("affinity unpinned") / best(
            "floor unpinned"
        )
        out["pinned_vs_unpinned_affinity"] = best("affinity") / best("affinity unpinned")
        out["throughput_vs_mlflow_unpinned"] = best("affinity unpinned") / best("mlflow serve")
    return out


def render(report: dict[str, Any]) -> str:
    results = [LoadResult(**r) for r in report["results"]]
    cat = report["catalog"]
    lines = [
        f"### {cat['items']:,} items / {cat['users']:,} users "
        f"({report['workers']} worker(s), mlflow models serve -w "
        f"{report.get('mlflow_workers', report['workers'])}, {report['duration_s']:g} s per row)",
        "",
        format_table(results),
        "| ratio | value |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    agree = report["agreement"]
    load = report["load"]
    lines += [
        "",
        f"Agreement with plain float32 ranking over {agree['users']} users: recall@10 "
        f"{agree['recall_at_10']:.4f}, identical lists {agree['exact_list_rate']:.4f}; share of "
        "the catalog scored per request (float32 or int8 screen) p50 "
        f"{agree.get('scanned_p50', 1):.1%}, p90 "
        f"{agree.get('scanned_p90', 1):.1%}, p99 {agree.get('scanned_p99', 1):.1%}.",
        f"Load (verify + load + warm-up): {load['load_seconds']:.2f} s; RSS one model "
        f"{load['rss_one_model_mib']:.0f} MiB, during a swap {load['rss_during_swap_mib']:.0f} MiB "
        f"(peak {load['peak_rss_mib']:.0f} MiB).",
        "",
        "| worker pid | RSS MiB | PSS MiB | anonymous MiB |",
        "|---|---:|---:|---:|",
    ]
    for m in report.get("memory_loaded", []):
        lines.append(
            f"| {m['pid']} | {m.get('Rss', 0):.0f} | {m.get('Pss', 0):.0f} "
            f"| {m.get('Anonymous', 0):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--workdir", default="/tmp/affinity-bench")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8]
    )
    parser.add_argument("--client-processes", type=int, default=1)
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved slices per target and concurrency"
    )
    parser.add_argument("--log-level", default="WARNING", help="affinity serve --log-level")
    parser.add_argument("--skip-mlflow", action="store_true")
    parser.add_argument(
        "--mlflow-workers",
        type=int,
        help="mlflow models serve -w (default: --workers). Above 1, uvicorn passes its workers a "
        "socket without TCP_NODELAY (uvicorn issue #3149) and every keep-alive request waits "
        "about 44 ms for a delayed ACK, so 1 is MLflow's faster configuration on Linux",
    )
    parser.add_argument(
        "--cpus",
        help="--cpus of affinity serve and of the floor (default: the last --workers CPUs, "
        "one per worker)",
    )
    parser.add_argument(
        "--compare-with",
        type=Path,
        metavar="DIR",
        help="also serve the same model from this other checkout (label 'baseline'), side by side",
    )
    parser.add_argument(
        "--unpinned",
        action="store_true",
        help="also measure the floor and Affinity with --cpus off, side by side",
    )
    args = parser.parse_args(argv)
    if args.mlflow_workers is None:
        args.mlflow_workers = args.workers
    started = time.time()
    report = run(args)
    report["wall_seconds"] = time.time() - started
    out = Path(args.workdir) / args.size / f"serving-w{args.workers}.json"
    common.write_json(out, report)
    text = render(report)
    (out.with_suffix(".md")).write_text(text)
    print(text)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
