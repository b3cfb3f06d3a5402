"""Approximate search (models/ann.py) against the exact search, side by side in one process.

Synthetic low-rank factors: ``--dims`` (64) factors drawn from a Gaussian whose spectrum
decays as ``i ** -decay`` (a few directions carry most of the taste, as in fitted factors),
item lengths spread log-normally (``--spread``: the sigma of log |v|; the exact search prunes
more the wider lengths spread), users from the same distribution. Each user has 20 seen items
(excluded from their lists); the catalog has 10 categories, two item types and 5% unavailable
items. Everything runs in one process, in-process threads standing in for the gRPC server's
(the pipeline call is what a ``Recommend`` costs beyond the transport), BLAS pinned to one
thread as the server pins it.

Two modes:

- **serving** (the default): the exact pipeline and one pipeline per ``--kinds`` over the same
  model. First recall@10 of each against the exact lists (``--check-users`` known users, k=10,
  seen items excluded; also with a type filter of half the catalog and a category filter of a
  tenth), then ``--clients`` threads in a closed loop, ``--rounds`` interleaved slices of
  ``--duration`` seconds per target (exact, hnsw, ivf, exact, ...) so that background load falls
  on every target alike: requests/s, p50 and p99 per target, and each one's throughput over the
  exact search's.
- **memory** (``--memory``): builds the first of ``--kinds`` over ``--items`` items, writes the
  artifact, and loads it in a fresh process the way a server worker does
  (``service.loader.load_directory``): build and tune seconds, index bytes, the worker's
  resident memory and load time.
- **gRPC** (``--grpc``): builds the first of ``--kinds``, writes the artifact and serves it
  twice with ``affinity serve`` (one worker each, pinned to the last CPU as the other serving
  benchmarks pin theirs): with the index, and with ``--ann false`` (the exact search). Known
  users' ``Recommend`` (k=10) at each of ``--concurrency`` closed-loop clients (separate
  processes, :mod:`bench.loadgen`), the two servers taking turns in ``--rounds`` slices:
  requests/s, p50 and p99 through the real transport, thread pool and in-flight limit.

Prints Markdown tables, a JSON summary (``--json``) and the command::

    python -m bench.ann --items 1000000
    python -m bench.ann --items 3000000 --memory --kinds ivf
    python -m bench.ann --items 1000000 --grpc --kinds hnsw
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from bench.common import ROOT, log
from models import ann
from models.artifact import ItemCatalog, ModelBundle, save_artifact
from models.factorization import ALS
from models.ranking import ItemFilter, ListKind, ListRequest, RankingPipeline
from models.vocabulary import Vocabulary

CATEGORIES = tuple(f"c{i}" for i in range(10))


# ----------------------------------------------------------------- the data
def low_rank_factors(
    n: int, basis: np.ndarray, spread: float, seed: int, chunk: int = 1 << 18
) -> np.ndarray:
    """``n`` rows ``z @ basis`` (z standard normal), scaled to log-normal lengths."""
    out = np.empty((n, basis.shape[1]), dtype=np.float32)
    for start in range(0, n, chunk):
        rng = np.random.default_rng([seed, start])
        m = min(chunk, n - start)
        rows = rng.standard_normal((m, len(basis)), dtype=np.float32) @ basis
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        rows *= np.exp(spread * rng.standard_normal((m, 1))).astype(np.float32)
        out[start : start + m] = rows
    return out


def make_bundle(items: int, users: int, dims: int, spread: float, decay: float) -> ModelBundle:
    """An ALS model of synthetic factors with its catalog, seen items and popularity."""
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.standard_normal((dims, dims)))
    basis = ((np.arange(1, dims + 1) ** -decay)[:, None] * rotation.T).astype(np.float32)
    item_factors = low_rank_factors(items, basis, spread, seed=1)
    user_factors = low_rank_factors(users, basis, 0.0, seed=2)
    model = ALS.from_arrays(
        {"factors": dims},
        {
            "user_factors": user_factors,
            "item_factors": item_factors,
            "_shape": np.array([users, items]),
        },
    )
    rows = np.repeat(np.arange(users), 20)
    seen = sp.csr_matrix(
        (np.ones(len(rows), np.float32), (rows, rng.integers(0, items, size=len(rows)))),
        shape=(users, items),
    )
    seen.sum_duplicates()
    catalog = ItemCatalog(
        item_type=rng.choice(np.array(["content", "product"]), size=items),
        category=rng.choice(np.array(CATEGORIES), size=items),
        title=np.full(items, "", dtype="<U1"),
        available=rng.random(items) > 0.05,
    )
    return ModelBundle(
        model=model,
        users=Vocabulary(np.char.add("u", np.arange(users).astype(str))),
        items=Vocabulary(np.char.add("i", np.arange(items).astype(str))),
        seen=seen,
        catalog=catalog,
        popularity=rng.random(items).astype(np.float32),
        trending=rng.random(items).astype(np.float32),
    )


def _params(kind: str, args: argparse.Namespace) -> ann.AnnParams:
    return ann.AnnParams(kind=kind, storage=args.storage)  # type: ignore[arg-type]


# ------------------------------------------------------------------ serving
def recall_check(
    exact: RankingPipeline, other: RankingPipeline, users: np.ndarray, flt: ItemFilter
) -> dict[str, float]:
    """Recall@10 of ``other``'s lists against ``exact``'s, and the share of identical lists."""
    recalls, same = [], 0
    for user in users.tolist():
        request = ListRequest(ListKind.USER, 10, user=user, item_filter=flt)
        want, got = exact.rank(request).ids, other.rank(request).ids
        recalls.append(len(np.intersect1d(want, got)) / max(1, len(want)))
        same += bool(np.array_equal(want, got))
    return {"recall_at_10": float(np.mean(recalls)), "identical": same / len(users)}


def load_slice(
    pipeline: RankingPipeline, users: np.ndarray, clients: int, duration: float
) -> tuple[list[float], int]:
    """``clients`` threads asking for known users' lists for ``duration`` seconds (closed
    loop); the latencies and the number of lists made."""
    stop = time.perf_counter() + duration
    latencies: list[list[float]] = [[] for _ in range(clients)]

    def client(slot: int) -> None:
        mine = users[slot::clients].tolist()
        out = latencies[slot]
        i = 0
        while True:
            start = time.perf_counter()
            if start >= stop:
                return
            pipeline.rank(ListRequest(ListKind.USER, 10, user=mine[i % len(mine)]))
            out.append(time.perf_counter() - start)
            i += 1

    threads = [threading.Thread(target=client, args=(s,)) for s in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [x for part in latencies for x in part]
    return flat, len(flat)


def serving(args: argparse.Namespace) -> dict[str, Any]:
    log(f"generating {args.items:,} items x {args.dims} factors, {args.users:,} users")
    bundle = make_bundle(args.items, args.users, args.dims, args.spread, args.decay)
    model = bundle.model
    assert isinstance(model, ALS)
    started = time.perf_counter()
    exact = RankingPipeline.from_bundle(bundle)
    targets: dict[str, RankingPipeline] = {"exact": exact}
    builds: dict[str, Any] = {"exact": {"index_seconds": time.perf_counter() - started}}
    for kind in args.kinds:
        log(f"building {kind}")
        index, report = ann.build(
            model.item_factors, _params(kind, args), query_vectors=model.user_factors[:2000]
        )
        arrays = index.to_arrays()
        del index
        served = ModelBundle(**{**bundle.__dict__, "ann": arrays})
        targets[kind] = RankingPipeline.from_bundle(served)  # faiss reads the bytes, as a server
        builds[kind] = {**report.to_json(), "index_bytes": int(arrays["index"].nbytes)}
        del arrays, served
        log(f"  {json.dumps(builds[kind])}")
    rng = np.random.default_rng(3)
    check = rng.choice(args.users, size=min(args.check_users, args.users), replace=False)
    filters = {
        "none": ItemFilter(),
        "type (1/2)": ItemFilter.of(item_types=["product"]),
        "category (1/10)": ItemFilter.of(categories=[CATEGORIES[0]]),
    }
    quality: dict[str, dict[str, Any]] = {}
    for kind in args.kinds:
        quality[kind] = {}
        for name, flt in filters.items():
            quality[kind][name] = recall_check(exact, targets[kind], check, flt)
        log(f"  {kind} against exact: {json.dumps(quality[kind])}")
    load_users = rng.permutation(args.users)
    for pipeline in targets.values():  # warm: first calls, caches of the filters
        load_slice(pipeline, load_users, args.clients, 0.3)
    times: dict[str, list[float]] = {name: [] for name in targets}
    counts = dict.fromkeys(targets, 0)
    for round_ in range(args.rounds):
        for name, pipeline in targets.items():
            got, made = load_slice(pipeline, load_users, args.clients, args.duration)
            times[name] += got
            counts[name] += made
            log(f"  round {round_ + 1} {name}: {made / args.duration:,.0f} lists/s")
    load: dict[str, dict[str, float]] = {}
    for name in targets:
        ms = np.asarray(times[name]) * 1e3
        load[name] = {
            "lists_per_second": counts[name] / (args.duration * args.rounds),
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
        }
    for name in targets:
        load[name]["throughput_vs_exact"] = (
            load[name]["lists_per_second"] / load["exact"]["lists_per_second"]
        )
    return {"builds": builds, "quality": quality, "load": load}


def render_serving(result: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"{args.items:,} items x {args.dims} factors (spread {args.spread}, decay "
        f"{args.decay}), {args.users:,} users; {args.clients} client threads, "
        f"{args.rounds} x {args.duration:g} s per target",
        "",
        "| target | build s | tune s | effort | index MB | recall@10 | identical | "
        "recall@10, type 1/2 | recall@10, category 1/10 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in args.kinds:
        b, q = result["builds"][kind], result["quality"][kind]
        lines.append(
            f"| {kind} {b['params']} | {b['build_seconds']:.1f} | {b['tune_seconds']:.1f} | "
            f"{b['effort']} | {b['index_bytes'] / 2**20:,.0f} | "
            f"{q['none']['recall_at_10']:.4f} | {q['none']['identical']:.3f} | "
            f"{q['type (1/2)']['recall_at_10']:.4f} | {q['category (1/10)']['recall_at_10']:.4f} |"
        )
    lines += [
        "",
        "| target | lists/s | p50 ms | p99 ms | throughput / exact |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in result["load"].items():
        lines.append(
            f"| {name} | {row['lists_per_second']:,.0f} | {row['p50_ms']:.3f} | "
            f"{row['p99_ms']:.3f} | {row['throughput_vs_exact']:.2f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------- memory
WORKER_PROBE = r"""
import json, resource, sys, time
from threadpoolctl import threadpool_limits
threadpool_limits(1)
from pathlib import Path
from service.loader import ModelMeta, load_directory

