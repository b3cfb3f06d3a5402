"""Ranking rules benchmark: what the rules cost ``Recommend``, on against off, in one run.

``cost``: two (or more) ``affinity serve`` of the same model side by side, each with
``--workers`` workers pinned to the same CPUs as ``bench.live``'s cost (the last ``--workers``
CPUs) and over its own SQLite event store, with the live view and response recording on as by
default. ``on`` sets a realistic rule mix as the server's defaults (the
shipped defaults are all off): a category cap of 3, maximal marginal relevance 0.2, one boost
(the largest category, x1.5) and a 10% promotion (the second largest category), through
``AFFINITY_RULES_*``; ``off`` sets none. The request mix is ``--requests`` distinct known users
(k=10, shuffled), sent by :mod:`bench.loadgen` (closed loop) to each server in alternating
slices (on, off, on, off, ...), so background load on a shared machine falls on both alike;
rows are pooled over ``--rounds``. ``--variants`` adds servers with one rule each (``cap``,
``mmr``, ``boost``, ``promotion``), to see which costs what. Before measuring, the share of the
lists that differ between ``on`` and ``off`` and the reasons in the ``on`` lists are checked
over gRPC, so the rules are known to run.

An in-process breakdown times ``pipeline.recommend`` (as the server builds the pipeline) per call
for a known user without rules, with each rule alone and with the mix.

Prints Markdown tables and the command, and writes ``bench/results/rules-cost.json``::

    python -m bench.rules
    python -m bench.rules --variants on,off,cap,mmr,boost,promotion
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from bench.common import SIZES, log
from bench.live import (
    RECOMMEND,
    RESULTS,
    model_artifact,
    pinned_cpus,
    serving,
    sqlite_store,
    user_ids,
)
from bench.loadgen import WARMUP_SECONDS, LoadResult, LoadSpec, format_table, merge, run_load

CAP, MMR, BOOST, PROMOTION_SHARE = 3, 0.2, 1.5, 0.1
"""The rule mix of ``on``: what a product team might switch on first."""


def catalog_categories(artifact: Path) -> list[str]:
    """The artifact's categories, largest first (none: the tiny synthetic catalog)."""
    with np.load(artifact / "items.npz", allow_pickle=False) as arrays:
        named = [str(c) for c in arrays["category"].tolist() if str(c)]
    return [name for name, _ in Counter(named).most_common()]


def rule_filters(artifact: Path) -> tuple[str, str]:
    """The boost's and the promotion's filters: the two largest categories, or item types for
    a catalog without categories."""
    names = catalog_categories(artifact)
    if len(names) >= 2:
        return f"category={names[0]}", f"category={names[1]}"
    return "item_type=product", "item_type=content"


def variants(artifact: Path) -> dict[str, tuple[str, dict[str, str]]]:
    """Label and ``AFFINITY_RULES_*`` settings of each server the benchmark can start."""
    boost, promotion = rule_filters(artifact)
    cap = {"AFFINITY_RULES_MAX_PER_CATEGORY": str(CAP)}
    mmr = {"AFFINITY_RULES_MMR": str(MMR)}
    boosts = {"AFFINITY_RULES_BOOSTS": f"{boost}:{BOOST}"}
    promote = {"AFFINITY_RULES_PROMOTION": f"{promotion}:{PROMOTION_SHARE}"}
    return {
        "on": (
            f"on: cap {CAP} + mmr {MMR} + boost + {PROMOTION_SHARE:.0%} promotion",
            {**cap, **mmr, **boosts, **promote},
        ),
        "off": ("off: no rules", {}),
        "cap": (f"cap {CAP} only", cap),
        "mmr": (f"mmr {MMR} only", mmr),
        "boost": (f"boost x{BOOST} only", boosts),
        "promotion": (f"{PROMOTION_SHARE:.0%} promotion only", promote),
    }


