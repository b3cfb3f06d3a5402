"""A load generator in its own processes: closed loop at a concurrency, or open loop at a rate.

Each process runs an asyncio loop over pre-serialized payloads (gRPC messages sent as raw bytes so
the client does not pay for protobuf parsing, or JSON bodies for an HTTP endpoint) and returns its
latencies; :func:`run_load` merges them into requests/s, p50/p95/p99/max and errors by status code.
In open-loop mode latency is measured from the moment a request was *scheduled*, so a server that
falls behind is charged for the queueing it causes (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

WARMUP_SECONDS = 1.0
"""Requests in the first second of a measurement are not counted (connections warm up)."""
MAX_OUTSTANDING = 20_000
"""Open loop: requests beyond this many in flight are dropped, counted as ``client_overload``."""


@dataclass(frozen=True)
class LoadSpec:
    """One measurement: where to send what, how hard and for how long."""

    target: str
    """``grpc://HOST:PORT/package.Service/Method`` or ``http://HOST:PORT/path`` (loopback)."""
    payloads: list[bytes]
    duration: float = 10.0
    concurrency: int = 1
    """Closed loop: requests kept in flight (split across processes)."""
    rate: float | None = None
    """Open loop: requests per second (all processes together); overrides concurrency."""
    processes: int = 1
    timeout: float = 10.0


