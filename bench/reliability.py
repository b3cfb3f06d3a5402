"""Reliability campaigns against a real, supervised multi-worker server and a real MLflow registry.

Each campaign prints what it did and one ``PASS``/``FAIL`` line, and writes a JSON record to
``--out`` (default ``bench/results/reliability``)::

    python -m bench.reliability swaps      # >= 20 alias moves under load from several processes
    python -m bench.reliability kill       # SIGKILL a worker under load
    python -m bench.reliability overload   # 3x capacity, then back to normal
    python -m bench.reliability soak       # >= 10 minutes at 70% capacity with periodic swaps
    python -m bench.reliability fuzz       # >= 10,000 hypothesis cases against 2 workers
    python -m bench.reliability all        # everything but soak

All traffic is loopback; every loop is bounded in count and time. The helpers here
(:class:`ServerProcess`, :func:`build_registry`, :func:`request_loop`, ...) are also used by the
regular tests in ``tests/reliability``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "affinity"
SERVER_CODE = (
    "import sys; from service.config import load_settings; from service.server import run; "
    "sys.exit(run(load_settings()))"
)


# --------------------------------------------------------------------------- system facts
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux ``/proc``)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


# --------------------------------------------------------------------------- model registry
def synthetic_bundle(n_users: int, n_items: int, factors: int, seed: int) -> Any:
    """An ALS bundle with random factors: realistic size and shape, no fitting time."""
    import scipy.sparse as sp

    from models.algorithms import get_algorithm
    from models.artifact import ItemCatalog, ModelBundle
    from models.vocabulary import Vocabulary

    rng = np.random.default_rng(seed)
    model = get_algorithm("als").from_arrays(
        {"factors": factors},
        {
            "_shape": np.array([n_users, n_items], dtype=np.int64),
            "user_factors": rng.standard_normal((n_users, factors), dtype=np.float32) * 0.1,
            "item_factors": rng.standard_normal((n_items, factors), dtype=np.float32) * 0.1,
        },
    )
    per_user = 5
    rows = np.repeat(np.arange(n_users), per_user)
    cols = rng.integers(0, n_items, size=n_users * per_user)
    seen = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))
    seen.sum_duplicates()
    seen.data[:] = 1.0
    popularity = np.bincount(seen.indices, minlength=n_items).astype(np.float32)
    return ModelBundle(
        model=model,
        users=Vocabulary([f"u{u}" for u in range(n_users)], kind="user"),
        items=Vocabulary([f"i{i}" for i in range(n_items)]),
        seen=seen,
        catalog=ItemCatalog.empty(n_items),
        popularity=popularity,
        trending=popularity.copy(),
        info={"dataset_fingerprint": f"synthetic-{seed}"},
    )


@dataclass
class Registry:
    """A sqlite-backed MLflow store with registered versions of :data:`MODEL_NAME`."""

    tracking_uri: str
    root: Path
    versions: list[str]
    model_bytes: int = 0

    def promote(self, version: str, alias: str = "champion") -> None:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        client.set_registered_model_alias(MODEL_NAME, alias, version)

    def register(self, artifact: Path, alias: str | None = None) -> str:
        """Register ``artifact`` as a new version (pointing ``alias`` at it when given)."""
        import mlflow

        from registry.mlflow_store import log_and_register

        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.tracking_uri)
        try:
            mlflow.set_experiment("reliability")
            with mlflow.start_run():
                version = str(log_and_register(artifact, model_name=MODEL_NAME).version)
        finally:
            mlflow.set_tracking_uri(previous)
        if alias:
            self.promote(version, alias)
        self.versions.append(version)
        return version


def build_registry(root: Path, bundles: list[Any]) -> Registry:
    """Save ``bundles`` as artifacts under ``root`` and register one version each.

    Version 1 becomes champion. ``model_bytes`` is the size of the largest artifact.
    """
    import mlflow

    from models.artifact import save_artifact

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.create_experiment("reliability", artifact_location=str(root / "artifacts"))
    registry = Registry(tracking_uri=uri, root=root, versions=[])
    for index, bundle in enumerate(bundles):
        artifact = root / f"model-{index}"
        save_artifact(bundle, artifact)
        size = sum(p.stat().st_size for p in artifact.iterdir())
        registry.model_bytes = max(registry.model_bytes, size)
        registry.register(artifact, alias="champion" if index == 0 else None)
    return registry


# --------------------------------------------------------------------------- server process
class ServerProcess:
    """``affinity serve`` in a subprocess (a supervisor when ``workers > 1``), logs to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int) -> None:
        self.port = port
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_CODE],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def workers(self) -> list[int]:
        """Worker pids (the server's own pid when it serves in-process)."""
        return children(self.proc.pid) or [self.proc.pid]

    def rss(self) -> dict[int, int]:
        return {pid: rss_bytes(pid) for pid in self.workers()}

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout: float = 60.0, connections: int = 8) -> None:
        """Until ``connections`` fresh connections in a row (spread over the workers by
        SO_REUSEPORT) report SERVING."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        streak = 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}: see {self.log_path}"
                )
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(self.target, options=options) as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=2
                    )
                    ok = reply.status == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    ok = False
            streak = streak + 1 if ok else 0
            if streak >= connections:
                return
            time.sleep(0.05 if ok else 0.2)
        raise TimeoutError(f"server not SERVING after {timeout:.0f} s: see {self.log_path}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


@contextlib.contextmanager
def serving(
    model_uri: str,
    workdir: Path,
    *,
    tracking_uri: str | None = None,
    workers: int = 2,
    timeout: float = 60.0,
    **settings: Any,
) -> Iterator[ServerProcess]:
    """A started server (waited until SERVING) that is stopped on exit."""
    port = free_port()
    env = {
        "AFFINITY_MODEL_URI": model_uri,
        "AFFINITY_HOST": "127.0.0.1",
        "AFFINITY_PORT": str(port),
        "AFFINITY_WORKERS": str(workers),
        "AFFINITY_CACHE_DIR": str(workdir / "cache"),
        "AFFINITY_LOG_FORMAT": "json",
        "AFFINITY_REGISTRY_TIMEOUT_SECONDS": "2",
        "AFFINITY_REGISTRY_RETRIES": "0",
        "AFFINITY_GRACE_SECONDS": "2",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    for key, value in settings.items():
        env[f"AFFINITY_{key.upper()}"] = str(value)
    server = ServerProcess(env, workdir / f"server-{port}.log", port)
    try:
        server.wait_serving(timeout)
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- request loops
@dataclass
class LoopResult:
    """What one client process saw: per-request ``(start, end, version or status)``."""

    calls: list[tuple[float, float, str]] = field(default_factory=list)

    @property
    def codes(self) -> Counter[str]:
        return Counter("OK" if not c[2].isupper() else c[2] for c in self.calls)


def _loop(target: str, duration: float, users: list[str], seed: int, conn: Any) -> None:
    import grpc

    from protos.affinity.v1 import recommender_pb2 as pb
    from protos.affinity.v1 import recommender_pb2_grpc as pb_grpc

    rng = np.random.default_rng(seed)
    calls: list[tuple[float, float, str]] = []
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        stop = time.time() + duration
        while time.time() < stop and len(calls) < 2_000_000:
            request = pb.RecommendRequest(user_id=str(rng.choice(users)), k=10)
            start = time.time()
            try:
                version = stub.Recommend(request, timeout=10).model.version
            except grpc.RpcError as exc:
                version = exc.code().name  # type: ignore[attr-defined]
                time.sleep(0.01)  # a client backs off; a spinning loop would count thousands
            calls.append((start, time.time(), version))
    conn.send(calls)
    conn.close()


@contextlib.contextmanager
def request_loop(
    target: str, duration: float, users: list[str], processes: int = 2
) -> Iterator[list[LoopResult]]:
    """Send Recommend calls back to back from ``processes`` processes for ``duration`` s.

    The yielded list is filled when the block exits (after the processes finished).
    """
    ctx = mp.get_context("spawn")
    procs = []
    for index in range(processes):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_loop, args=(target, duration, users, index, child), daemon=True)
        proc.start()
        child.close()
        procs.append((proc, parent))
    results: list[LoopResult] = []
    try:
        yield results
    finally:
        for proc, conn in procs:
            if conn.poll(duration + 60):
                results.append(LoopResult(conn.recv()))
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def stale_responses(
    calls: list[tuple[float, float, str]], timeline: list[tuple[float, str]], lag: float
) -> tuple[int, float]:
    """Responses whose version was not champion at any time in ``[start - lag, end]``, and the
    largest staleness seen (how long before the request started its version had been replaced).

    ``timeline`` holds ``(time the alias moved, new version)`` in order; ``lag`` is how long a
    polling server may keep answering with the previous champion.
    """
    times = np.array([t for t, _ in timeline])
    bad, worst = 0, 0.0
    for start, end, version in calls:
        if version.isupper():
            continue
        first = max(int(np.searchsorted(times, start, side="right")) - 1, 0)
        last = max(int(np.searchsorted(times, end, side="right")) - 1, 0)
        if any(timeline[i][1] == version for i in range(first, last + 1)):
            continue
        # Champion before the request: when did it stop being champion?
        ended = [times[i + 1] for i in range(first) if timeline[i][1] == version]
        staleness = start - max(ended) if ended else float("inf")
        worst = max(worst, staleness)
        if staleness > lag:
            bad += 1
    return bad, worst


# --------------------------------------------------------------------------- campaigns
def _report(name: str, ok: bool, record: dict[str, Any], out: Path, log: str | None = None) -> bool:
    record = {"campaign": name, "passed": ok, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ"), **record}
    out.mkdir(parents=True, exist_ok=True)
    if log is not None:
        record["worker_restarts"] = log.count("restarting")
        record["error_lines_logged"] = sum('"level": "ERROR"' in line for line in log.splitlines())
        # Without the per-request access lines (a soak writes ~100 MB of them).
        kept = [line for line in log.splitlines() if " answered " not in line]
        (out / f"{name}-server.log").write_text("\n".join(kept) + "\n")
    (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps(record, indent=2, default=str))
    print(f"{'PASS' if ok else 'FAIL'} {name}")
    return ok


def _model_rss(artifact: Path) -> int:
    """Resident memory one loaded and warmed-up model adds to a process (measured in a child)."""
    code = (
        "import os, sys; from pathlib import Path; from bench.reliability import rss_bytes; "
        "from service.loader import ModelMeta, load_directory; "
        "before = rss_bytes(os.getpid()); "
        "m = load_directory(Path(sys.argv[1]), ModelMeta('m', '1', '', '', 'x')); "
        "print(rss_bytes(os.getpid()) - before)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(artifact)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return int(out.stdout.split()[-1])


def campaign_swaps(
    workdir: Path,
    out: Path,
    *,
    promotions: int = 24,
    interval: float = 1.5,
    processes: int = 3,
    size: tuple[int, int, int] = (200_000, 20_000, 32),
) -> bool:
    """``promotions`` alias moves while ``processes`` clients send requests without pause."""
    n_users, n_items, factors = size
    bundles = [synthetic_bundle(n_users, n_items, factors, seed) for seed in range(3)]
    registry = build_registry(workdir / "registry", bundles)
    del bundles
    model_rss = _model_rss(registry.root / "model-0")
    poll = 0.25
    users = [f"u{u}" for u in range(0, n_users, 97)] + ["new-user"]
    with serving(
        f"models:/{MODEL_NAME}@champion",
        workdir,
        tracking_uri=registry.tracking_uri,
        workers=2,
        poll_seconds=poll,
    ) as server:
        timeline: list[tuple[float, str]] = [(0.0, registry.versions[0])]
        after_swap: list[dict[int, int]] = []
        duration = promotions * interval + 4
        with request_loop(server.target, duration, users, processes) as results:
            time.sleep(2.0)
            baseline = server.rss()  # one model loaded, request threads and buffers warm
            for i in range(promotions):
                version = registry.versions[(i + 1) % len(registry.versions)]
                registry.promote(version)
                timeline.append((time.time(), version))
                time.sleep(interval)
                after_swap.append(server.rss())
        log = server.log_text()
        swaps_logged = log.count("serving model")
    calls = [c for r in results for c in r.calls]
    codes: Counter[str] = Counter()
    for r in results:
        codes.update(r.codes)
    # A worker picks up a move within one poll plus the download/verify/load/warm-up time.
    lag = poll + 2.0
    bad, worst = stale_responses(calls, timeline, lag)
    base_max = max(baseline.values())
    series = [max(s.values()) for s in after_swap]
    peak = max(series)
    half = len(series) // 2
    # One model's worth: never a second model kept (peak below baseline + one model), and no
    # upward trend: the level RSS settles at after a swap (the median of each half of the
    # swaps) does not climb. Medians, not maxima: a sample taken while a worker is still
    # loading the next model (two models resident for a moment) is not a trend.
    trend = float(np.median(series[half:]) - np.median(series[:half]))
    failed = sum(v for k, v in codes.items() if k != "OK")
    ok = (
        failed == 0
        and bad == 0
        and len(calls) > 0
        and peak - base_max < model_rss
        and trend < 0.1 * model_rss
        and len(results) == processes
    )
    return _report(
        "swaps",
        ok,
        {
            "promotions": promotions,
            "client_processes": processes,
            "requests": len(calls),
            "codes": dict(codes),
            "versions_seen": sorted({c[2] for c in calls if not c[2].isupper()}),
            "not_champion_within_lag": bad,
            "lag_allowed_s": lag,
            "max_staleness_s": round(worst, 3),
            "model_bytes_on_disk": registry.model_bytes,
            "model_rss_mb": round(model_rss / 2**20, 1),
            "worker_rss_after_first_load_mb": round(base_max / 2**20, 1),
            "worker_rss_after_each_swap_mb": [round(v / 2**20) for v in series],
            "rss_trend_median_second_half_vs_first_mb": round(trend / 2**20, 1),
            "worker_rss_peak_after_swaps_mb": round(peak / 2**20, 1),
            "worker_rss_after_last_swap_mb": round(max(after_swap[-1].values()) / 2**20, 1),
            "swaps_logged_by_workers": swaps_logged,
        },
        out,
        log=log,
    )


def campaign_kill(workdir: Path, out: Path, *, duration: float = 12.0, workers: int = 3) -> bool:
    """SIGKILL one worker while clients send requests; the rest answer, the supervisor restarts."""
    from models.artifact import save_artifact
    from tests.service.conftest import build_bundle  # the small synthetic world of the tests

    artifact = workdir / "artifact"
    save_artifact(build_bundle(0), artifact)
    users = [f"u{u:02d}" for u in range(60)]
    with serving(str(artifact), workdir, workers=workers) as server:
        before = server.workers()
        with request_loop(server.target, duration, users, processes=3) as results:
            time.sleep(duration / 3)
            victim = before[0]
            killed_at = time.time()
            os.kill(victim, signal.SIGKILL)
            restarted_at = None
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                now = server.workers()
                if len(now) == workers and victim not in now:
                    restarted_at = time.time()
                    break
                time.sleep(0.05)
        server.wait_serving(30)
        after = server.workers()
        log = server.log_text()
    calls = [c for r in results for c in r.calls]
    codes: Counter[str] = Counter()
    for r in results:
        codes.update(r.codes)
    # After the kill, every second must still have successful answers.
    after_kill = [c for c in calls if c[0] >= killed_at]
    seconds = {int(c[1] - killed_at) for c in after_kill if not c[2].isupper()}
    span = int(max((c[1] for c in after_kill), default=killed_at) - killed_at)
    gaps = [s for s in range(span) if s not in seconds]
    failed = sum(v for k, v in codes.items() if k != "OK")
    failed_at = [c[1] - killed_at for c in calls if c[2].isupper()]
    ok = restarted_at is not None and not gaps and len(after) == workers and victim not in after
    return _report(
        "kill",
        ok,
        {
            "workers": workers,
            "requests": len(calls),
            "codes": dict(codes),
            "failed_requests": failed,
            "failures_between_s": [round(min(failed_at), 2), round(max(failed_at), 2)]
            if failed_at
            else None,
            "seconds_after_kill_without_a_success": gaps,
            "restart_seconds": round(restarted_at - killed_at, 2) if restarted_at else None,
            "supervisor_logged_restart": "restarting" in log,
        },
        out,
        log=log,
    )


def _payloads(users: list[str], k: int = 10) -> list[bytes]:
    from protos.affinity.v1 import recommender_pb2 as pb

    return [pb.RecommendRequest(user_id=u, k=k).SerializeToString() for u in users]


def _measure(target: str, payloads: list[bytes], duration: float, **load: Any) -> Any:
    from bench.loadgen import LoadSpec, run_load

    spec = LoadSpec(
        target=f"grpc://{target}/affinity.v1.Recommender/Recommend",
        payloads=payloads,
        duration=duration,
        **load,
    )
    return run_load(spec)


def _summary(result: Any) -> dict[str, Any]:
    keys = ("rate", "concurrency", "requests", "ok", "rps", "p50_ms", "p99_ms", "max_ms", "errors")
    return {k: getattr(result, k) for k in keys}


def _ok_latency_buckets(metrics_port: int) -> dict[float, float]:
    """Cumulative server-side latency histogram of successful Recommend calls (all workers)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if not line.startswith("affinity_request_latency_seconds_bucket{"):
            continue
        labels, _, value = line.rpartition(" ")
        if 'code="OK"' in labels and 'method="Recommend"' in labels:
            le = labels.split('le="')[1].split('"')[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + float(value)
    return buckets


def _server_quantiles(
    before: dict[float, float], after: dict[float, float]
) -> dict[str, float | None]:
    """p50 and p99 upper bounds (ms) of the server-side latency between two scrapes."""
    delta = {b: after.get(b, 0.0) - before.get(b, 0.0) for b in sorted(after)}
    total = delta.get(float("inf"), 0.0)
    out: dict[str, float | None] = {"server_ok_requests": total}
    for name, q in (("server_p50_ms_at_most", 0.5), ("server_p99_ms_at_most", 0.99)):
        bound = next((b for b, n in delta.items() if total and n >= q * total), None)
        out[name] = None if bound is None or bound == float("inf") else bound * 1000
    return out


def _error_rate(result: Any) -> float:
    return float(sum(result.errors.values())) / max(int(result.requests), 1)


def _world(workdir: Path, size: tuple[int, int, int]) -> tuple[Path, list[str]]:
    from models.artifact import save_artifact

    n_users, n_items, factors = size
    artifact = workdir / "artifact"
    save_artifact(synthetic_bundle(n_users, n_items, factors, 0), artifact)
    rng = np.random.default_rng(1)
    users = [f"u{u}" for u in rng.integers(0, n_users, 2000)] + [f"new{u}" for u in range(200)]
    return artifact, users


def campaign_overload(
    workdir: Path, out: Path, *, size: tuple[int, int, int] = (50_000, 20_000, 64)
) -> bool:
    """Capacity, then 3x capacity for 20 s, then half capacity again."""
    artifact, users = _world(workdir, size)
    payloads = _payloads(users)
    metrics_port = free_port()
    with serving(
        str(artifact), workdir, workers=2, max_in_flight=16, metrics_port=metrics_port
    ) as server:
        capacity = _measure(server.target, payloads, 8, concurrency=16, processes=2)
        cap = max(capacity.rps, 50.0)
        rss_before = sum(server.rss().values())
        scrapes = [_ok_latency_buckets(metrics_port)]
        normal = _measure(server.target, payloads, 8, rate=0.5 * cap, processes=2, timeout=2)
        scrapes.append(_ok_latency_buckets(metrics_port))
        over = _measure(server.target, payloads, 20, rate=3 * cap, processes=4, timeout=1)
        scrapes.append(_ok_latency_buckets(metrics_port))
        rss_peak = sum(server.rss().values())
        recovered = _measure(server.target, payloads, 8, rate=0.5 * cap, processes=2, timeout=2)
        scrapes.append(_ok_latency_buckets(metrics_port))
        rss_after = sum(server.rss().values())
        alive = server.proc.poll() is None
        log = server.log_text()
    # CANCELLED is a deadline too: the server cancels a call whose deadline passed, and a busy
    # client may read that RST_STREAM before its own timer reports DEADLINE_EXCEEDED.
    excess_codes = set(over.errors) - {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED"}
    ok = (
        alive
        and not excess_codes
        and over.ok > 0
        # Back to how the same load fared before the overload (this box is shared and small,
        # so "before" is the yardstick, not zero).
        and _error_rate(recovered) <= _error_rate(normal) + 0.01
        and recovered.p99_ms < max(2 * normal.p99_ms, 50.0)
        and rss_after < 1.25 * rss_before + 50 * 2**20
    )
    return _report(
        "overload",
        ok,
        {
            "capacity_rps": round(cap, 1),
            "normal_half_capacity": {**_summary(normal), **_server_quantiles(*scrapes[0:2])},
            "overload_3x": {**_summary(over), **_server_quantiles(*scrapes[1:3])},
            "recovered_half_capacity": {
                **_summary(recovered),
                **_server_quantiles(*scrapes[2:4]),
            },
            "unexpected_codes": sorted(excess_codes),
            "server_rss_mb": {
                "before": round(rss_before / 2**20, 1),
                "after_overload": round(rss_peak / 2**20, 1),
                "after_recovery": round(rss_after / 2**20, 1),
            },
        },
        out,
        log=log,
    )


def campaign_soak(
    workdir: Path,
    out: Path,
    *,
    minutes: float = 10.0,
    swap_every: float = 60.0,
    size: tuple[int, int, int] = (50_000, 20_000, 64),
    rate: float | None = None,
) -> bool:
    """``minutes`` at 70% of measured capacity (or at ``rate`` requests/s) with an alias move
    every ``swap_every`` s."""
    import threading

    n_users, n_items, factors = size
    bundles = [synthetic_bundle(n_users, n_items, factors, seed) for seed in range(2)]
    registry = build_registry(workdir / "registry", bundles)
    del bundles
    rng = np.random.default_rng(1)
    users = [f"u{u}" for u in rng.integers(0, n_users, 2000)] + [f"new{u}" for u in range(200)]
    payloads = _payloads(users)
    with serving(
        f"models:/{MODEL_NAME}@champion",
        workdir,
        tracking_uri=registry.tracking_uri,
        workers=2,
        poll_seconds=2,
    ) as server:
        capacity = _measure(server.target, payloads, 8, concurrency=16, processes=2)
        fixed = rate is not None
        rate = rate if rate is not None else 0.7 * capacity.rps
        # The open-loop generator shares the 2 cores with the server and costs more CPU per
        # request than the closed-loop probe, so 70% of a burst measurement can already be
        # overload. Step the rate down until a 15 s open-loop probe runs clean.
        calibration = []
        for _ in range(0 if fixed else 5):
            probe = _measure(server.target, payloads, 15, rate=rate, processes=2, timeout=2)
            error_share = sum(probe.errors.values()) / max(probe.requests, 1)
            calibration.append({"rate": round(rate, 1), "error_share": round(error_share, 5),
                                "p99_ms": round(probe.p99_ms, 1)})  # fmt: skip
            if error_share <= 0.0005 and probe.p99_ms < 250:
                break
            rate *= 0.8
        samples: list[tuple[float, int]] = []
        swaps = 0
        result: list[Any] = []
        duration = minutes * 60
        runner = threading.Thread(
            target=lambda: result.append(
                _measure(server.target, payloads, duration, rate=rate, processes=2, timeout=2)
            )
        )
        start = time.monotonic()
        runner.start()
        next_swap = start + swap_every
        while runner.is_alive() and time.monotonic() - start < duration + 120:
            now = time.monotonic()
            samples.append((now - start, sum(server.rss().values())))
            if now >= next_swap and now - start < duration - 10:
                swaps += 1
                registry.promote(registry.versions[swaps % len(registry.versions)])
                next_swap += swap_every
            time.sleep(5)
        runner.join(timeout=60)
        log = server.log_text()
    after_first_minute = next(r for t, r in samples if t >= 60)
    end = samples[-1][1]
    load = result[0] if result else None
    ok = (
        load is not None
        and end <= 1.10 * after_first_minute
        and sum(load.errors.values()) <= 0.001 * max(load.requests, 1)
        and swaps >= minutes * 60 / swap_every - 2
    )
    return _report(
        "soak",
        ok,
        {
            "minutes": minutes,
            "capacity_rps": round(capacity.rps, 1),
            "offered_rps": round(rate, 1),
            "rate_calibration": calibration,
            "load": _summary(load) if load else None,
            "swaps": swaps,
            "swaps_logged_by_workers": log.count("serving model"),
            "server_rss_mb_after_1_min": round(after_first_minute / 2**20, 1),
            "server_rss_mb_at_end": round(end / 2**20, 1),
            "rss_change_percent": round(100 * (end / after_first_minute - 1), 2),
            "rss_samples_mb": [(round(t), round(r / 2**20, 1)) for t, r in samples[::6]],
        },
        out,
        log=log,
    )


def campaign_fuzz(workdir: Path, out: Path, *, per_test: int = 2_600) -> bool:
    """The hypothesis fuzz tests at ``per_test`` examples each against a 2-worker server."""
    from models.artifact import save_artifact
    from tests.service.conftest import build_bundle

    artifact = workdir / "artifact"
    save_artifact(build_bundle(0), artifact)
    with serving(str(artifact), workdir, workers=2, max_message_bytes=1024 * 1024) as server:
        before = server.workers()
        started = time.monotonic()
        env = {
            **os.environ,
            "AFFINITY_FUZZ_EXAMPLES": str(per_test),
            "AFFINITY_FUZZ_TARGET": server.target,
        }
        test = subprocess.run(
            [
                sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                "--hypothesis-show-statistics", "tests/service/test_fuzz.py",
                f"--basetemp={workdir / 'pytest'}",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=3600,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        after = server.workers()
        log = server.log_text()
    cases = _count_cases(test.stdout)
    ok = test.returncode == 0 and before == after and "INTERNAL" not in log and cases >= 10_000
    tail = test.stdout.strip().splitlines()[-3:]
    return _report(
        "fuzz",
        ok,
        {
            "cases": cases,
            "seconds": round(elapsed, 1),
            "pytest": tail,
            "workers_unchanged": before == after,
            "unhandled_errors_logged": log.count("unhandled error"),
        },
        out,
        log=log,
    )


def _count_cases(stdout: str) -> int:
    """Passing examples from ``--hypothesis-show-statistics`` output."""
    total = 0
    for line in stdout.splitlines():
        words = line.replace(",", " ").split()  # "- 2600 passing, 0 failing, and 9 invalid ..."
        if "passing" in words:
            count = words[words.index("passing") - 1]
            total += int(count) if count.isdigit() else 0
    return total


CAMPAIGNS = {
    "swaps": campaign_swaps,
    "kill": campaign_kill,
    "overload": campaign_overload,
    "soak": campaign_soak,
    "fuzz": campaign_fuzz,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("campaign", choices=[*CAMPAIGNS, "all"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reliability")
    parser.add_argument("--minutes", type=float, default=10.0, help="soak duration")
    parser.add_argument(
        "--rate", type=float, help="soak: offered requests/s (default: 70%% of measured capacity)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    names = [n for n in CAMPAIGNS if n != "soak"] if args.campaign == "all" else [args.campaign]
    passed = True
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"affinity-{name}-") as tmp:
            kwargs: dict[str, Any] = (
                {"minutes": args.minutes, "rate": args.rate} if name == "soak" else {}
            )
            passed &= CAMPAIGNS[name](Path(tmp), args.out, **kwargs)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
