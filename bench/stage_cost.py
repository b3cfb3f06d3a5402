"""What stage-aware lists cost ``Recommend``, in-process, side by side.

The servicer's ``Recommend`` called directly (no gRPC: the part the stage strategies change),
BLAS pinned to one thread as in a server worker, over the serving benchmark's ``small`` model
(``--size tiny`` builds a 400-user model here instead), for ``--users`` known users, k=10:

- ``off``: no stage view (``AFFINITY_STAGE_STRATEGIES=off``, the default);
- ``on, no segments``: the view with an empty ``user_segments`` (every known user ``active``,
  plain personalized lists): what turning the feature on costs before any computation;
- ``on, segments``: the view with every user of the model given a stage drawn with
  ``--stage-mix`` (default: 3/7 active, 1/7 each at_risk, dormant, churned and new), the
  default strategies (``win_back`` for at_risk, dormant, churned);
- ``win_back only``: the same view, timed over the users whose stage gives them ``win_back``.

Each case runs ``--rounds`` passes over its users, alternating with the others; the best pass
per case is reported, in microseconds per call::

    python -m bench.stage_cost
    python -m bench.stage_cost --size tiny --users 300 --rounds 3
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from bench.common import SIZES, log
from bench.live import model_artifact, user_ids


class _Context:
    """The part of a gRPC context the servicer reads (no deadline)."""

    def time_remaining(self) -> None:
        return None


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from models.strategies import STAGE_CODES, StrategyConfig
    from protos.affinity.v1 import recommender_pb2 as pb
    from service.loader import ModelHolder, ModelMeta, load_directory
    from service.servicer import RecommenderServicer
    from service.stages import StageTable, StageView

    threadpool_limits(1)
    artifact = model_artifact(args)
    holder = ModelHolder()
    holder.swap(load_directory(artifact, ModelMeta("bench", "", "", "", str(artifact))))
    ids, _ = user_ids(artifact)
    rng = np.random.default_rng(args.seed)
    names = args.stage_mix.split(",")
    stages = rng.choice(names, size=len(ids))
    table = StageTable(
        ids.astype(object),
        np.array([STAGE_CODES[s] for s in stages], dtype=np.uint8),
        datetime.now(UTC),
    )
    config = StrategyConfig()
    with_segments = StageView(config)
    with_segments.table = table
    servicers = {
        "off": RecommenderServicer(holder),
        "on, no segments": RecommenderServicer(holder),
        "on, segments": RecommenderServicer(holder),
        "win_back only": RecommenderServicer(holder),
    }
    servicers["on, no segments"].stages = StageView(config)
    servicers["on, segments"].stages = with_segments
    servicers["win_back only"].stages = with_segments
    chosen = rng.choice(len(ids), size=min(args.users, len(ids)), replace=False)
    everyone = [pb.RecommendRequest(user_id=str(ids[i]), k=10) for i in chosen]
    win_back = [
        pb.RecommendRequest(user_id=str(ids[i]), k=10)
        for i in chosen
        if config.by_stage()[str(stages[i])] == "win_back"
    ]
    requests = {case: everyone for case in servicers}
    requests["win_back only"] = win_back
    context: Any = _Context()
    for case, servicer in servicers.items():  # warm: caches, compiled kernels
        for request in requests[case]:
            servicer.Recommend(request, context)
    best = {case: float("inf") for case in servicers}
    for _ in range(args.rounds):
        for case, servicer in servicers.items():
            started = time.perf_counter()
            for request in requests[case]:
                servicer.Recommend(request, context)
            spent = (time.perf_counter() - started) / max(len(requests[case]), 1) * 1e6
            best[case] = min(best[case], spent)
    log(", ".join(f"{case} {us:.1f} us" for case, us in best.items()))
    return {
        "us_per_call": best,
        "users": {case: len(r) for case, r in requests.items()},
        "stage_mix": names,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stage_cost", description=__doc__)
    parser.add_argument("--size", choices=["tiny", *sorted(SIZES)], default="small")
    parser.add_argument("--workdir", default="/tmp/affinity-bench")
    parser.add_argument("--users", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stage-mix",
        default="active,active,active,at_risk,dormant,churned,new",
        help="stages drawn uniformly from this list for the model's users",
    )
    args = parser.parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    result = measure(args)
    command = shlex.join(["python", "-m", "bench.stage_cost", *(argv or sys.argv[1:])])
    off = result["us_per_call"]["off"]
    print(f"\n`{command}` ({args.size} model; servicer called in-process, best of {args.rounds})\n")
    print("| case | users | us per Recommend | / off |\n|---|---:|---:|---:|")
    for case, us in result["us_per_call"].items():
        print(f"| {case} | {result['users'][case]:,} | {us:.1f} | {us / off:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
