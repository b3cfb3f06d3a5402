"""Shared plumbing of the benchmarks: catalogs and registered models, servers, memory, timing.

Everything here runs on loopback and in processes the benchmark starts and stops itself.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL_NAME = "affinity"


@dataclass(frozen=True)
class Catalog:
    """A generated data set and the ALS model registered on it."""

    name: str
    users: int
    items: int
    interactions: int


SIZES = {
    "small": Catalog("small", users=200_000, items=20_000, interactions=2_000_000),
    "large": Catalog("large", users=1_000_000, items=200_000, interactions=20_000_000),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tracking_env(workdir: Path) -> dict[str, str]:
    return {
        **os.environ,
        # mlflow models serve starts `uvicorn` by name: it must find the venv's.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }


def generate(catalog: Catalog, workdir: Path) -> Path:
    """``affinity generate`` into ``workdir/data`` unless it is already there."""
    data = workdir / "data"
    if not (data / "interactions.parquet").is_file():
        log(f"generating {catalog.interactions:,} interactions for {catalog.name}")
        subprocess.run(
            [
                str(BIN / "affinity"),
                "generate",
                "--out",
                str(data),
                "--users",
                str(catalog.users),
                "--items",
                str(catalog.items),
                "--interactions",
                str(catalog.interactions),
                "--quiet",
            ],
            check=True,
        )
    return data


def register_quick(data: Path, workdir: Path, factors: int = 64) -> float:
    """Fit ALS on all of ``data`` and register it as champion, skipping the evaluation.

    The serving benchmark needs a registered model of realistic size, not its metrics; the
    full ``affinity train`` (split, evaluation, gate) is what :mod:`bench.training_bench` times.
    Returns the fit seconds.
    """
    os.environ.update(tracking_env(workdir))
    import mlflow

    from models.artifact import ModelBundle, save_artifact
    from registry import mlflow_store as registry
    from registry.mlflow_store import configure_tracking
    from training.confidence import build_matrix
    from training.data import catalog_arrays, load_catalog, load_interactions
    from training.fit import fit_model

    configure_tracking()
    loaded = load_interactions(data / "interactions.parquet")
    matrix = build_matrix(loaded.frame)
    started = time.perf_counter()
    model = fit_model("als", {"factors": factors}, matrix.matrix, None)
    fit_seconds = time.perf_counter() - started
    bundle = ModelBundle(
        model=model,
        users=matrix.users,
        items=matrix.items,
        seen=matrix.matrix,
        catalog=catalog_arrays(matrix.items.ids, load_catalog(data / "items.parquet")),
        popularity=np.bincount(matrix.matrix.indices, minlength=len(matrix.items)).astype(
            np.float32
        ),
        trending=np.zeros(len(matrix.items), np.float32),
    )
    artifact = workdir / "artifact"
    save_artifact(bundle, artifact)
    mlflow.set_experiment("affinity-bench")
    with mlflow.start_run(run_name="bench"):
        version = registry.log_and_register(artifact, model_name=MODEL_NAME)
    registry.set_alias(MODEL_NAME, registry.CHAMPION, version.version)
    return fit_seconds


def champion_artifact(workdir: Path) -> Path:
    """The registered champion's Affinity artifact directory (downloaded once)."""
    target = workdir / "champion"
    if not (target / "done").is_file():
        os.environ.update(tracking_env(workdir))
        from registry import mlflow_store as registry
        from registry.mlflow_store import configure_tracking

        configure_tracking()
        target.mkdir(parents=True, exist_ok=True)
        path = registry.download_model(f"models:/{MODEL_NAME}@{registry.CHAMPION}", target)
        (target / "done").write_text(str(path))
    return Path((target / "done").read_text())


# ------------------------------------------------------------------ servers
@contextmanager
def running(
    command: list[str],
    ready: Callable[[], bool],
    *,
    env: dict[str, str] | None,
    log_path: Path,
    cwd: Path | None = None,
) -> Any:
    """Start ``command`` (in ``cwd``) in its own process group, wait for ``ready()``, stop it
    afterwards."""
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=cwd,
        )
    try:
        deadline = time.monotonic() + 600
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"{command[:3]} exited with {proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[:3]} did not become ready; see {log_path}")
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def grpc_ready(port: int) -> Callable[[], bool]:
    def check() -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=1
                )
            except grpc.RpcError as exc:
                # The floor server has no health service: any answer means it is up.
                return exc.code() == grpc.StatusCode.UNIMPLEMENTED
            return reply.status == health_pb2.HealthCheckResponse.SERVING

    return check