@dataclass
class LoadResult:
    """Aggregated outcome of one :class:`LoadSpec`."""

    label: str
    mode: str
    concurrency: int
    rate: float | None
    duration: float
    requests: int
    ok: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False, compare=False)
    """The successful requests' latencies (not written to JSON)."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("latencies_ms")
        return out


def summarize(
    label: str,
    mode: str,
    concurrency: int,
    rate: float | None,
    latencies_ms: np.ndarray,
    codes: Counter[str] | dict[str, int],
    seconds: float,
) -> LoadResult:
    """A :class:`LoadResult` from raw latencies and status counts over ``seconds`` of load."""
    codes = Counter(codes)
    ok = int(codes.pop("OK", 0))
    lat = np.asarray(latencies_ms, dtype=np.float64)
    pct = np.percentile(lat, [50, 95, 99]) if len(lat) else [np.nan] * 3
    return LoadResult(
        label=label,
        mode=mode,
        concurrency=concurrency,
        rate=rate,
        duration=round(seconds, 3),
        requests=ok + sum(codes.values()),
        ok=ok,
        rps=ok / seconds if seconds > 0 else 0.0,
        p50_ms=float(pct[0]),
        p95_ms=float(pct[1]),
        p99_ms=float(pct[2]),
        max_ms=float(lat.max()) if len(lat) else float("nan"),
        errors=dict(codes),
        latencies_ms=lat,
    )


def merge(results: list[LoadResult]) -> LoadResult:
    """Pool several runs of the same load (e.g. interleaved slices) into one result."""
    first = results[0]
    codes: Counter[str] = Counter()
    for r in results:
        codes.update(r.errors)
        codes["OK"] += r.ok
    return summarize(
        first.label,
        first.mode,
        first.concurrency,
        first.rate,
        np.concatenate([r.latencies_ms for r in results]),
        codes,
        sum(r.duration for r in results),
    )


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# ------------------------------------------------------------------ clients
class _GrpcCaller:
    def __init__(self, target: str, timeout: float) -> None:
        import grpc.aio

        rest = target.removeprefix("grpc://")
        address, _, method = rest.partition("/")
        self.channel = grpc.aio.insecure_channel(address)
        # No (de)serializers: payloads go out as the bytes we were given, replies stay bytes.
        self.call = self.channel.unary_unary("/" + method)
        self.timeout = timeout

    async def __call__(self, payload: bytes) -> str:
        import grpc

        try:
            await self.call(payload, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return "OK"

    async def close(self) -> None:
        await self.channel.close()


class _HttpCaller:
    def __init__(self, target: str, timeout: float) -> None:
        import aiohttp

        self.url = target
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout),
            connector=aiohttp.TCPConnector(limit=0),
            headers={"Content-Type": "application/json"},
        )

    async def __call__(self, payload: bytes) -> str:
        try:
            async with self.session.post(self.url, data=payload) as response:
                await response.read()
                return "OK" if response.status == 200 else f"HTTP_{response.status}"
        except TimeoutError:
            return "TIMEOUT"
        except Exception as exc:  # connection refused/reset: count it, keep measuring
            return type(exc).__name__

    async def close(self) -> None:
        await self.session.close()


def _caller(target: str, timeout: float) -> _GrpcCaller | _HttpCaller:
    if target.startswith("grpc://"):
        return _GrpcCaller(target, timeout)
    if target.startswith("http://"):
        return _HttpCaller(target, timeout)
    raise ValueError(f"unsupported target {target!r}: use grpc://... or http://...")


# ------------------------------------------------------------------ worker
async def _closed(call: Any, payloads: list[bytes], offset: int, n: int, stop: float) -> Any:
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    counted_from = time.perf_counter() + WARMUP_SECONDS

    async def user(slot: int) -> None:
        i = offset + slot * 7919
        while True:
            start = time.perf_counter()
            if start >= stop:
                return
            code = await call(payloads[i % len(payloads)])
            end = time.perf_counter()
            i += 1
            if start >= counted_from:
                codes[code] += 1
                if code == "OK":
                    latencies.append(end - start)

    await asyncio.gather(*(user(s) for s in range(n)))
    return latencies, codes, stop - counted_from


async def _open(call: Any, payloads: list[bytes], offset: int, rate: float, stop: float) -> Any:
    latencies: list[float] = []
    codes: Counter[str] = Counter()
    begin = time.perf_counter()
    counted_from = begin + WARMUP_SECONDS
    pending: set[asyncio.Task[None]] = set()

    async def one(payload: bytes, scheduled: float) -> None:
        code = await call(payload)
        if scheduled >= counted_from:
            codes[code] += 1
            if code == "OK":
                latencies.append(time.perf_counter() - scheduled)

    i = 0
    while True:
        scheduled = begin + i / rate
        if scheduled >= stop:
            break
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(pending) >= MAX_OUTSTANDING:
            if scheduled >= counted_from:
                codes["client_overload"] += 1
        else:
            task = asyncio.ensure_future(one(payloads[(offset + i) % len(payloads)], scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
        i += 1
    if pending:
        await asyncio.wait(pending)
    return latencies, codes, stop - counted_from


def _worker(conn: Connection, spec: LoadSpec, index: int, share: float, offset: int) -> None:
    async def main() -> Any:
        call = _caller(spec.target, spec.timeout)
        try:
            for payload in spec.payloads[:3]:  # open the connection before the clock starts
                await call(payload)
            conn.send("ready")
            start_at = conn.recv()
            await asyncio.sleep(max(0.0, start_at - time.time()))
            stop = time.perf_counter() + spec.duration
            if spec.rate is not None:
                return await _open(call, spec.payloads, offset, share, stop)
            return await _closed(call, spec.payloads, offset, int(share), stop)
        finally:
            await call.close()

    try:
        latencies, codes, counted = asyncio.run(main())
        conn.send((np.asarray(latencies, dtype=np.float64), dict(codes), counted))
    except Exception as exc:  # report, do not hang the parent
        conn.send(exc)
    finally:
        conn.close()


# ------------------------------------------------------------------ driver
def run_load(spec: LoadSpec, label: str = "") -> LoadResult:
    """Run ``spec`` from ``spec.processes`` fresh processes and aggregate what they measured."""
    ctx = mp.get_context("spawn")
    if spec.rate is not None:
        shares: list[float] = [spec.rate / spec.processes] * spec.processes
    else:
        procs = min(spec.processes, spec.concurrency)
        shares = [float(n) for n in _split(spec.concurrency, procs)]
    workers = []
    for index, share in enumerate(shares):
        parent, child = ctx.Pipe()
        offset = index * (len(spec.payloads) // len(shares))
        proc = ctx.Process(target=_worker, args=(child, spec, index, share, offset), daemon=True)
        proc.start()
        child.close()
        workers.append((proc, parent))
    try:
        for _, conn in workers:
            if not conn.poll(60):
                raise RuntimeError("load generator process did not start")
            ready = conn.recv()
            if isinstance(ready, Exception):
                raise ready
        start_at = time.time() + 0.2
        for _, conn in workers:
            conn.send(start_at)
        parts = []
        for _, conn in workers:
            if not conn.poll(spec.duration + spec.timeout + 60):
                raise RuntimeError("load generator process did not finish")
            part = conn.recv()
            if isinstance(part, Exception):
                raise part
            parts.append(part)
    finally:
        for proc, conn in workers:
            conn.close()
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    latencies = np.concatenate([p[0] for p in parts]) * 1000.0
    codes: Counter[str] = Counter()
    for p in parts:
        codes.update(p[1])
    return summarize(
        label,
        "open" if spec.rate is not None else "closed",
        spec.concurrency if spec.rate is None else 0,
        spec.rate,
        latencies,
        codes,
        max(p[2] for p in parts),
    )


def format_table(results: list[LoadResult]) -> str:
    """Results as a Markdown table."""
    head = (
        "| target | mode | conc/rate | req/s | p50 ms | p95 ms | p99 ms | max ms | errors |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---|\n"
    )
    rows = []
    for r in results:
        load = f"c={r.concurrency}" if r.mode == "closed" else f"{r.rate:g}/s"
        errors = ", ".join(f"{k}:{v}" for k, v in sorted(r.errors.items())) or "0"
        rows.append(
            f"| {r.label} | {r.mode} | {load} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p95_ms:.2f} "
            f"| {r.p99_ms:.2f} | {r.max_ms:.1f} | {errors} |"
        )
    return head + "\n".join(rows) + "\n"


def alternate_rows(
    targets: dict[str, str],
    payloads: list[bytes],
    *,
    concurrencies: list[int],
    duration: float,
    rounds: int,
    processes: int = 1,
    log: Callable[[str], None] | None = None,
) -> list[LoadResult]:
    """:func:`alternate` at each of ``concurrencies`` in turn, every result in one list (and,
    with ``log``, a line per result as it comes)."""
    results: list[LoadResult] = []
    for c in concurrencies:
        for r in alternate(
            targets,
            payloads,
            concurrency=c,
            duration=duration,
            rounds=rounds,
            processes=processes,
        ):
            results.append(r)
            if log is not None:
                log(f"{r.label} c={c}: {r.rps:,.0f} req/s p50 {r.p50_ms:.2f} p99 {r.p99_ms:.2f}")
    return results


def alternate(
    targets: dict[str, str],
    payloads: list[bytes],
    *,
    concurrency: int,
    duration: float,
    rounds: int,
    processes: int = 1,
) -> list[LoadResult]:
    """The same closed-loop load on each of ``targets`` (label -> ``grpc://HOST:PORT/METHOD``)
    in alternating slices (a, b, c, a, b, c, ...), ``duration`` seconds per target split over
    ``rounds`` slices, each pooled into one result per label, in ``targets``' order.

    Background load on a shared machine comes and goes; taking turns puts it on every target
    alike, so the ratios between them hold even when the absolute numbers move.
    """
    slices: dict[str, list[LoadResult]] = {label: [] for label in targets}
    for _ in range(rounds):
        for label, target in targets.items():
            spec = LoadSpec(
                target=target,
                payloads=payloads,
                duration=duration / rounds + WARMUP_SECONDS,
                concurrency=concurrency,
                processes=processes,
            )
            slices[label].append(run_load(spec, label))
    return [merge(parts) for parts in slices.values()]
