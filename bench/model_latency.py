"""Per-list cost of each model on real data: what a request pays in the ranking pipeline.

The serving benchmark (:mod:`bench.serving`) measures ``affinity serve`` on a generated ALS
catalog; this one answers "what does model X cost per list on data like mine?" for the models
whose scoring differs (GF-CF's dense filter against its factored form above all). For one data
set and protocol it builds the training matrix as :mod:`bench.quality` does, fits each
``--model`` (``ALGO`` or ``ALGO:key=value,...``), and times, in process, with BLAS pinned
to one thread as the server's workers are:

- ``known``: a trained user's top ``--k`` with their training items excluded;
- ``fold-in``: the same user ranked as unknown from their training items (``recent``);
- ``similar``: the items most similar to one of that user's items.

Each is ``--requests`` calls over the same sampled users, interleaved model by model in
``--rounds`` slices so background load falls on every model alike. Prints a Markdown table (p50
and p99 in ms, the size of the model's arrays, fit seconds) and the command; with two models, the
ratio of the second's p50 to the first's. A model that refuses the data (over its memory budget)
gets a row with the reason::

    python -m bench.model_latency --model gfcf:form=dense --model gfcf:form=factored --model ease
    python -m bench.model_latency --dataset gowalla --protocol given --data-root /data --k 20
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from bench.quality import PROTOCOLS, _split, parse_fixed
from models.errors import ModelTooLargeError
from models.ranking import MISSING, ListKind, ListRequest, RankingPipeline
from models.ranking_metrics import item_popularity
from training.confidence import ConfidenceConfig, build_matrix
from training.fit import fit_model

KINDS = ("known", "fold-in", "similar")


@dataclass
class Row:
    label: str
    fit_seconds: float = 0.0
    megabytes: float = 0.0
    refused: str = ""
    pipeline: RankingPipeline | None = None
    times: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})


def parse_model(text: str) -> tuple[str, dict[str, Any]]:
    """``als`` or ``gfcf:form=dense,factors=128`` -> (algorithm, params)."""
    if ":" not in text:
        return text.strip(), {}
    return parse_fixed(text)


def _requests(seen: Any, users: np.ndarray, k: int) -> dict[str, list[ListRequest]]:
    made: dict[str, list[ListRequest]] = {kind: [] for kind in KINDS}
    for user in users:
        items = seen.indices[seen.indptr[user] : seen.indptr[user + 1]].astype(np.int64)
        made["known"].append(ListRequest(ListKind.USER, k, user=int(user)))
        made["fold-in"].append(ListRequest(ListKind.USER, k, user=MISSING, recent=items))
        made["similar"].append(ListRequest(ListKind.SIMILAR, k, items=items[:1]))
    return made


def _time(pipeline: RankingPipeline, requests: list[ListRequest], into: list[float]) -> None:
    for request in requests:
        start = time.perf_counter()
        pipeline.rank(request)
        into.append(time.perf_counter() - start)


def run(args: argparse.Namespace, say: Callable[[str], None] = print) -> list[Row]:
    spec = PROTOCOLS[args.protocol]
    parts = _split(args.dataset, spec, args.data_root, args.seed)
    train = build_matrix(parts.train_full, ConfidenceConfig())
    matrix = train.matrix
    popularity = item_popularity(matrix)
    say(
        f"{args.dataset} / {args.protocol}: {matrix.shape[0]:,} users, {matrix.shape[1]:,} "
        f"items, {matrix.nnz:,} training pairs"
    )
    rng = np.random.default_rng(args.seed)
    counts = np.diff(matrix.indptr)
    users = rng.choice(np.flatnonzero(counts > 0), size=min(args.requests, matrix.shape[0]))
    requests = _requests(matrix, users, args.k)
    rows: list[Row] = []
    for text in args.models:
        algorithm, params = parse_model(text)
        row = Row(label=text)
        start = time.perf_counter()
        try:
            model = fit_model(algorithm, params, matrix)
        except ModelTooLargeError as refused:
            row.refused = str(refused)
            say(f"{text}: refused: {refused}")
            rows.append(row)
            continue
        row.fit_seconds = time.perf_counter() - start
        row.megabytes = sum(a.nbytes for a in model.to_arrays().values()) / 1e6
        row.pipeline = RankingPipeline(model, seen=matrix, popularity=popularity)
        say(f"{text}: fitted in {row.fit_seconds:.1f}s, arrays {row.megabytes:,.0f} MB")
        rows.append(row)
    live = [row for row in rows if row.pipeline is not None]
    slices = np.array_split(np.arange(len(users)), args.rounds)
    with threadpool_limits(1, "blas"):
        for row in live:  # warm-up: first calls pay for lazy caches
            assert row.pipeline is not None
            for kind in KINDS:
                _time(row.pipeline, requests[kind][:5], [])
        for part in slices:
            for row in live:
                assert row.pipeline is not None
                for kind in KINDS:
                    _time(row.pipeline, [requests[kind][i] for i in part], row.times[kind])
    return rows


def table(rows: list[Row]) -> str:
    head = "| model | fit (s) | arrays (MB) | " + " | ".join(
        f"{kind} p50 / p99 (ms)" for kind in KINDS
    )
    lines = [head + " |", "|---|---:|---:|" + "---:|" * len(KINDS)]
    for row in rows:
        if row.refused:
            lines.append(f"| {row.label} | refused: {row.refused} |" + " |" * (len(KINDS) + 1))
            continue
        cells = []
        for kind in KINDS:
            ms = np.asarray(row.times[kind]) * 1e3
            cells.append(f"{np.percentile(ms, 50):.2f} / {np.percentile(ms, 99):.2f}")
        lines.append(
            f"| {row.label} | {row.fit_seconds:.1f} | {row.megabytes:,.0f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def ratios(rows: list[Row]) -> str:
    live = [row for row in rows if not row.refused]
    if len(live) < 2:
        return ""
    first, second = live[0], live[1]
    parts = []
    for kind in KINDS:
        a = np.percentile(first.times[kind], 50)
        b = np.percentile(second.times[kind], 50)
        parts.append(f"{kind} {b / a:.2f}x")
    return f"p50 of {second.label} against {first.label}: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-latest-small")
    parser.add_argument("--protocol", default="random-75-25", choices=sorted(PROTOCOLS))
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        help="ALGO or ALGO:key=value,... (repeat for each model; default: als and gfcf)",
    )
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    args.models = args.models or ["als", "gfcf"]
    rows = run(args)
    print()
    print(table(rows))
    note = ratios(rows)
    if note:
        print()
        print(note)
    print()
    given = sys.argv[1:] if argv is None else argv
    print("Command: `python -m bench.model_latency " + shlex.join(given) + "`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
