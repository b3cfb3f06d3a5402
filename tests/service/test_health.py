"""The health service (service/health.py): statuses, watchers, and no deadlock when streams end.

grpcio runs a stream's close callback on the server's one event thread, and a send waits for that
thread. The standard servicer sends while holding the lock its close callback takes, so a stream
ending during another one's send stopped a whole replica in CI. The first test stages exactly
that interleaving with plain threads; the last one storms a real server with watch streams that
open and end while statuses change.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.health import HealthServicer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Context:
    """The part of a servicer context Watch uses: close callbacks, run when the test says."""

    def __init__(self, active: bool = True) -> None:
        self.active = active
        self.callbacks: list[Callable[[], None]] = []
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def add_callback(self, callback: Callable[[], None]) -> bool:
        if not self.active:
            return False
        self.callbacks.append(callback)
        return True

    def close(self) -> None:
        for callback in self.callbacks:
            callback()

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


class Stream:
    """A watcher's send callback that records what it was sent (None ends the stream)."""

    def __init__(self) -> None:
        self.sent: list[int | None] = []

    def __call__(self, response: Any) -> None:
        self.sent.append(None if response is None else response.status)


def watch(servicer: HealthServicer, service: str = "", send: Any = None) -> tuple[Context, Any]:
    context = Context()
    send = send or Stream()
    servicer.Watch(health_pb2.HealthCheckRequest(service=service), context, send)
    return context, send


def test_a_stream_ending_while_another_is_answered_does_not_wait_for_that_send() -> None:
    servicer = HealthServicer()
    first, _ = watch(servicer)
    outcome: dict[str, bool] = {}

    def slow_send(response: Any) -> None:
        # The send of the second watcher's first status is in flight: grpcio's event thread must
        # complete it, and that thread is now running the first stream's close callback.
        event_thread = threading.Thread(target=first.close, daemon=True)
        event_thread.start()
        event_thread.join(timeout=5)
        outcome["closed"] = not event_thread.is_alive()

    watch(servicer, send=slow_send)
    assert outcome == {"closed": True}, "the close callback waited for a send in progress"


def test_a_watcher_gets_the_current_status_then_every_change_in_order_until_it_ends() -> None:
    servicer = HealthServicer()
    servicer.set("affinity", NOT_SERVING)
    context, stream = watch(servicer, "affinity")
    servicer.set("affinity", SERVING)
    servicer.set("other", NOT_SERVING)  # another service's watchers only
    servicer.set("affinity", NOT_SERVING)
    context.close()
    servicer.set("affinity", SERVING)  # gone: nothing more is sent to it
    assert stream.sent == [NOT_SERVING, SERVING, NOT_SERVING, None]


def test_an_unknown_service_is_watched_as_unknown_until_it_is_set() -> None:
    servicer = HealthServicer()
    _, stream = watch(servicer, "later")
    servicer.set("later", SERVING)
    assert stream.sent == [UNKNOWN, SERVING]


def test_a_call_that_ended_before_its_watch_registered_is_not_kept() -> None:
    servicer = HealthServicer()
    stream = Stream()
    servicer.Watch(health_pb2.HealthCheckRequest(service=""), Context(active=False), stream)
    servicer.set("", NOT_SERVING)
    assert stream.sent == [None]


def test_check_answers_the_status_or_not_found_naming_the_service() -> None:
    servicer = HealthServicer()
    context = Context()
    assert servicer.Check(health_pb2.HealthCheckRequest(service=""), context).status == SERVING
    servicer.Check(health_pb2.HealthCheckRequest(service="nope"), context)
    assert context.code == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in context.details


def test_graceful_shutdown_reports_not_serving_for_good() -> None:
    servicer = HealthServicer()
    servicer.set("affinity", SERVING)
    _, stream = watch(servicer, "affinity")
    servicer.enter_graceful_shutdown()
    servicer.set("affinity", SERVING)  # a model swap during shutdown changes nothing
    assert stream.sent == [SERVING, NOT_SERVING]
    assert servicer.status("affinity") == servicer.status("") == NOT_SERVING


@pytest.fixture
def health_server() -> Any:
    servicer = HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None).wait(timeout=10)


def test_a_real_server_survives_watch_streams_opening_and_ending_while_statuses_change(
    health_server: Any,
) -> None:
    servicer, address = health_server
    servicer.set("affinity", SERVING)
    stop = threading.Event()
    firsts: list[int] = []
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            with grpc.insecure_channel(address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while not stop.is_set():
                    stream = stub.Watch(health_pb2.HealthCheckRequest(service="affinity"))
                    firsts.append(next(stream).status)
                    stream.cancel()
        except BaseException as error:
            errors.append(error)

    def toggle() -> None:
        status = SERVING
        while not stop.is_set():
            servicer.set("affinity", status)
            status = NOT_SERVING if status == SERVING else SERVING

    threads = [threading.Thread(target=churn, daemon=True) for _ in range(8)]
    threads.append(threading.Thread(target=toggle, daemon=True))
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=20)
    assert not any(thread.is_alive() for thread in threads), "a watch or a status change hung"
    assert errors == []
    assert len(firsts) > 50 and set(firsts) <= {SERVING, NOT_SERVING}
    with grpc.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="affinity"), timeout=5
        )
    assert check.status in (SERVING, NOT_SERVING)
