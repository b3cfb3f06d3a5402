"""In-process cost of one request: the servicer and the pipeline without gRPC around them.

Loads the champion artifact of a generated catalog (the one ``bench.serving`` fits and registers;
run that first), pins BLAS to one thread as the server does, and times
``RecommenderServicer.Recommend`` on parsed requests, ``RankingPipeline.recommend`` for known
users and for unknown users folded in from 50 recent items, and one search in the norm-ordered
index. Prints microseconds per call and the command.

Run ``python -m bench.handler --size small|large``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import SIZES, log


def per_call_us(call: Callable[[int], Any], n: int) -> float:
    """Mean microseconds of ``call(i)`` over ``n`` calls, after ``n // 10`` warm-up calls."""
    for i in range(max(1, n // 10)):
        call(i)
    start = time.perf_counter()
    for i in range(n):
        call(i)
    return (time.perf_counter() - start) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.handler", description=__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--workdir", default="/tmp/affinity-bench")
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args(argv)

    from threadpoolctl import threadpool_limits

    from bench.common import champion_artifact
    from bench.serving import payloads
    from models.search import Query
    from protos.affinity.v1 import recommender_pb2 as pb
    from service.config import ServeSettings
    from service.loader import ModelHolder, ModelLoader
    from service.servicer import RecommenderServicer

    workdir = Path(args.workdir) / SIZES[args.size].name
    if not (workdir / "artifact" / "manifest.json").is_file():
        print(f"no model under {workdir}: run python -m bench.serving --size {args.size} first")
        return 2
    artifact = champion_artifact(workdir)
    threadpool_limits(1)
    holder = ModelHolder()
    ModelLoader(ServeSettings(model_uri=str(artifact), poll_seconds=0), holder).load_initial()
    pipeline = holder.get().pipeline
    servicer = RecommenderServicer(holder)
    bodies = payloads(artifact)
    known = [pb.RecommendRequest.FromString(b) for b in bodies["known"]]
    fold = [pb.RecommendRequest.FromString(b) for b in bodies["fold_in"]]
    recent = [list(r.recent_item_ids) for r in fold]

    class Context:  # what the servicer asks of a gRPC context on the success path
        def time_remaining(self) -> None:
            return None

    context = Context()
    n, m = len(known), len(fold)
    index = pipeline._index
    seen = pipeline.bundle.seen
    users = [pipeline.bundle.users.get(r.user_id) for r in known]
    queries = [
        Query(
            pipeline.bundle.model.user_factors[u],
            10,
            index.positions(seen.indices[seen.indptr[u] : seen.indptr[u + 1]]),
            pipeline._disallowed(_no_filter()),
        )
        for u in users
    ]
    rows = {
        "servicer Recommend (known user)": per_call_us(
            lambda i: servicer.Recommend(known[i % n], context), args.calls
        ),
        "pipeline recommend (known user)": per_call_us(
            lambda i: pipeline.recommend(known[i % n].user_id, 10), args.calls
        ),
        "pipeline recommend (fold-in, 50 items)": per_call_us(
            lambda i: pipeline.recommend(fold[i % m].user_id, 10, recent_item_ids=recent[i % m]),
            args.calls,
        ),
        "index search (one query)": per_call_us(
            lambda i: index.search([queries[i % n]]), args.calls
        ),
    }
    log(f"{SIZES[args.size].name}: {len(pipeline.bundle.items):,} items, {args.calls} calls each")
    print("| call | us per call |\n|---|---:|")
    for name, value in rows.items():
        print(f"| {name} | {value:.1f} |")
    print(f"\ncommand: python -m bench.handler --size {args.size} --calls {args.calls}")
    return 0


def _no_filter() -> Any:
    from models.ranking import ItemFilter

    return ItemFilter()


if __name__ == "__main__":
    sys.exit(main())
