"""Serving any SSJF service: grpc.aio with health, reflection, interceptors and clean stop.

Each service's ``main`` builds its servicers over its domain core and hands them to a
``ServiceHost``; everything every server needs (status mapping, access logs, the standard
health service, reflection, signal handling) lives here once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection as grpc_reflection
from prometheus_client import Counter, Histogram, start_http_server

from services.common.errors import (
    LIMIT_TRAILER,
    RETRY_AFTER_TRAILER,
    InvalidArgument,
    ServiceError,
)

if TYPE_CHECKING:
    from services.common.tls import ServerTls

log = logging.getLogger(__name__)

# Prompts are small, but PredictBatch and long answers can exceed gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
# Servers accept the keepalive pings CHANNEL_OPTIONS make clients send (every 20 s, also on a
# connection whose streams are idle, e.g. a Generate waiting in the queue). gRPC's server
# default allows one such ping per 5 minutes and then answers GOAWAY "too_many_pings",
# which cancelled every call on the connection.
SERVER_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    # Calls that arrived but are not yet picked up by the server's loop: gRPC's defaults
    # (1,000, hard limit 3,000) cancelled a burst of thousands of new calls (clients
    # reconnecting after a replica restart); they wait their turn instead.
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 40_000),
    # ... for as long as the client's own deadline allows, not gRPC's 30 s (a busy replica,
    # e.g. thousands of streams ending at once on a starved CPU, picks calls up late).
    ("grpc.server_max_unrequested_time_in_server", 600),
]


RPC_REQUESTS = Counter(
    "ssjf_rpc_requests_total", "gRPC calls handled, by method and status code", ["method", "code"]
)
RPC_SECONDS = Histogram(
    "ssjf_rpc_duration_seconds",
    "Time from a call's start to its last response, by method",
    ["method"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30, 120, 600),
)

Behaviour = Callable[[Any, grpc.aio.ServicerContext], Any]
# Wraps one RPC's behaviour; ``streaming`` tells whether it yields responses.
BehaviourWrapper = Callable[[Behaviour, str, bool], Behaviour]


class Undecodable:
    """Stands for a request message that failed to parse (malformed protobuf, invalid UTF-8
    in a string field): the error mapping answers it with INVALID_ARGUMENT, where gRPC
    itself would answer UNKNOWN or INTERNAL."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:
            return Undecodable(error)

    return deserialize


def _rewrap(
    handler: grpc.RpcMethodHandler,
    method: str,
    wrap: BehaviourWrapper,
    tolerant: bool = False,
) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped, whichever of the four RPC kinds it is."""
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
    )
    for attribute, factory, streaming in kinds:
        behaviour = getattr(handler, attribute)
        if behaviour is not None:
            deserializer = handler.request_deserializer
            return factory(
                wrap(behaviour, method, streaming),
                request_deserializer=_tolerant(deserializer) if tolerant else deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


class _WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Applies ``wrap`` to every application RPC (not health or reflection)."""

    wrap: BehaviourWrapper
    tolerant = False  # whether undecodable requests reach ``wrap`` (as Undecodable)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith("/grpc."):
            return handler
        return _rewrap(handler, handler_call_details.method, type(self).wrap, self.tolerant)


# Longest status message sent: a message quoting a huge client value would otherwise exceed
# the metadata limit, and the client would see RESOURCE_EXHAUSTED instead of the reason.
MAX_STATUS_DETAILS_CHARS = 2000


def _undecodable(error: Undecodable) -> ServiceError:
    return InvalidArgument(f"the request message could not be parsed: {error.error}")


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise _undecodable(request)
        yield request


def _map_errors(behaviour: Behaviour, method: str, streaming: bool) -> Behaviour:
    def refuse(error: ServiceError, context: grpc.aio.ServicerContext) -> None:
        """Set the error's status and return normally rather than `context.abort`: abort
        sends the status at once, before the outer interceptors (metrics) finish, so a
        client could see its error before the error counter moved."""
        details = str(error)
        if len(details) > MAX_STATUS_DETAILS_CHARS:
            details = details[:MAX_STATUS_DETAILS_CHARS] + "... (cut)"
        log.info("rpc refused", extra={"method": method, "code": error.status, "why": details})
        trailers = []
        retry_after_s = getattr(error, "retry_after_s", None)
        if retry_after_s is not None:
            trailers.append((RETRY_AFTER_TRAILER, str(max(1, round(retry_after_s * 1e3)))))
        limit = getattr(error, "limit", None)
        if limit:
            trailers.append((LIMIT_TRAILER, limit))
        context.set_code(getattr(grpc.StatusCode, error.status))
        context.set_details(details)
        if trailers:
            context.set_trailing_metadata(tuple(trailers))

    def checked(request: Any) -> Any:
        if isinstance(request, Undecodable):
            raise _undecodable(request)
        if hasattr(request, "__aiter__"):  # a client-streaming call's requests
            return _checked(request)
        return request

    if streaming:

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for item in behaviour(checked(request), context):
                    yield item
            except ServiceError as error:
                refuse(error, context)

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(checked(request), context)
        except ServiceError as error:
            refuse(error, context)
            return None

    return unary


