"""Training benchmark: ``affinity train`` end to end vs a bare implicit ALS fit of the same data.

For each size (interaction events; users = events / 20, items = events / 100, so 20M events is
the issue's 1M users x 200k items) it generates a log with ``affinity generate``, then times, each
in a fresh process whose peak resident memory is read from ``wait4``:

* ``affinity train`` (load, split, fit, evaluate, MLflow run, registry) with its stage timings;
* a bare ``implicit`` ALS fit (the pipeline's ALS defaults) of the user x item matrix the
  pipeline fits, i.e. the temporal training split, built outside the timed region.

Each ``affinity train`` run gets a fresh MLflow store (tables created before the clock starts, a
one-off cost of a new installation), so no earlier champion is downloaded and evaluated by the
promotion gate; ``--factors`` sets the ALS factors of both sides (default: the pipeline's 256).

The ratio e2e / bare fit is the pipeline's overhead. Run
``python -m bench.training_bench --sizes 1000000,10000000,20000000 [--factors 64]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import common
from bench.common import log

BARE_FIT = """
import json, sys, time
import numpy as np
from threadpoolctl import threadpool_limits
from training.confidence import build_matrix
from training.data import load_interactions
from training.split import split
from models.factorization import ALSConfig

loaded = load_interactions(sys.argv[1])
parts = split(loaded.frame, sys.argv[2], fraction=0.2, seed=42)
matrix = build_matrix(parts.train).matrix
cfg = ALSConfig(**json.loads(sys.argv[3]))
from implicit.cpu.als import AlternatingLeastSquares
with threadpool_limits(1, "blas"):
    model = AlternatingLeastSquares(factors=cfg.factors, regularization=cfg.regularization,
        alpha=cfg.alpha, dtype=np.float32, use_cg=cfg.use_cg, iterations=cfg.iterations,
        calculate_training_loss=cfg.calculate_training_loss, random_state=cfg.random_state)
    t = time.perf_counter()
    model.fit(matrix, show_progress=False)
    fit = time.perf_counter() - t
print(json.dumps({"fit_seconds": fit, "nnz": int(matrix.nnz), "shape": list(matrix.shape)}))
"""


def timed(
    command: list[str], env: dict[str, str] | None = None, cwd: Path = common.ROOT
) -> dict[str, Any]:
    """Run ``command``; wall seconds, peak RSS (MiB) of the process and its last stdout line."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=cwd
    )
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed with {proc.returncode}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return {
        "wall_seconds": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "output": json.loads(lines[-1]) if lines else {},
    }