def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) / 1024

def rollup():
    values = {}
    for line in open('/proc/self/smaps_rollup'):
        key, _, rest = line.partition(':')
        if key in ('Anonymous', 'Rss'):
            values[key] = int(rest.split()[0]) / 1024
    return values

path = Path(sys.argv[1])
meta = ModelMeta(name='affinity', version='1', run_id='', algorithm='', source_uri=str(path))
base = rss()
t = time.perf_counter(); loaded = load_directory(path, meta); seconds = time.perf_counter() - t
pipeline = loaded.pipeline
print(json.dumps({'load_seconds': seconds, 'rss_before_mib': base, 'rss_loaded_mib': rss(),
                  'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  'anonymous_mib': rollup()['Anonymous'],
                  'file_backed_mib': rollup()['Rss'] - rollup()['Anonymous'],
                  'exact_index_mib': pipeline._index.nbytes / 2**20,
                  'has_ann': pipeline._ann is not None}))
"""


def indexed_bundle(args: argparse.Namespace) -> tuple[ModelBundle, Any]:
    """The synthetic model with the first of ``--kinds`` built over it, as an artifact ships it
    (the bundle with the index's arrays), and the build report."""
    kind = args.kinds[0]
    log(f"generating {args.items:,} items x {args.dims} factors")
    bundle = make_bundle(args.items, args.users, args.dims, args.spread, args.decay)
    model = bundle.model
    assert isinstance(model, ALS)
    log(f"building {kind}")
    index, report = ann.build(
        model.item_factors, _params(kind, args), query_vectors=model.user_factors[:2000]
    )
    return ModelBundle(**{**bundle.__dict__, "ann": index.to_arrays()}), report


def memory(args: argparse.Namespace) -> dict[str, Any]:
    bundle, report = indexed_bundle(args)
    assert bundle.ann is not None
    build = {**report.to_json(), "index_bytes": int(bundle.ann["index"].nbytes)}
    log(f"  {json.dumps(build)}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "artifact"
        save_artifact(bundle, path)
        del bundle
        log("loading the artifact in a fresh process, as a server worker")
        out = subprocess.run(
            [sys.executable, "-c", WORKER_PROBE, str(path)],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        worker = json.loads(out.stdout.strip().splitlines()[-1])
        factor_mib = args.items * args.dims * 4 / 2**20
    return {"build": build, "worker": worker, "item_factors_mib": factor_mib}


def grpc_serving(args: argparse.Namespace) -> dict[str, Any]:
    """The artifact served with and without its index, measured through gRPC."""
    import os
    from contextlib import ExitStack

    from bench import common
    from bench.live import RECOMMEND, pinned_cpus, sqlite_store
    from bench.loadgen import alternate
    from protos.affinity.v1 import recommender_pb2 as pb

    kind = args.kinds[0]
    bundle, report = indexed_bundle(args)
    users = [str(u) for u in bundle.users.ids[: min(4000, args.users)]]
    bodies = [pb.RecommendRequest(user_id=u, k=10).SerializeToString() for u in users]
    cpus = pinned_cpus(1)
    result: dict[str, Any] = {"build": report.to_json(), "cpus": cpus, "results": []}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp, ExitStack() as stack:
        path = Path(tmp) / "artifact"
        save_artifact(bundle, path)
        del bundle
        ports = {}
        for label, flag in (("exact", "false"), (kind, "true")):
            port = common.free_port()
            uri = stack.enter_context(sqlite_store(Path(tmp), label))
            command = [str(common.BIN / "affinity"), "serve", "--model", str(path)]
            command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
            command += ["--poll-seconds", "0", "--log-level", "WARNING", "--events-uri", uri]
            command += ["--cpus", cpus, "--ann", flag]
            env = {**os.environ, "PYTHONPATH": str(common.ROOT)}
            log(f"starting the {label} server (loads the {args.items:,}-item artifact)")
            stack.enter_context(
                common.running(
                    command, common.grpc_ready(port), env=env, log_path=Path(tmp) / f"{label}.log"
                )
            )
            ports[label] = port
        targets = {label: f"grpc://127.0.0.1:{port}/{RECOMMEND}" for label, port in ports.items()}
        for c in args.concurrency:
            for r in alternate(
                targets,
                bodies,
                concurrency=c,
                duration=args.duration * args.rounds,
                rounds=args.rounds,
            ):
                log(f"{r.label} c={c}: {r.rps:,.0f} req/s p50 {r.p50_ms:.2f} p99 {r.p99_ms:.2f}")
                result["results"].append(r.to_json())
    return result


def render_grpc(result: dict[str, Any], args: argparse.Namespace) -> str:
    rows = result["results"]
    exact = {r["concurrency"]: r["rps"] for r in rows if r["label"] == "exact"}
    lines = [
        f"{args.items:,} items x {args.dims} factors, {args.users:,} users; one worker per "
        f"server pinned to CPU {result['cpus']}; {args.rounds} alternating slices of "
        f"{args.duration:g} s per row",
        "",
        "| server | clients | req/s | p50 ms | p99 ms | throughput / exact |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r["concurrency"]
        lines.append(
            f"| {r['label']} | {c} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['rps'] / exact[c]:.2f} |"
        )
    return "\n".join(lines)


def render_memory(result: dict[str, Any], args: argparse.Namespace) -> str:
    b, w = result["build"], result["worker"]
    return "\n".join(
        [
            f"{args.items:,} items x {args.dims} factors, {args.users:,} users, "
            f"{args.kinds[0]} {b['params']}",
            "",
            "| build s | tune s | effort | recall@10 (tuning) | index MiB | item factors MiB | "
            "exact index MiB | worker RSS MiB (anonymous + file) | worker peak MiB | load s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {b['build_seconds']:.1f} | {b['tune_seconds']:.1f} | {b['effort']} | "
            f"{b['recall_at_10']} | {b['index_bytes'] / 2**20:,.0f} | "
            f"{result['item_factors_mib']:,.0f} | {w['exact_index_mib']:,.0f} | "
            f"{w['rss_loaded_mib']:,.0f} ({w['anonymous_mib']:,.0f} + "
            f"{w['file_backed_mib']:,.0f}) | {w['peak_rss_mib']:,.0f} | {w['load_seconds']:.1f} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ann", description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--dims", type=int, default=64)
    parser.add_argument("--spread", type=float, default=0.3, help="sigma of log item length")
    parser.add_argument("--decay", type=float, default=0.5, help="spectrum i ** -decay")
    parser.add_argument("--kinds", default="hnsw,ivf", help="index kinds, comma-separated")
    parser.add_argument("--storage", default="sq8", choices=ann.STORAGES, help="IVF storage")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per slice")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--check-users", type=int, default=1000)
    parser.add_argument("--memory", action="store_true", help="build, save and load one index")
    parser.add_argument(
        "--grpc", action="store_true", help="serve the artifact with and without the index"
    )
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 8],
        help="--grpc: closed-loop clients per row (default 1,8)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where the artifact goes")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    threadpool_limits(1, "blas")  # as a server worker; faiss pins its own OpenMP per thread
    started = time.perf_counter()
    if args.memory:
        result = memory(args)
        table = render_memory(result, args)
    elif args.grpc:
        result = grpc_serving(args)
        table = render_grpc(result, args)
    else:
        result = serving(args)
        table = render_serving(result, args)
    result["seconds"] = time.perf_counter() - started
    command = shlex.join(["python", "-m", "bench.ann", *(argv or sys.argv[1:])])
    print(table)
    print(f"\ncommand: {command}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, **result}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
