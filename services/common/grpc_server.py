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
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from services.common.errors import ServiceError

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


async def _abort_for(error: ServiceError, context: grpc.aio.ServicerContext) -> None:
    await context.abort(getattr(grpc.StatusCode, error.status), str(error))


def _wrap_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """Map ServiceError to its status and log every call once, whatever its kind."""

    def finish(started: float, code: str) -> None:
        log.debug(
            "rpc",
            extra={"method": method, "code": code, "ms": (time.perf_counter() - started) * 1e3},
        )

    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                response = await inner(request, context)
            except ServiceError as error:
                finish(started, error.status)
                await _abort_for(error, context)
            finish(started, "OK")
            return response

        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
        behaviour = unary_response
    else:
        inner_stream = handler.unary_stream or handler.stream_stream

        async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                async for item in inner_stream(request, context):
                    yield item
            except ServiceError as error:
                finish(started, error.status)
                await _abort_for(error, context)
            finish(started, "OK")

        factory = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
        behaviour = stream_response
    return factory(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns domain errors into gRPC statuses, so servicers stay free of status plumbing."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith("/grpc."):
            return handler
        return _wrap_handler(handler, handler_call_details.method)


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
    ) -> None:
        self.name = name
        self.address = f"{host}:{port}"
        self.service_names = list(service_names)
        self.server = grpc.aio.server(
            interceptors=[ErrorInterceptor(), *interceptors], options=CHANNEL_OPTIONS
        )
        for register in registrars:
            register(self.server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [
                *self.service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        self.port = 0
        self._stop_requested = asyncio.Event()

    async def start(self) -> int:
        """Bind and start; health says NOT_SERVING until ``set_ready``. Returns the port."""
        self.port = self.server.add_insecure_port(self.address)
        if self.port == 0:
            raise OSError(f"{self.name}: cannot bind {self.address}")
        await self.server.start()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("listening", extra={"service": self.name, "port": self.port})
        return self.port

    async def set_ready(self) -> None:
        """Report SERVING: call after models are loaded and warmed up."""
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("ready", extra={"service": self.name, "port": self.port})

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
