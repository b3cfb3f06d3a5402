"""Garbage-collector pauses in a serving process, with and without the heap settled.

A worker holds a few hundred thousand long-lived objects (the libraries, the model's
vocabularies and caches). Python's cyclic collector walks all of them in each full (generation
2) collection, and every request waits while it does. ``service.memory.settle_heap`` runs on
each model put in place: it collects once, then freezes the objects alive (``gc.freeze``), so
later collections walk only what requests create.

Each variant runs in a fresh process: the champion artifact of ``bench.serving``'s catalog
(built once under ``--workdir``; ``--size tiny`` builds a 400-user model for smoke runs), a
``RecommenderServicer`` with a response recorder over a SQLite store (as a worker has), BLAS on
one thread, then ``--requests`` known users' ``Recommend`` calls while a ``gc.callbacks`` hook
times every collection. Prints, per variant, the collections of each
generation, their total and longest pause, the requests per second and the objects the
collector tracks, and the command::

    python -m bench.gc_pauses --size small
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import common
from bench.common import ROOT, log

PROBE = """
import gc, json, sys, time
from pathlib import Path
from threadpoolctl import threadpool_limits
from bench.serving import payloads
from protos.affinity.v1 import recommender_pb2 as pb
from service.config import ServeSettings
from service.event_side import event_rules
from service.events import EventStore
from service.loader import ModelHolder, ModelLoader
from service.recorder import ResponseRecorder
from service.servicer import RecommenderServicer
from service.memory import settle_heap

artifact, store_dir = Path(sys.argv[1]), sys.argv[2]
settle, n = sys.argv[3] == "1", int(sys.argv[4])
threadpool_limits(1)
settings = ServeSettings(model_uri=str(artifact), poll_seconds=0)
holder = ModelHolder()
if settle:
    holder.add_listener(settle_heap)  # as service.server.serve registers it
ModelLoader(settings, holder).load_initial()
store = EventStore.open(f"sqlite:///{store_dir}/events.db", rules=event_rules(settings))
recorder = ResponseRecorder(store)
recorder.start()
servicer = RecommenderServicer(holder, recorder=recorder)
requests = [pb.RecommendRequest.FromString(b) for b in payloads(artifact)["known"]]

class Context:
    def time_remaining(self):
        return None

context = Context()
for r in requests[:500]:
    servicer.Recommend(r, context)
pauses = {0: [], 1: [], 2: []}
began = {}

def timed(phase, info):
    if phase == "start":
        began["t"] = time.perf_counter()
    else:
        pauses[info["generation"]].append(time.perf_counter() - began["t"])

gc.callbacks.append(timed)
start = time.perf_counter()
for i in range(n):
    servicer.Recommend(requests[i % len(requests)], context)
elapsed = time.perf_counter() - start
gc.callbacks.remove(timed)
print(json.dumps({
    "generations": {
        str(g): {"collections": len(p), "total_ms": 1e3 * sum(p), "max_ms": 1e3 * max(p, default=0)}
        for g, p in pauses.items()
    },
    "requests_per_second": n / elapsed,
    "tracked_objects": len(gc.get_objects()),
    "frozen_objects": gc.get_freeze_count(),
}))
"""


def probe(artifact: Path, settle: bool, requests: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as store_dir:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                PROBE,
                str(artifact),
                store_dir,
                str(int(settle)),
                str(requests),
            ],
            check=True,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from bench.live import model_artifact

    parser = argparse.ArgumentParser(prog="python -m bench.gc_pauses", description=__doc__)
    common.add_model_options(parser)
    parser.add_argument("--requests", type=int, default=60_000)
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per variant")
    args = parser.parse_args(argv)
    artifact = model_artifact(args)
    rows = []
    for r in range(args.rounds):
        for settle in (False, True) if r % 2 == 0 else (True, False):
            label = "settled (gc.freeze)" if settle else "as before"
            log(f"round {r + 1}: {label}")
            rows.append((label, probe(artifact, settle, args.requests)))
    print(
        "| heap | requests/s | tracked objects | frozen | gen 0 | gen 1 | gen 2 collections "
        "| gen 2 total ms | longest pause ms |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for label, row in sorted(rows, key=lambda x: x[0]):
        gens = row["generations"]
        longest = max(g["max_ms"] for g in gens.values())
        print(
            f"| {label} | {row['requests_per_second']:,.0f} | {row['tracked_objects']:,} "
            f"| {row['frozen_objects']:,} | {gens['0']['collections']} "
            f"| {gens['1']['collections']} | {gens['2']['collections']} "
            f"| {gens['2']['total_ms']:.1f} | {longest:.1f} |"
        )
    given = sys.argv[1:] if argv is None else argv
    print(f"\ncommand: {shlex.join(['python', '-m', 'bench.gc_pauses', *given])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
