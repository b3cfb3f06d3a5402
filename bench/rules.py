"""Ranking rules benchmark: what the rules cost ``Recommend``, on against off, in one run.

``cost``: two (or more) ``affinity serve`` of the same model side by side, each with
``--workers`` workers pinned to the same CPUs as ``bench.live``'s cost (the last ``--workers``
CPUs) and over its own SQLite event store, with the live view and response recording on as by
default. ``on`` sets a realistic rule mix as the server's defaults (the
shipped defaults are all off): a category cap of 3, maximal marginal relevance 0.2, one boost
(the largest category, x1.5) and a 10% promotion (the second largest category), through
``AFFINITY_RULES_*``; ``off`` switches every rule off explicitly and ``defaults`` sets
nothing (the shipped defaults). The request mix is ``--requests`` distinct known users
(k=10, shuffled), sent by :mod:`bench.loadgen` (closed loop) to each server in alternating
slices (on, off, on, off, ...), so background load on a shared machine falls on both alike;
rows are pooled over ``--rounds``. ``--variants`` adds servers with one rule each (``cap``,
``mmr``, ``boost``, ``promotion``), to see which costs what, and ``defaults``. Before
measuring, the share of the lists that differ between ``on`` and ``off`` and the reasons in the
``on`` lists are checked over gRPC, so the rules are known to run (and, with ``defaults``, the
share that differ between ``defaults`` and ``off``).

An in-process breakdown times ``pipeline.recommend`` (as the server builds the pipeline) per call
for a known user without rules, with each rule alone and with the mix: every case for one user,
then the next, three times over; per user the fastest of the three, averaged over the users.
That is the rules' own work with the user's data warm in the cache: a loaded worker pays two to
three times it (``bench.worker_cpu`` measures what a worker spends per request).

``--compare-with DIR`` (another checkout, e.g. the commit before a change: ``git worktree add
DIR HEAD``) runs that checkout's servers beside these (the same variants, in the same alternating
slices) and its pipeline beside this one in the in-process table, so a change to the rules' cost
is measured against the code before it in one run.

Prints Markdown tables and the command, and writes ``bench/results/rules-cost.json``::

    python -m bench.rules
    python -m bench.rules --variants on,off,cap,mmr,boost,promotion
    python -m bench.rules --compare-with ../affinity-before
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from bench import common
from bench.common import log
from bench.live import (
    RECOMMEND,
    model_artifact,
    pinned_cpus,
    serving,
    sqlite_store,
    user_ids,
)
from bench.loadgen import LoadResult, alternate_rows, format_table

CAP, MMR, BOOST, PROMOTION_SHARE = 3, 0.2, 1.5, 0.1
"""The rule mix of ``on``: what a product team might switch on first."""

RULES_OFF = {
    "AFFINITY_RULES_MAX_PER_CATEGORY": "0",
    "AFFINITY_RULES_MMR": "0",
    "AFFINITY_RULES_BOOSTS": "",
    "AFFINITY_RULES_PROMOTION": "",
    "AFFINITY_RULES_EXPLORE_SHARE": "0",
    "AFFINITY_RULES_ROTATION_RATE": "0",
}
"""``off``: every rule switched off explicitly, whatever the shipped defaults are; ``defaults``
sets nothing (the defaults as shipped), so ``defaults`` / ``off`` is the issue's "default rules
on, against off" and shows what any default switched on would cost."""


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
        "off": ("off: no rules", dict(RULES_OFF)),
        "defaults": ("defaults: the shipped rule defaults", {}),
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


def rule_cases(models: ModuleType, artifact: Path) -> dict[str, Any]:
    """The in-process table's rules (None: no rules), built from ``models`` (this checkout's
    package, or another's: see :func:`baseline_models`)."""
    ranking = importlib.import_module(f"{models.__name__}.ranking")
    rules = importlib.import_module(f"{models.__name__}.rules")

    def item_filter(text: str) -> Any:  # "category=x" or "item_type=x", as rule_filters says
        key, value = text.split("=", 1)
        if key == "category":
            return ranking.ItemFilter.of(categories=[value])
        return ranking.ItemFilter.of(item_types=[value])

    boost, promotion = rule_filters(artifact)
    boosts = (rules.Boost(item_filter(boost), BOOST),)
    promote = rules.Promotion(item_filter(promotion), PROMOTION_SHARE)
    diversity, every = rules.Diversity, rules.Rules
    return {
        "no rules": None,
        f"cap {CAP}": every(diversity=diversity(CAP)),
        f"mmr {MMR}": every(diversity=diversity(0, MMR)),
        f"boost x{BOOST}": every(boosts=boosts),
        f"{PROMOTION_SHARE:.0%} promotion": every(promotion=promote),
        "the mix (on)": every(diversity=diversity(CAP, MMR), boosts=boosts, promotion=promote),
    }