def check_lists(on: int, off: int, users: list[str]) -> dict[str, Any]:
    """Over gRPC: the share of lists that differ between ``on`` and ``off``, the reasons in
    the ``on`` lists, and the largest number of items of one category in an ``on`` list."""
    import grpc

    from protos.affinity.v1 import recommender_pb2 as pb
    from protos.affinity.v1 import recommender_pb2_grpc as pb_grpc

    reasons: Counter[str] = Counter()
    differ, largest = 0, 0
    with (
        grpc.insecure_channel(f"127.0.0.1:{on}") as a,
        grpc.insecure_channel(f"127.0.0.1:{off}") as b,
    ):
        stub_on, stub_off = pb_grpc.RecommenderStub(a), pb_grpc.RecommenderStub(b)
        for user in users:
            request = pb.RecommendRequest(user_id=user, k=10)
            got = stub_on.Recommend(request, timeout=10)
            plain = stub_off.Recommend(request, timeout=10)
            differ += [i.item_id for i in got.items] != [i.item_id for i in plain.items]
            reasons.update(pb.Reason.Name(i.reason) for i in got.items)
            named = Counter(i.category for i in got.items if i.category)
            largest = max(largest, max(named.values(), default=0))
    return {
        "lists_differ": differ / max(1, len(users)),
        "reasons": dict(reasons),
        "most_of_one_category": largest,
        "users": len(users),
    }


def inprocess_costs(artifact: Path, users: list[str], n: int = 1000) -> dict[str, float]:
    """Microseconds per ``pipeline.recommend`` (k=10) in this process, without rules, with each
    rule alone and with the mix, on the pipeline the server builds."""
    from threadpoolctl import threadpool_limits

    from models.rules import Diversity, Rules
    from service.config import ServeSettings
    from service.loader import ModelMeta, load_directory
    from service.rules import parse_boosts, parse_promotion

    boost, promotion = rule_filters(artifact)
    boosts = parse_boosts(f"{boost}:{BOOST}")
    promote = parse_promotion(f"{promotion}:{PROMOTION_SHARE}")
    cases = {
        "no rules": None,
        f"cap {CAP}": Rules(diversity=Diversity(CAP)),
        f"mmr {MMR}": Rules(diversity=Diversity(0, MMR)),
        f"boost x{BOOST}": Rules(boosts=boosts),
        f"{PROMOTION_SHARE:.0%} promotion": Rules(promotion=promote),
        "the mix (on)": Rules(diversity=Diversity(CAP, MMR), boosts=boosts, promotion=promote),
    }
    weight = float(ServeSettings.model_fields["dislike_weight"].default)
    meta = ModelMeta(name="bench", version="1", run_id="", algorithm="", source_uri=str(artifact))
    chosen = users[:n]
    out: dict[str, float] = {}
    with threadpool_limits(1):
        pipeline = load_directory(artifact, meta, dislike_weight=weight).pipeline
        calls: dict[str, Callable[[str], Any]] = {
            name: (lambda u, r=rules: pipeline.recommend(u, 10, rules=r))
            for name, rules in cases.items()
        }
        for _ in range(2):  # the second pass is kept: caches warm, kernels compiled
            for name, call in calls.items():
                started = time.perf_counter()
                for user in chosen:
                    call(user)
                out[name] = 1e6 * (time.perf_counter() - started) / len(chosen)
    return out