def fresh_store(workdir: Path) -> dict[str, str]:
    """An empty MLflow store in ``workdir`` with its tables created; returns the environment."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    env = common.tracking_env(workdir)
    import mlflow

    mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()
    return env


def stage_timings(workdir: Path, run_id: str) -> dict[str, float]:
    """The pipeline's own stage timings from the run's ``evaluation/report.json``."""
    os.environ.update(common.tracking_env(workdir))
    import mlflow

    mlflow.set_tracking_uri(common.tracking_env(workdir)["MLFLOW_TRACKING_URI"])
    try:
        report = mlflow.artifacts.load_dict(f"runs:/{run_id}/evaluation/report.json")
    except Exception as exc:  # the timings are a bonus; the wall clock is the measurement
        log(f"no stage timings for run {run_id}: {exc}")
        return {}
    return {k: float(v) for k, v in (report.get("timings") or {}).items()}


def bench_size(events: int, root: Path, factors: int | None) -> dict[str, Any]:
    catalog = common.Catalog(
        f"train-{events}", users=events // 20, items=max(100, events // 100), interactions=events
    )
    workdir = root / catalog.name
    data = common.generate(catalog, workdir)
    params = {} if factors is None else {"factors": factors}
    load_before = os.getloadavg()[0]
    log(f"{events:,} events: bare implicit fit (load average {load_before:.2f})")
    bare = timed(
        [
            sys.executable,
            "-c",
            BARE_FIT,
            str(data / "interactions.parquet"),
            "temporal",
            json.dumps(params),
        ],
        common.tracking_env(workdir),
    )
    log(f"{events:,} events: affinity train end to end")
    store = workdir / "run"
    env = fresh_store(store)
    e2e = timed(
        [
            str(common.BIN / "affinity"),
            "train",
            "--algorithm",
            "als",
            "--interactions",
            str(data / "interactions.parquet"),
            "--items",
            str(data / "items.parquet"),
            "--force-promote",
            "--quiet",
            "--json",
            *(f"--param={k}={v}" for k, v in params.items()),
        ],
        env,
        cwd=store,  # the run's artifacts go to store/mlruns
    )
    run_id = str(e2e["output"].get("run_id", ""))
    stages = stage_timings(store, run_id) if run_id else {}
    load_after = os.getloadavg()[0]
    shutil.rmtree(store, ignore_errors=True)
    result = {
        "events": events,
        "factors": factors or 256,
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "users": catalog.users,
        "items": catalog.items,
        "train_pairs": bare["output"].get("nnz"),
        "bare_fit_seconds": bare["output"].get("fit_seconds"),
        "bare_process_seconds": bare["wall_seconds"],
        "bare_peak_rss_mib": bare["peak_rss_mib"],
        "e2e_seconds": e2e["wall_seconds"],
        "e2e_peak_rss_mib": e2e["peak_rss_mib"],
        "stages": stages,
    }
    result["overhead_ratio"] = result["e2e_seconds"] / result["bare_fit_seconds"]
    # The same ratio against the fit inside the timed run: on a shared machine the load can
    # change between the two processes, and this one compares work done side by side.
    own_fit = result["stages"].get("fit_seconds")
    result["own_fit_ratio"] = result["e2e_seconds"] / own_fit if own_fit else None
    log(
        f"{events:,} events: e2e {result['e2e_seconds']:.1f}s vs bare fit "
        f"{result['bare_fit_seconds']:.1f}s (x{result['overhead_ratio']:.2f})"
    )
    return result


def render(results: list[dict[str, Any]]) -> str:
    lines = [
        "| events | factors | users x items | train pairs | bare fit s | e2e s | overhead | "
        "e2e / own fit | peak MiB bare / e2e | stages (s) | load avg |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in results:
        stages = ", ".join(
            f"{k.removesuffix('_seconds')} {v:.1f}" for k, v in r["stages"].items() if k != "total"
        )
        load = " / ".join(f"{x:.1f}" for x in r["load_average"])
        own = r.get("own_fit_ratio")
        lines.append(
            f"| {r['events']:,} | {r['factors']} | {r['users']:,} x {r['items']:,} "
            f"| {r['train_pairs']:,} "
            f"| {r['bare_fit_seconds']:.1f} | {r['e2e_seconds']:.1f} | x{r['overhead_ratio']:.2f} "
            f"| {'n/a' if own is None else f'x{own:.2f}'} "
            f"| {r['bare_peak_rss_mib']:.0f} / {r['e2e_peak_rss_mib']:.0f} | {stages} | {load} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.training_bench", description=__doc__)
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1_000_000, 10_000_000, 20_000_000],
        help="interaction events per run, comma separated",
    )
    parser.add_argument(
        "--factors", type=int, default=None, help="ALS factors of both sides (default 256)"
    )
    parser.add_argument("--workdir", default="/tmp/affinity-bench")
    args = parser.parse_args(argv)
    root = Path(args.workdir)
    suffix = "" if args.factors is None else f"-f{args.factors}"
    out = root / f"training{suffix}.json"
    results: list[dict[str, Any]] = []
    for n in args.sizes:
        results.append(bench_size(n, root, args.factors))
        common.write_json(out, results)  # after each size: a long series keeps what it measured
        out.with_suffix(".md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