def baseline_models(tree: Path) -> ModuleType:
    """The ``models`` package of another checkout ``tree``, imported as ``baseline_models``
    beside this one's (its modules import one another relatively)."""
    name = "baseline_models"
    if name in sys.modules:
        return sys.modules[name]
    import numba.core.config

    init = tree / "models" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[str(init.parent)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # Compiled kernels are cached under their module's name: kept apart from the files that
    # tree's own servers load as `models`, which could not import `baseline_models`.
    before = os.environ.get("NUMBA_CACHE_DIR")
    os.environ["NUMBA_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / "affinity-baseline-numba")
    numba.core.config.reload_config()
    try:
        spec.loader.exec_module(module)
        for part in ("kernels", "ranking", "rules"):  # every module that compiles, now
            importlib.import_module(f"{name}.{part}")
    finally:
        if before is None:
            os.environ.pop("NUMBA_CACHE_DIR")
        else:
            os.environ["NUMBA_CACHE_DIR"] = before
        numba.core.config.reload_config()
    return module


def pipeline_of(models: ModuleType, artifact: Path) -> Any:
    """The pipeline the server builds over ``artifact`` (the served dislike weight), from
    ``models``, warmed up as the server warms it."""
    from service.config import ServeSettings

    weight = float(ServeSettings.model_fields["dislike_weight"].default)
    load = importlib.import_module(f"{models.__name__}.artifact").load_artifact
    ranking = importlib.import_module(f"{models.__name__}.ranking")
    pipeline = ranking.RankingPipeline.from_bundle(load(artifact), dislike_weight=weight)
    users, items = pipeline.vocabularies()
    pipeline.recommend(users.id(0), 10)
    pipeline.recommend("\x00warm-up", 10, recent_item_ids=[items.id(0)])
    return pipeline


def inprocess_costs(
    artifact: Path,
    users: list[str],
    n: int = 1000,
    rounds: int = 3,
    baseline: Path | None = None,
) -> dict[str, dict[str, float]]:
    """Microseconds per ``pipeline.recommend`` (k=10) in this process, without rules, with each
    rule alone and with the mix, on the pipeline the server builds (and with ``baseline``, on
    that checkout's pipeline too): every call of every case (and tree) for one user, then the
    next user, ``rounds`` times; per user the fastest of the rounds (load from elsewhere on a
    shared machine only slows calls down), averaged over the users."""
    from threadpoolctl import threadpool_limits

    import models

    trees = {"this checkout": models}
    if baseline is not None:
        trees["baseline"] = baseline_models(baseline)
    chosen = users[:n]
    out: dict[str, dict[str, float]] = {}
    with threadpool_limits(1):
        calls: dict[tuple[str, str], Callable[[str], Any]] = {}
        for tree, package in trees.items():
            pipeline = pipeline_of(package, artifact)
            for name, rules in rule_cases(package, artifact).items():
                calls[name, tree] = partial(pipeline.recommend, k=10, rules=rules)
        for call in calls.values():  # warm: kernels compiled, caches filled
            for user in chosen[:100]:
                call(user)
        took = {key: np.full((rounds, len(chosen)), np.inf) for key in calls}
        order = list(calls.items())
        for r in range(rounds):
            for i, user in enumerate(chosen):
                for key, call in order if r % 2 == 0 else order[::-1]:
                    started = time.perf_counter()
                    call(user)
                    took[key][r, i] = time.perf_counter() - started
        for (name, tree), seconds in took.items():
            out.setdefault(tree, {})[name] = float(1e6 * seconds.min(axis=0).mean())
    return out


@contextmanager
def baseline_serving(
    tree: Path,
    artifact: Path,
    uri: str,
    label: str,
    logs: Path,
    *,
    workers: int,
    cpus: str,
    settings: dict[str, str],
) -> Iterator[int]:
    """``affinity serve`` of another checkout ``tree`` (its own packages), as
    :func:`bench.live.serving` starts this one's; yields the port."""
    port = common.free_port()
    command = [sys.executable, "-m", "affinity", "serve", "--model", str(artifact)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    command += ["--poll-seconds", "0", "--log-level", "WARNING", "--events-uri", uri]
    command += ["--cpus", cpus]
    env = {**os.environ, "PYTHONPATH": str(tree), **settings}
    logs.mkdir(parents=True, exist_ok=True)
    with common.running(
        command,
        common.grpc_ready(port),
        env=env,
        log_path=logs / f"serve-{label}.log",
        cwd=tree,
    ):
        yield port


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
    # Each server: (variant, tree); the baseline's labels say so.
    trees = [None] if args.compare_with is None else [None, args.compare_with.resolve()]
    servers = [(v, tree) for tree in trees for v in args.variants]
    labels = {(v, tree): ("" if tree is None else "baseline ") + known[v][0] for v, tree in servers}
    if args.compare_with is not None:
        report["baseline"] = str(args.compare_with.resolve())
    ports: dict[tuple[str, Path | None], int] = {}
    results: list[LoadResult] = []
    with ExitStack() as stack:
        for variant, tree in servers:
            name = f"rules-{variant}" if tree is None else f"rules-baseline-{variant}"
            uri = stack.enter_context(sqlite_store(stores, name))
            options = {"workers": args.workers, "cpus": cpus, "settings": known[variant][1]}
            ports[variant, tree] = stack.enter_context(
                serving(artifact, uri, name, stores / "logs", **options)
                if tree is None
                else baseline_serving(tree, artifact, uri, name, stores / "logs", **options)
            )
        if ("on", None) in ports and ("off", None) in ports:
            report["check"] = check_lists(ports["on", None], ports["off", None], mix[:200])
            log(f"lists on / off: {report['check']}")
        if ("defaults", None) in ports and ("off", None) in ports:
            shipped = check_lists(ports["defaults", None], ports["off", None], mix[:200])
            report["check_defaults"] = shipped
            log(f"lists defaults / off: {shipped}")
        targets = {labels[server]: target.format(ports[server]) for server in servers}
        results += alternate_rows(
            targets,
            bodies,
            concurrencies=args.concurrency,
            duration=args.duration,
            rounds=args.rounds,
            processes=args.client_processes,
            log=log,
        )
    report["results"] = [r.to_json() for r in results]
    report["ratios"] = {
        f"{labels[v, tree]} / {labels['off', tree]}, c={c}": _ratio(
            results, c, labels[v, tree], labels["off", tree]
        )
        for c in args.concurrency
        for tree in trees
        for v in args.variants
        if v != "off" and "off" in args.variants
    }
    if not args.skip_inprocess:
        log("in-process costs of the rules")
        costs = inprocess_costs(
            artifact, mix, baseline=None if args.compare_with is None else trees[-1]
        )
        report["inprocess_us"] = costs["this checkout"]
        if "baseline" in costs:
            report["inprocess_us_baseline"] = costs["baseline"]
    print(
        f"\n`{command}` ({args.size} model, {args.workers} worker(s) pinned to CPU {cpus}, "
        f"{len(mix)} users, {args.rounds} alternating slices of "
        f"{args.duration / args.rounds:g} s per row)\n"
    )
    print(format_table(results))
    print("| ratio | req/s |\n|---|---:|")
    print("".join(f"| {k} | {v:.3f} |\n" for k, v in report["ratios"].items()))
    if "check_defaults" in report:
        print(
            f"Lists that differ defaults / off: "
            f"{report['check_defaults']['lists_differ']:.0%} of "
            f"{report['check_defaults']['users']} (0% while every shipped default is off).\n"
        )
    if "check" in report:
        check = report["check"]
        print(
            f"Lists that differ on / off: {check['lists_differ']:.0%} of {check['users']}; "
            f"reasons in the `on` lists: {check['reasons']}; most items of one category in "
            f"an `on` list: {check['most_of_one_category']}.\n"
        )
    if "inprocess_us" in report:
        table = {"this checkout": report["inprocess_us"]}
        if "inprocess_us_baseline" in report:
            table["baseline"] = report["inprocess_us_baseline"]
        columns = list(table)
        print(
            "| in-process `pipeline.recommend`, k=10, us per call | " + " | ".join(columns) + " |"
        )
        print("|---" + "|---:" * len(columns) + "|")
        for case in table[columns[0]]:
            print(f"| {case} | " + " | ".join(f"{table[t][case]:.1f}" for t in columns) + " |")
        print()
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
    common.add_model_options(
        parser,
        size_help="tiny: a 400-user synthetic model built here (smoke runs; no categories, so "
        "no cap); small/large: the serving benchmark's catalog and registered model",
    )
    parser.add_argument("--cpus", help="affinity serve --cpus (default: the last --workers CPUs)")
    parser.add_argument("--workers", type=int, default=1, help="server workers (default 1)")
    common.add_load_options(parser)
    parser.add_argument(
        "--variants",
        type=lambda s: s.split(","),
        default=["on", "off"],
        help="servers measured side by side, from on, off, defaults, cap, mmr, boost, promotion",
    )
    parser.add_argument(
        "--skip-inprocess", action="store_true", help="skip the in-process breakdown"
    )
    parser.add_argument(
        "--compare-with",
        type=Path,
        help="another checkout of Affinity (e.g. `git worktree add DIR HEAD`): its servers run "
        "beside these (same variants) and its pipeline beside this one in the in-process table, "
        "so a change is measured against the code before it in one run",
    )
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "bench.rules", *given])
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    cost(args, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