def cost(args: argparse.Namespace, command: str) -> dict[str, Any]:
    from protos.affinity.v1 import recommender_pb2 as pb

    artifact = model_artifact(args)
    known = variants(artifact)
    unknown = sorted(set(args.variants) - set(known))
    if unknown:
        raise SystemExit(f"unknown --variants {', '.join(unknown)}; choose from {', '.join(known)}")
    users, _ = user_ids(artifact)
    rng = np.random.default_rng(args.seed)
    mix = rng.choice(users, size=min(args.requests, len(users)), replace=False).tolist()
    bodies = [pb.RecommendRequest(user_id=u, k=10).SerializeToString() for u in mix]
    cpus = args.cpus or pinned_cpus(args.workers)
    stores = Path(args.workdir) / "rules"
    target = "grpc://127.0.0.1:{}/" + RECOMMEND
    report: dict[str, Any] = {
        "command": command,
        "size": args.size,
        "artifact": str(artifact),
        "workers": args.workers,
        "cpus": cpus,
        "variants": {known[v][0]: known[v][1] for v in args.variants},
        "requests_in_mix": len(mix),
        "duration_s": args.duration,
        "rounds": args.rounds,
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
    }
    ports: dict[str, int] = {}
    results: list[LoadResult] = []
    with ExitStack() as stack:
        for variant in args.variants:
            settings = known[variant][1]
            uri = stack.enter_context(sqlite_store(stores, f"rules-{variant}"))
            ports[variant] = stack.enter_context(
                serving(
                    artifact,
                    uri,
                    f"rules-{variant}",
                    stores / "logs",
                    workers=args.workers,
                    cpus=cpus,
                    settings=settings,
                )
            )
        if "on" in ports and "off" in ports:
            report["check"] = check_lists(ports["on"], ports["off"], mix[:200])
            log(f"lists on / off: {report['check']}")
        slice_seconds = args.duration / args.rounds + WARMUP_SECONDS
        for c in args.concurrency:
            slices: dict[str, list[LoadResult]] = {v: [] for v in args.variants}
            for _ in range(args.rounds):
                for variant in args.variants:
                    spec = LoadSpec(
                        target=target.format(ports[variant]),
                        payloads=bodies,
                        duration=slice_seconds,
                        concurrency=c,
                        processes=args.client_processes,
                    )
                    slices[variant].append(run_load(spec, known[variant][0]))
            for parts in slices.values():
                results.append(merge(parts))
                r = results[-1]
                log(f"{r.label} c={c}: {r.rps:,.0f} req/s p50 {r.p50_ms:.2f} p99 {r.p99_ms:.2f}")
    report["results"] = [r.to_json() for r in results]
    off = known["off"][0]
    report["ratios"] = {
        f"{known[v][0]} / off, c={c}": _ratio(results, c, known[v][0], off)
        for c in args.concurrency
        for v in args.variants
        if v != "off" and "off" in args.variants
    }
    if not args.skip_inprocess:
        log("in-process costs of the rules")
        report["inprocess_us"] = inprocess_costs(artifact, mix)
    print(
        f"\n`{command}` ({args.size} model, {args.workers} worker(s) pinned to CPU {cpus}, "
        f"{len(mix)} users, {args.rounds} alternating slices of "
        f"{args.duration / args.rounds:g} s per row)\n"
    )
    print(format_table(results))
    print("| ratio | req/s |\n|---|---:|")
    print("".join(f"| {k} | {v:.3f} |\n" for k, v in report["ratios"].items()))
    if "check" in report:
        check = report["check"]
        print(
            f"Lists that differ on / off: {check['lists_differ']:.0%} of {check['users']}; "
            f"reasons in the `on` lists: {check['reasons']}; most items of one category in "
            f"an `on` list: {check['most_of_one_category']}.\n"
        )
    if "inprocess_us" in report:
        print("| in-process `pipeline.recommend`, k=10 | us per call |\n|---|---:|")
        print("".join(f"| {k} | {v:.1f} |\n" for k, v in report["inprocess_us"].items()))
    out = Path(args.results) / "rules-cost.json"
    common.write_json(out, report)
    log(f"wrote {out}")
    return report


def _ratio(results: list[LoadResult], c: int, on: str, off: str) -> float:
    def rps(label: str) -> float:
        return next(r.rps for r in results if r.label == label and r.concurrency == c)

    return rps(on) / rps(off)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rules", description=__doc__)
    parser.add_argument("benchmark", nargs="?", default="cost", choices=["cost"])
    parser.add_argument(
        "--size",
        choices=["tiny", *sorted(SIZES)],
        default="small",
        help="tiny: a 400-user synthetic model built here (smoke runs; no categories, so no "
        "cap); small/large: the serving benchmark's catalog and registered model",
    )
    parser.add_argument("--workdir", default="/tmp/affinity-bench")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON file goes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus", help="affinity serve --cpus (default: the last --workers CPUs)")
    parser.add_argument("--workers", type=int, default=1, help="server workers (default 1)")
    parser.add_argument(
        "--duration", type=float, default=12.0, help="measured seconds per row (split in slices)"
    )
    parser.add_argument("--rounds", type=int, default=4, help="alternating slices per row")
    parser.add_argument("--requests", type=int, default=4000, help="distinct users in the mix")
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 8],
        help="closed-loop concurrencies (default 1,8)",
    )
    parser.add_argument("--client-processes", type=int, default=1)
    parser.add_argument(
        "--variants",
        type=lambda s: s.split(","),
        default=["on", "off"],
        help="servers measured side by side, from on, off, cap, mmr, boost, promotion",
    )
    parser.add_argument(
        "--skip-inprocess", action="store_true", help="skip the in-process breakdown"
    )
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "bench.rules", *given])
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    cost(args, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
