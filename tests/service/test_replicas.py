"""Several replicas behind one client: round-robin, client-side health checking, connection age.

Three real servers on loopback ports, each serving a model whose version names the replica, so
every answer says which replica gave it. One ``AffinityClient`` over all three spreads calls
evenly; a replica that reports NOT_SERVING (or drains for shutdown) stops getting calls without
any call failing. The maximum connection age makes clients reconnect; its settings are
validated like every other.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from affinity.cli import main
from models.errors import InvalidInputError
from models.ranking import RankingPipeline
from service.client import AffinityClient, channel_target
from service.config import ServeSettings, load_settings
from service.health import HealthServicer
from service.loader import ModelHolder
from service.server import HEALTH_SERVICES, connection_age_options, create_server
from tests.service.conftest import free_port, loaded_model, settings_for

TOKEN = "replica-token"
WAIT_SECONDS = 30.0
"""Bound of every wait for the client to notice a change (it usually takes milliseconds)."""


class CountingHealth(HealthServicer):
    """The standard health servicer, counting the ``Watch`` streams clients open (one per
    connection of a health-checking client)."""

    def __init__(self) -> None:
        super().__init__()
        self._count_lock = threading.Lock()
        self.watches = 0

    def Watch(self, request: Any, context: Any, send_response_callback: Any = None) -> Any:
        with self._count_lock:
            self.watches += 1
        return super().Watch(request, context, send_response_callback)


@dataclass
class Replica:
    name: str
    server: grpc.Server
    port: int
    health: CountingHealth

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_health(self, status: int) -> None:
        for service in HEALTH_SERVICES:
            self.health.set(service, status)


@pytest.fixture
def replicas(pipeline: RankingPipeline, artifact_dir: Path, tmp_path: Path) -> Any:
    """Start ``count`` servers (a context manager), replica ``i`` serving model version ``i``."""

    @contextlib.contextmanager
    def start(count: int = 3, **overrides: Any) -> Iterator[list[Replica]]:
        settings = settings_for(artifact_dir, tmp_path, token=TOKEN, **overrides)
        with contextlib.ExitStack() as stack:
            yield [stack.enter_context(_replica(settings, pipeline, i)) for i in range(count)]

    return start


@contextlib.contextmanager
def _replica(settings: ServeSettings, pipeline: RankingPipeline, i: int) -> Iterator[Replica]:
    holder = ModelHolder()
    holder.swap(loaded_model(pipeline, version=str(i)))
    health_servicer = CountingHealth()
    server, port = create_server(settings, holder, health_servicer=health_servicer)
    server.start()
    try:
        yield Replica(str(i), server, port, health_servicer)
    finally:
        server.stop(None).wait()


def send(client: AffinityClient, n: int) -> tuple[Counter[str], list[str]]:
    """``n`` Recommend calls one after the other: answers per replica, and the failures."""
    answered: Counter[str] = Counter()
    failures: list[str] = []
    for _ in range(n):
        try:
            answered[client.recommend("u00", k=3).model.version] += 1
        except grpc.RpcError as exc:
            failures.append(f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
    return answered, failures


def wait_for(client: AffinityClient, done: Any, what: str, failures: list[str]) -> Counter[str]:
    """Send calls until ``done(answers so far)`` holds (at most WAIT_SECONDS); every call must
    succeed meanwhile (failures are collected for the caller to assert on)."""
    seen: Counter[str] = Counter()
    recent: list[str] = []
    deadline = time.monotonic() + WAIT_SECONDS
    while not done(seen, recent):
        if time.monotonic() > deadline:
            pytest.fail(f"the client did not {what} within {WAIT_SECONDS:.0f} s: answers {seen}")
        answered, failed = send(client, 1)
        failures += failed
        seen.update(answered)
        recent = (recent + list(answered.elements()))[-6:]
    return seen


def every_replica_answered(names: set[str]) -> Any:
    return lambda seen, recent: names <= set(seen)


def avoided(name: str) -> Any:
    # Six calls in a row elsewhere: with three replicas round-robin that is two full rounds.
    return lambda seen, recent: len(recent) == 6 and name not in recent


def test_one_client_spreads_calls_and_skips_a_replica_that_is_not_serving(replicas: Any) -> None:
    with replicas() as fleet:
        names = {r.name for r in fleet}
        failures: list[str] = []
        with AffinityClient([r.address for r in fleet], token=TOKEN, timeout=10) as client:
            assert client.balanced and client.target.startswith("ipv4:")
            # Round-robin starts on whichever replica connects first; wait for all three.
            wait_for(client, every_replica_answered(names), "reach every replica", failures)

            answered, failed = send(client, 90)
            assert failed == [] and failures == []
            assert set(answered) == names
            assert all(20 <= n <= 40 for n in answered.values()), answered  # about a third

            # Replica 0 reports NOT_SERVING (as while it has no model): its share moves to the
            # others, and calls sent before the client learns of it still succeed there.
            fleet[0].set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            wait_for(client, avoided("0"), "stop calling replica 0", failures)
            answered, failed = send(client, 90)
            assert failed == [] and failures == []
            assert answered["0"] == 0, answered
            assert answered["1"] + answered["2"] == 90
            assert all(35 <= answered[n] <= 55 for n in ("1", "2")), answered  # about a half

            # SERVING again: it gets its share back.
            fleet[0].set_health(health_pb2.HealthCheckResponse.SERVING)
            wait_for(client, lambda seen, recent: seen["0"] > 0, "call replica 0 again", failures)
            answered, failed = send(client, 90)
            assert failed == [] and failures == []
            assert all(20 <= n <= 40 for n in answered.values()), answered


def test_a_replica_shutting_down_drains_without_a_failed_call(replicas: Any) -> None:
    """What SIGTERM does (service/server.py): health NOT_SERVING, then stop with a grace, while
    a second caller sends all along."""
    with replicas() as fleet:
        failures: list[str] = []
        background: Counter[str] = Counter()
        lock = threading.Lock()
        stop = threading.Event()
        with AffinityClient([r.address for r in fleet], token=TOKEN, timeout=10) as client:
            wait_for(client, every_replica_answered({"0", "1", "2"}), "reach them", failures)

            def load() -> None:
                while not stop.is_set():
                    got, failed = send(client, 1)
                    with lock:
                        background.update(got)
                        failures.extend(failed)

            caller = threading.Thread(target=load, daemon=True)
            caller.start()
            try:
                fleet[1].health.enter_graceful_shutdown()
                wait_for(client, avoided("1"), "stop calling replica 1", failures)
                with lock:
                    before = background["1"]
                # Still up, but drained: neither caller reaches it any more.
                drained, failed = send(client, 60)
                failures += failed
                with lock:
                    assert drained["1"] == 0 and background["1"] == before, (drained, background)
                fleet[1].server.stop(5).wait()
                after, failed = send(client, 60)
                failures += failed
            finally:
                stop.set()
                caller.join(WAIT_SECONDS)
        assert not caller.is_alive()
        assert failures == []
        assert after["1"] == 0 and after["0"] + after["2"] == 60, after
        assert background["0"] > 0 and background["2"] > 0, background


def test_servers_end_old_connections_and_clients_reconnect_without_failing(replicas: Any) -> None:
    with replicas(
        count=2,
        max_connection_age_seconds=0.5,
        max_connection_age_grace_seconds=5,
    ) as fleet:
        failures: list[str] = []
        with AffinityClient([r.address for r in fleet], token=TOKEN, timeout=10) as client:
            wait_for(client, every_replica_answered({"0", "1"}), "reach both", failures)
            first = [r.health.watches for r in fleet]
            assert all(n >= 1 for n in first), first  # one health watch per connection
            # Each replica ends the connection after its age; the client connects anew (and
            # opens a new watch) while every call still succeeds.
            deadline = time.monotonic() + WAIT_SECONDS
            while any(r.health.watches <= n for r, n in zip(fleet, first, strict=True)):
                if time.monotonic() > deadline:
                    pytest.fail(f"no reconnection within {WAIT_SECONDS:.0f} s: {first}")
                failures += send(client, 5)[1]
                time.sleep(0.05)
            failures += send(client, 20)[1]
        assert failures == []


def test_a_single_target_keeps_one_plain_connection(replicas: Any) -> None:
    with replicas(count=1) as (replica,):
        replica.set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        with AffinityClient(replica.address, token=TOKEN) as client:
            assert not client.balanced and client.target == replica.address
            # Unbalanced, the health call reaches the server and reports what it says.
            assert client.health() == "NOT_SERVING"
            assert client.recommend("u00", k=3).model.version == "0"
        assert replica.health.watches == 0


def test_a_dns_name_is_balanced_over_its_serving_addresses(replicas: Any) -> None:
    with replicas(count=1) as (replica,):
        target = f"dns:///localhost:{replica.port}"
        with AffinityClient(target, token=TOKEN, timeout=10) as client:
            assert client.balanced and client.target == target
            assert client.recommend("u00", k=3).model.version == "0"
            # Its only address reports NOT_SERVING: nothing is left to call, so calls fail fast
            # with UNAVAILABLE (the server itself would have answered).
            replica.set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            deadline = time.monotonic() + WAIT_SECONDS
            while True:
                try:
                    client.recommend("u00", k=3)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc  # type: ignore[attr-defined]
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"calls still succeed {WAIT_SECONDS:.0f} s after NOT_SERVING")
            with pytest.raises(grpc.RpcError) as info:
                client.health()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("10.0.0.5:50051", ("10.0.0.5:50051", False)),
        (["10.0.0.5:50051"], ("10.0.0.5:50051", False)),
        (["10.0.0.5:50051", "10.0.0.6:50052"], ("ipv4:10.0.0.5:50051,10.0.0.6:50052", True)),
        (["[::1]:50051", "[fd00::6]:50051"], ("ipv6:[::1]:50051,[fd00::6]:50051", True)),
        ("dns:///affinity.recs.svc:50051", ("dns:///affinity.recs.svc:50051", True)),
    ],
)
def test_channel_target(target: Any, expected: tuple[str, bool]) -> None:
    assert channel_target(target) == expected


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ([], "no target"),
        (["localhost:50051", "10.0.0.6:50051"], "dns:///NAME:PORT"),
        (["10.0.0.5:50051", "[::1]:50051"], "mix IPv4 and IPv6"),
        (["dns:///a:1", "10.0.0.6:50051"], "must be the only one"),
        (["10.0.0.5", "10.0.0.6:50051"], "not host:port"),
    ],
)
def test_bad_targets_are_refused_with_a_reason(target: list[str], reason: str) -> None:
    with pytest.raises(InvalidInputError, match=reason):
        AffinityClient(target)


def test_connection_age_options() -> None:
    def options(**values: Any) -> list[tuple[str, int]]:
        return connection_age_options(
            ServeSettings(model_uri="models:/affinity@champion", **values)
        )

    assert options() == [
        ("grpc.max_connection_age_ms", 300_000),
        ("grpc.max_connection_age_grace_ms", 30_000),
    ]
    assert options(max_connection_age_seconds=0) == []  # 0: no maximum age
    assert options(max_connection_age_grace_seconds=0) == [("grpc.max_connection_age_ms", 300_000)]
    assert options(max_connection_age_seconds=0.0001)[0] == ("grpc.max_connection_age_ms", 1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_connection_age_seconds", -1),
        ("max_connection_age_grace_seconds", -0.5),
        ("max_connection_age_seconds", float("inf")),
        ("max_connection_age_seconds", 1e9),  # past what gRPC's 32-bit milliseconds hold
    ],
)
def test_bad_connection_age_is_refused_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(InvalidInputError) as info:
        load_settings(model_uri="models:/affinity@champion", **{field: value})
    assert info.value.field == field
    assert field in str(info.value)
    assert str(ServeSettings.model_fields[field].validation_alias) in str(info.value)


def test_connection_age_from_the_environment_and_the_command_line(
    monkeypatch: pytest.MonkeyPatch, artifact_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AFFINITY_MAX_CONNECTION_AGE_SECONDS", "60")
    monkeypatch.setenv("AFFINITY_MAX_CONNECTION_AGE_GRACE_SECONDS", "5")
    settings = load_settings(model_uri="models:/affinity@champion")
    assert (settings.max_connection_age_seconds, settings.max_connection_age_grace_seconds) == (
        60,
        5,
    )
    base = ["serve", "--model", str(artifact_dir), "--workers", "1", "--port", str(free_port())]
    assert main([*base, "--max-connection-age", "-1"]) == 1
    err = capsys.readouterr().err
    assert "max_connection_age_seconds" in err and "AFFINITY_MAX_CONNECTION_AGE_SECONDS" in err