class ErrorInterceptor(_WrappingInterceptor):
    """Turns domain errors into gRPC statuses, so servicers stay free of status plumbing."""

    wrap = staticmethod(_map_errors)
    tolerant = True


# For interceptors elsewhere (services/common/auth.py) that wrap handlers the same way.
rewrap_handler = _rewrap


def _status_of(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    code = context.code()
    if code is not None:
        return code.name
    return "UNKNOWN" if error is not None else "OK"


def _measure(behaviour: Behaviour, method: str, streaming: bool) -> Behaviour:
    def record(started: float, context: grpc.aio.ServicerContext, error: BaseException | None):
        RPC_SECONDS.labels(method).observe(time.perf_counter() - started)
        RPC_REQUESTS.labels(method, _status_of(context, error)).inc()

    if streaming:

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started, error = time.perf_counter(), None
            try:
                async for item in behaviour(request, context):
                    yield item
            except BaseException as raised:
                error = raised
                raise
            finally:
                record(started, context, error)

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started, error = time.perf_counter(), None
        try:
            return await behaviour(request, context)
        except BaseException as raised:
            error = raised
            raise
        finally:
            record(started, context, error)

    return unary


class MetricsInterceptor(_WrappingInterceptor):
    """Counts calls by status and times them, for every service alike (Prometheus)."""

    wrap = staticmethod(_measure)


Registrar = Callable[[grpc.aio.Server], None]


class ServiceHost:
    """One gRPC server process: bind, report health, stop cleanly on SIGTERM/SIGINT."""

    def __init__(
        self,
        name: str,
        *,
        host: str,
        port: int,
        service_names: Iterable[str],
        registrars: Iterable[Registrar],
        interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
        metrics_port: int | None = None,
        tls: ServerTls | None = None,
        reflection: bool = True,
    ) -> None:
        self.name = name
        self.host = host
        self.address = f"{host}:{port}"
        self.tls = tls
        self.service_names = list(service_names)
        # Metrics outermost, so they see the status the error mapping produced.
        self.server = grpc.aio.server(
            interceptors=[MetricsInterceptor(), ErrorInterceptor(), *interceptors],
            options=SERVER_OPTIONS,
        )
        for register in registrars:
            register(self.server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if reflection:
            # Lists only the services of this server (a separate worker port keeps the
            # WorkerGateway out of the client port's list); with auth on, it needs a
            # credential like any other call.
            grpc_reflection.enable_server_reflection(
                [
                    *self.service_names,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    grpc_reflection.SERVICE_NAME,
                ],
                self.server,
            )
        self.metrics_port = metrics_port
        self.port = 0
        self._stop_requested = asyncio.Event()

    async def start(self) -> int:
        """Bind and start; health says NOT_SERVING until ``set_ready``. Returns the port."""
        if self.tls is not None:
            from services.common.channels import server_credentials

            self.port = self.server.add_secure_port(self.address, server_credentials(self.tls))
        else:
            self.port = self.server.add_insecure_port(self.address)
        if self.port == 0:
            raise OSError(f"{self.name}: cannot bind {self.address}")
        await self.server.start()
        if self.metrics_port is not None:
            # Prometheus scrapes http(s)://host:metrics_port/metrics, on the same interface
            # as the gRPC port, and over TLS (client certificates required under mTLS) when
            # the gRPC port has TLS.
            tls = self.tls
            start_http_server(
                self.metrics_port,
                addr=self.host,
                certfile=str(tls.cert_file) if tls else None,
                keyfile=str(tls.key_file) if tls else None,
                client_cafile=str(tls.client_ca_file) if tls and tls.client_ca_file else None,
                client_auth_required=bool(tls and tls.client_ca_file),
            )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info(
            "listening",
            extra={
                "service": self.name,
                "port": self.port,
                "tls": "off" if self.tls is None else "mtls" if self.tls.client_ca_file else "on",
            },
        )
        return self.port

    async def set_ready(self) -> None:
        """Report SERVING: call after models are loaded and warmed up."""
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("ready", extra={"service": self.name, "port": self.port})

    async def set_not_serving(self) -> None:
        """Report NOT_SERVING: the service can no longer answer (e.g. its model loop died)."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _set_health(self, status: int) -> None:
        for service in ["", *self.service_names]:
            await self.health.set(service, status)

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def serve_until_signal(
        self, drain: Callable[[], Awaitable[None]] | None = None, grace_s: float = 30.0
    ) -> None:
        """Serve until SIGTERM/SIGINT; then stop taking work, drain, and stop the server."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)
        await self._stop_requested.wait()
        log.info("stopping", extra={"service": self.name})
        # Load balancers and workers see NOT_SERVING first, so no new work arrives.
        await self.health.enter_graceful_shutdown()
        if drain is not None:
            try:
                await asyncio.wait_for(drain(), timeout=grace_s)
            except TimeoutError:
                log.warning("drain timed out", extra={"service": self.name, "grace_s": grace_s})
        await self.server.stop(grace=min(grace_s, 5.0))
        log.info("stopped", extra={"service": self.name})