def http_ready(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    return check


# ------------------------------------------------------------------ memory
def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from ``/proc``)."""
    found = [pid]
    for child_file in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children = child_file.read_text().split()
        except OSError:
            continue
        for child in children:
            found += process_tree(int(child))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants so far, every thread (``/proc``)."""
    total = 0
    for proc in process_tree(pid):
        try:
            fields = Path(f"/proc/{proc}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def memory_of(pid: int) -> dict[str, float]:
    """Resident memory of one process in MiB: RSS, its anonymous and file-backed parts, PSS."""
    values: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Anonymous", "Pss_File", "Pss_Anon"):
                values[key] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return values


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))


def reregister(workdir: Path) -> None:
    """Rewrite ``workdir/artifact`` in the current artifact layout and register it as champion.

    For models fitted by an older build: serving then benchmarks today's layout (aligned,
    memory-mappable arrays) without refitting.
    """
    import shutil

    os.environ.update(tracking_env(workdir))
    import mlflow

    from models.artifact import load_artifact, save_artifact
    from registry import mlflow_store as registry
    from registry.mlflow_store import configure_tracking

    configure_tracking()
    bundle = load_artifact(workdir / "artifact", mapped=False)
    shutil.rmtree(workdir / "artifact")
    save_artifact(bundle, workdir / "artifact")
    mlflow.set_experiment("affinity-bench")
    with mlflow.start_run(run_name="bench"):
        version = registry.log_and_register(workdir / "artifact", model_name=MODEL_NAME)
    registry.set_alias(MODEL_NAME, registry.CHAMPION, version.version)
    shutil.rmtree(workdir / "champion", ignore_errors=True)


def tiny_artifact(directory: Path, users: int = 400, items: int = 120) -> Path:
    """A small synthetic ALS artifact (seconds to build) in ``directory``, kept once built: for
    the benchmarks and campaigns where the model hardly matters (ingest, smoke runs). Users are
    ``u0``.., items ``i0``.., untyped and uncategorized, with skewed popularity."""
    import scipy.sparse as sp
    from threadpoolctl import threadpool_limits

    from models.algorithms import get_algorithm
    from models.artifact import ItemCatalog, ModelBundle, save_artifact
    from models.vocabulary import Vocabulary

    if (directory / "manifest.json").is_file():
        return directory
    rng = np.random.default_rng(0)
    rows = np.repeat(np.arange(users), 8)
    # Skewed item popularity, so lists differ by user but are not flat.
    cols = np.minimum(rng.zipf(1.3, size=rows.size) - 1, items - 1)
    matrix = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, cols)), shape=(users, items))
    matrix.sum_duplicates()
    with threadpool_limits(1, "blas"):
        model = get_algorithm("als")(
            factors=8, iterations=4, random_state=0, num_threads=1, calculate_training_loss=False
        ).fit(matrix)
    item_ids = [f"i{i}" for i in range(items)]
    popularity = np.bincount(matrix.indices, minlength=items).astype(np.float32)
    bundle = ModelBundle(
        model=model,
        users=Vocabulary([f"u{u}" for u in range(users)], kind="user"),
        items=Vocabulary(item_ids),
        seen=matrix,
        catalog=ItemCatalog(
            item_type=np.array(["product"] * items),
            category=np.array([""] * items),
            title=np.array(item_ids),
            available=np.ones(items, dtype=bool),
        ),
        popularity=popularity,
        trending=popularity,
        info={"dataset_fingerprint": "bench-tiny"},
    )
    save_artifact(bundle, directory)
    return directory


# ------------------------------------------------------------------ shared options
def add_model_options(parser: Any, *, size_help: str = "") -> None:
    """``--size``, ``--workdir``, ``--results`` and ``--seed`` of the benchmarks that serve the
    serving benchmark's catalog (``tiny``: a 400-user model built here, for smoke runs)."""
    parser.add_argument(
        "--size",
        choices=["tiny", *sorted(SIZES)],
        default="small",
        help=size_help
        or "tiny: a 400-user synthetic model built here (smoke runs); small/large: the serving "
        "benchmark's catalog and registered model (built once under --workdir)",
    )
    parser.add_argument("--workdir", default="/tmp/affinity-bench")
    parser.add_argument(
        "--results", default=str(ROOT / "bench" / "results"), help="where the JSON files go"
    )
    parser.add_argument("--seed", type=int, default=0)


def add_load_options(parser: Any) -> None:
    """The closed-loop load of the side-by-side server benchmarks (``loadgen.alternate_rows``):
    ``--duration``, ``--rounds``, ``--requests``, ``--concurrency``, ``--client-processes``."""
    parser.add_argument(
        "--duration",
        type=float,
        default=12.0,
        help="measured seconds per row (split into --rounds slices)",
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
