"""The last hour of a server's Prometheus metrics, scraped periodically and kept in memory.

The server exports cumulative counters and histograms (service/telemetry.py); the console keeps
one parsed scrape every ``interval`` seconds for an hour and answers rates, latency percentiles
and error counts from the difference between the oldest and the newest scrape. A counter that
went down (a restarted server) is read from zero.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 3600.0
MAX_BYTES = 4 * 1024 * 1024
"""A scrape larger than this is refused (a /metrics page is a few kilobytes)."""

Key = tuple[str, tuple[tuple[str, str], ...]]
"""A sample: metric name and its sorted labels."""


def parse(text: str) -> dict[Key, float]:
    """Every sample of a Prometheus text exposition by name and labels."""
    samples: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = float(sample.value)
    return samples


@dataclass(frozen=True)
class Scrape:
    at: float
    samples: dict[Key, float]


@dataclass(frozen=True)
class MethodStats:
    """One RPC method over the window."""

    method: str
    requests: int
    errors: int
    per_minute: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True)
class Summary:
    """What the window holds: per-method requests, latency and errors, events and swaps."""

    seconds: float
    methods: list[MethodStats]
    errors_by_code: dict[str, int]
    events_by_outcome: dict[str, int]
    model_swaps: int
    load_failures: int
    scrapes: int
    last_error: str = ""
    total: MethodStats | None = None
    in_flight: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def _delta(new: float, old: float | None) -> float:
    if old is None or new < old:  # new series, or the counter restarted from zero
        return new
    return new - old


def _label(key: Key, name: str) -> str:
    return dict(key[1]).get(name, "")


def quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile of cumulative ``(upper bound, count)`` buckets, interpolated linearly
    inside its bucket as Prometheus' ``histogram_quantile`` does; ``None`` without samples."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its bound is all we know
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def summarize(old: Scrape, new: Scrape) -> Summary:
    """The window between two scrapes."""
    seconds = max(new.at - old.at, 1e-9)
    requests: dict[str, float] = {}
    errors: dict[str, float] = {}
    by_code: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    events: dict[str, float] = {}
    swaps = failures = 0.0
    for key, value in new.samples.items():
        name = key[0]
        change = _delta(value, old.samples.get(key))
        if name == "affinity_requests_total":
            method, code = _label(key, "method"), _label(key, "code")
            requests[method] = requests.get(method, 0.0) + change
            if code != "OK":
                errors[method] = errors.get(method, 0.0) + change
                by_code[code] = by_code.get(code, 0.0) + change
        elif name == "affinity_request_latency_seconds_bucket":
            if _label(key, "code") != "OK":
                continue
            bound = float(_label(key, "le"))
            per = buckets.setdefault(_label(key, "method"), {})
            per[bound] = per.get(bound, 0.0) + change
        elif name == "affinity_events_total":
            outcome = _label(key, "outcome")
            events[outcome] = events.get(outcome, 0.0) + change
        elif name == "affinity_model_swaps_total":
            swaps += change
        elif name == "affinity_model_load_failures_total":
            failures += change
    methods = []
    everything: dict[float, float] = {}
    for method in sorted(requests):
        per = buckets.get(method, {})
        for bound, count in per.items():
            everything[bound] = everything.get(bound, 0.0) + count
        methods.append(_method(method, requests[method], errors.get(method, 0.0), per, seconds))
    total = _method("all", sum(requests.values()), sum(errors.values()), everything, seconds)
    in_flight = next(
        (v for k, v in new.samples.items() if k[0] == "affinity_requests_in_flight"), None
    )
    return Summary(
        seconds=seconds,
        methods=[m for m in methods if m.requests > 0],
        errors_by_code={c: round(n) for c, n in sorted(by_code.items()) if n > 0},
        events_by_outcome={o: round(n) for o, n in sorted(events.items()) if n > 0},
        model_swaps=round(swaps),
        load_failures=round(failures),
        scrapes=0,
        total=total,
        in_flight=in_flight,
    )


def _method(
    method: str, requests: float, errors: float, buckets: Mapping[float, float], seconds: float
) -> MethodStats:
    pairs = list(buckets.items())

    def ms(q: float) -> float | None:
        found = quantile(pairs, q)
        return None if found is None else found * 1000.0

    return MethodStats(
        method=method,
        requests=round(requests),
        errors=round(errors),
        per_minute=requests / seconds * 60.0,
        p50_ms=ms(0.5),
        p95_ms=ms(0.95),
        p99_ms=ms(0.99),
    )


def fetch_url(url: str, timeout: float = 5.0) -> str:
    """The text at ``url`` (an http(s) /metrics page), at most :data:`MAX_BYTES`."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"metrics URL {url!r} is not http(s)")
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read(MAX_BYTES + 1)
    if len(body) > MAX_BYTES:
        raise ValueError(f"metrics page at {url} is larger than {MAX_BYTES} bytes")
    return body.decode("utf-8", errors="replace")


class MetricsWindow:
    """Scrapes ``url`` every ``interval`` seconds on a daemon thread and keeps an hour of it."""

    def __init__(
        self,
        url: str,
        *,
        interval: float = 15.0,
        window: float = WINDOW_SECONDS,
        fetch: Callable[[str], str] = fetch_url,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.interval = interval
        self.window = window
        self._fetch = fetch
        self._clock = clock
        self._scrapes: deque[Scrape] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error = ""

    def scrape(self) -> None:
        """One scrape now (what the thread does every ``interval``)."""
        try:
            samples = parse(self._fetch(self.url))
        except Exception as exc:  # an unreachable server is shown on the page, not raised
            self.last_error = f"{type(exc).__name__}: {exc}"
            logger.warning("console: cannot scrape %s: %s", self.url, self.last_error)
            return
        now = self._clock()
        with self._lock:
            self._scrapes.append(Scrape(now, samples))
            while len(self._scrapes) > 2 and self._scrapes[1].at <= now - self.window:
                self._scrapes.popleft()
        self.last_error = ""

    def summary(self) -> Summary | None:
        """The window so far; ``None`` before two scrapes."""
        with self._lock:
            if len(self._scrapes) < 2:
                return None
            old, new, count = self._scrapes[0], self._scrapes[-1], len(self._scrapes)
        found = summarize(old, new)
        return replace(found, scrapes=count, last_error=self.last_error)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="console-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.scrape()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
