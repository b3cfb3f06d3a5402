"""The standard gRPC health service, safe under clients that reconnect often.

Load balancers and ``AffinityClient``'s client-side health checking open one ``Watch`` stream per
connection and keep it for the connection's life; with a maximum connection age every client
reconnects every few minutes, so streams open and close all the time.

grpcio's own ``HealthServicer`` sends a watcher's first status while holding its registry lock,
and a send waits until the server's event thread completes it. That same event thread runs the
close callback of every ending stream, which takes the registry lock: when a stream ends while
another one is being answered, the event thread waits for the lock and the lock's holder waits
for the event thread. The whole server stops answering (seen in CI as a replica hanging during
a reconnection storm). Here the registry lock only guards the registry: nothing is sent while
holding it, so the close callback (the one piece of this module that runs on the event thread)
never waits for a send. A second lock orders the sends, so every watcher sees status changes
in the order they were set.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE_NAME = "grpc.health.v1.Health"

Send = Callable[[Any], None]
"""grpcio's ``send_response_callback`` of a non-blocking stream: a response, or None to end it."""


class HealthServicer(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1.Health``: ``Check``, ``Watch`` (non-blocking streams) and :meth:`set`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the registry: statuses and watchers; never held to send
        self._send_lock = threading.RLock()  # orders sends; never taken on the event thread
        self._status: dict[str, int] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._watchers: dict[str, set[Send]] = {}
        self._shutting_down = False
        # grpcio calls a method marked non-blocking with a send callback and frees its thread
        # when it returns, instead of holding a pool thread for the stream's whole life. Marked
        # here, on the instance's own method, so a subclass that overrides Watch keeps it.
        watch = self.Watch.__func__  # type: ignore[attr-defined]
        watch.experimental_non_blocking = True
        watch.experimental_thread_pool = None

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            status = self._status.get(request.service)
        if status is None:
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(
        self, request: Any, context: grpc.ServicerContext, send_response_callback: Send
    ) -> None:
        service = request.service
        send = send_response_callback
        with self._send_lock:  # no set() between reading the status and sending it
            with self._lock:
                status = self._status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                self._watchers.setdefault(service, set()).add(send)
            closed = self._on_close(service, send)
            if not context.add_callback(closed):  # the call has already ended
                closed()
                return
            send(health_pb2.HealthCheckResponse(status=status))

    def _on_close(self, service: str, send: Send) -> Callable[[], None]:
        def closed() -> None:  # on grpcio's event thread: must not wait for a send
            with self._lock:
                watchers = self._watchers.get(service)
                if watchers is not None:
                    watchers.discard(send)
                    if not watchers:
                        del self._watchers[service]
            send(None)  # ends the stream's bookkeeping; sends nothing to a gone client

        return closed

    def set(self, service: str, status: int) -> None:
        """Set ``service``'s status and tell its watchers (ignored once shutting down)."""
        with self._send_lock:
            with self._lock:
                if self._shutting_down:
                    return
                self._status[service] = status
                watchers = list(self._watchers.get(service, ()))
            response = health_pb2.HealthCheckResponse(status=status)
            for send in watchers:
                send(response)

    def enter_graceful_shutdown(self) -> None:
        """Report NOT_SERVING for every service from now on, whatever is set later."""
        with self._send_lock:
            with self._lock:
                services = list(self._status)
            for service in services:
                self.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
            with self._lock:
                self._shutting_down = True

    def status(self, service: str) -> int | None:
        """The status set for ``service`` (None where none was)."""
        with self._lock:
            return self._status.get(service)
