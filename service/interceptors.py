"""Server interceptors: metrics and access logs, bearer-token auth, the in-flight limit, and the
one place where domain errors become gRPC status codes.

Order (outermost first): :class:`MetricsInterceptor`, :class:`AuthInterceptor`,
:class:`ConcurrencyLimitInterceptor`, :class:`ErrorInterceptor`. Only unary-unary methods of
``affinity.v1.Recommender`` are wrapped by the last three; health and reflection pass through.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

import grpc

from models.errors import (
    AffinityError,
    ConflictError,
    InvalidInputError,
    ModelTooLargeError,
    NotFoundError,
    NotReadyError,
    StoreError,
)
from service import telemetry

logger = logging.getLogger(__name__)

SERVICE = "affinity.v1.Recommender"
SERVICE_PREFIX = f"/{SERVICE}/"
HEALTH_PREFIX = "/grpc.health.v1.Health/"

Behavior = Callable[[Any, grpc.ServicerContext], Any]


class DeadlineExceededError(AffinityError):
    """The caller's deadline passed before the work could start."""


# Checked in order, so subclasses must precede their bases.
ERROR_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (NotReadyError, grpc.StatusCode.UNAVAILABLE),
    # Nothing of the call was acknowledged: the client retries it with the same event ids.
    (StoreError, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ModelTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code of a domain error, or ``None`` for an unexpected exception."""
    for cls, code in ERROR_CODES:
        if isinstance(exc, cls):
            return code
    return None


def method_name(full_method: str) -> str:
    """``/affinity.v1.Recommender/Recommend`` -> ``Recommend``."""
    return full_method.rsplit("/", 1)[-1] or full_method


class MalformedRequest:
    """Stands in for a request whose bytes did not parse, so it can be refused as
    INVALID_ARGUMENT (gRPC itself would answer INTERNAL for a deserializer exception)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    parse = deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # DecodeError, invalid UTF-8 in a string field, ...
            return MalformedRequest(type(exc).__name__)

    return deserialize


def _wrap_unary(
    continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
    details: grpc.HandlerCallDetails,
    wrapper: Callable[[Behavior, Any, grpc.ServicerContext], Any],
    *,
    tolerant: bool = False,
    stream_wrapper: Callable[[Behavior, Any, grpc.ServicerContext], Any] | None = None,
) -> grpc.RpcMethodHandler | None:
    """``continuation``'s handler with its behavior passed through ``wrapper``; a unary-stream
    handler through ``stream_wrapper`` (a generator around the stream's), when given."""
    handler = continuation(details)
    if handler is not None and handler.unary_stream is not None and stream_wrapper is not None:
        stream = handler.unary_stream

        def wrapped_stream(request: Any, context: grpc.ServicerContext) -> Any:
            return stream_wrapper(stream, request, context)

        return grpc.unary_stream_rpc_method_handler(
            wrapped_stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler is None or handler.unary_unary is None:
        return handler
    behavior = handler.unary_unary

    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        return wrapper(behavior, request, context)

    deserializer = handler.request_deserializer
    return grpc.unary_unary_rpc_method_handler(
        wrapped,
        request_deserializer=_tolerant(deserializer) if tolerant else deserializer,
        response_serializer=handler.response_serializer,
    )


def _is_recommender(details: grpc.HandlerCallDetails) -> bool:
    return details.method.startswith(SERVICE_PREFIX)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps domain errors to status codes; anything unexpected is INTERNAL, generic message.

    Request bytes that do not parse (malformed protobuf, invalid UTF-8 in a string field) are
    INVALID_ARGUMENT, not the INTERNAL gRPC would report for a failing deserializer.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if not _is_recommender(handler_call_details):
            return continuation(handler_call_details)
        method = handler_call_details.method

        def guarded(behavior: Behavior, request: Any, context: grpc.ServicerContext) -> Any:
            _refuse_malformed(request, method, context)
            try:
                return behavior(request, context)
            except Exception as exc:
                _abort_for(exc, method, context)

        handler = continuation(handler_call_details)
        if handler is not None and handler.unary_stream is not None:
            return _guard_stream(handler, method)
        return _wrap_unary(lambda _: handler, handler_call_details, guarded, tolerant=True)


def _guard_stream(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A unary-stream handler treated as the unary ones are: unparsable request bytes are
    INVALID_ARGUMENT, and a domain error raised while the stream runs (after this wrapper
    returned the generator) becomes its status code; anything else is INTERNAL."""
    stream = handler.unary_stream
    assert stream is not None

    def guarded(request: Any, context: grpc.ServicerContext) -> Any:
        _refuse_malformed(request, method, context)
        try:
            yield from stream(request, context)
        except Exception as exc:
            _abort_for(exc, method, context)

    return grpc.unary_stream_rpc_method_handler(
        guarded,
        request_deserializer=_tolerant(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


def _refuse_malformed(request: Any, method: str, context: grpc.ServicerContext) -> None:
    """INVALID_ARGUMENT for request bytes that did not parse (see :func:`_tolerant`)."""
    if isinstance(request, MalformedRequest):
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request is not a valid {method_name(method)} message ({request.reason})",
        )


def _abort_for(exc: Exception, method: str, context: grpc.ServicerContext) -> NoReturn:
    """End the call with ``exc``'s status code: a domain error's own, INTERNAL (a generic
    message, the details logged) for anything else; re-raises a status the handler chose."""
    if isinstance(exc, AffinityError):
        code = status_for(exc)
        if code is not None:
            context.abort(code, str(exc))
        logger.error("unexpected %s in %s", type(exc).__name__, method, exc_info=exc)
    elif _aborted(context):
        raise exc  # the handler already chose a status with context.abort
    else:
        logger.error("unhandled error in %s", method, exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, "internal error")


def _aborted(context: grpc.ServicerContext) -> bool:
    code = getattr(context, "code", lambda: None)()
    return code is not None and code != grpc.StatusCode.OK


class ConcurrencyLimitInterceptor(grpc.ServerInterceptor):
    """Refuses requests past ``limit`` in flight with RESOURCE_EXHAUSTED instead of queueing."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._in_flight = 0
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if not _is_recommender(handler_call_details):
            return continuation(handler_call_details)

        def limited(behavior: Behavior, request: Any, context: grpc.ServicerContext) -> Any:
            self._admit(context)
            try:
                return behavior(request, context)
            finally:
                self._leave()

        def limited_stream(behavior: Behavior, request: Any, context: grpc.ServicerContext) -> Any:
            self._admit(context)  # a stream holds its place until its last message is sent
            try:
                yield from behavior(request, context)
            finally:
                self._leave()

        return _wrap_unary(
            continuation, handler_call_details, limited, stream_wrapper=limited_stream
        )

    def _admit(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            admitted = self._in_flight < self.limit
            if admitted:
                self._in_flight += 1
        if not admitted:
            telemetry.REJECTED.inc()
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {self.limit} requests in flight; retry with backoff",
            )
        telemetry.IN_FLIGHT.inc()

    def _leave(self) -> None:
        telemetry.IN_FLIGHT.dec()
        with self._lock:
            self._in_flight -= 1


ADMIN_METHODS = frozenset(
    f"{SERVICE_PREFIX}{name}"
    for name in (
        "DeleteUser",
        "StartExperiment",
        "UpdateExperiment",
        "StopExperiment",
        "FindAudience",
    )
)
"""Methods that need the admin token; the read token is refused on them."""


class AuthInterceptor(grpc.ServerInterceptor):
    """Bearer-token auth: ``authorization: Bearer <token>``.

    Health checks always pass. Admin methods (:data:`ADMIN_METHODS`) need ``admin_token``: the
    read token gets PERMISSION_DENIED, and without an admin token configured they are refused
    outright. Every other method needs ``token`` (or ``admin_token``) when ``token`` is set.
    """

    def __init__(self, token: str | None, admin_token: str | None = None) -> None:
        self._expected = f"Bearer {token}".encode() if token is not None else None
        self._admin = f"Bearer {admin_token}".encode() if admin_token is not None else None

    @staticmethod
    def _bearer(details: grpc.HandlerCallDetails) -> bytes | None:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                return value.encode() if isinstance(value, str) else bytes(value)
        return None

    def _check(self, details: grpc.HandlerCallDetails) -> tuple[grpc.StatusCode, str] | None:
        """``None`` when the call may go on, else the status and message to refuse it with."""
        method = details.method
        if method.startswith(HEALTH_PREFIX):
            return None
        if method in ADMIN_METHODS:
            if self._admin is None:
                return (
                    grpc.StatusCode.PERMISSION_DENIED,
                    "admin RPCs are disabled on this server: set AFFINITY_ADMIN_TOKEN",
                )
            given = self._bearer(details)
            if given is not None and hmac.compare_digest(given, self._admin):
                return None
            if (
                given is not None
                and self._expected is not None
                and hmac.compare_digest(given, self._expected)
            ):
                return (
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{method_name(method)} needs the admin token, not the read token",
                )
            return grpc.StatusCode.UNAUTHENTICATED, "missing or invalid admin bearer token"
        if self._expected is None:
            return None
        given = self._bearer(details)
        if given is not None and (
            hmac.compare_digest(given, self._expected)
            or (self._admin is not None and hmac.compare_digest(given, self._admin))
        ):
            return None
        return grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token"

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        refusal = self._check(handler_call_details)
        if refusal is None:
            return continuation(handler_call_details)
        code, message = refusal
        handler = continuation(handler_call_details)
        if handler is None:
            return None

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(code, message)

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                deny,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                deny,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                deny,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            deny,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every Recommender request by method and final status code."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if not _is_recommender(handler_call_details):
            return continuation(handler_call_details)
        method = method_name(handler_call_details.method)

        def done(code: grpc.StatusCode, start: float) -> None:
            elapsed = time.perf_counter() - start
            telemetry.REQUESTS.labels(method=method, code=code.name).inc()
            telemetry.LATENCY.labels(method=method, code=code.name).observe(elapsed)
            if code != grpc.StatusCode.OK:
                logger.info(
                    "%s -> %s in %.1f ms",
                    method,
                    code.name,
                    elapsed * 1000,
                    extra={"method": method, "code": code.name, "latency_ms": elapsed * 1000},
                )

        def measured(behavior: Behavior, request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            try:
                response = behavior(request, context)
                code = grpc.StatusCode.OK
                return response
            except BaseException:
                code = getattr(context, "code", lambda: None)() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                done(code, start)

        def measured_stream(behavior: Behavior, request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()  # a stream is timed to its last message
            code = grpc.StatusCode.UNKNOWN
            try:
                yield from behavior(request, context)
                code = grpc.StatusCode.OK
            except GeneratorExit:  # the caller went away mid-stream
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = getattr(context, "code", lambda: None)() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                done(code, start)

        return _wrap_unary(
            continuation, handler_call_details, measured, stream_wrapper=measured_stream
        )
