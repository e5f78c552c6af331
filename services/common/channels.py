"""gRPC credentials and channels for the settings of services/common/tls.py: server
credentials that follow certificate rotation, and ``dial``/``dial_aio``, the one way every
SSJF client (worker, scheduler -> predictor, ``ssjf generate``, benches, health checks)
opens a channel."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from services.common.tls import ChannelSecurity, ServerTls, TokenSource

log = logging.getLogger(__name__)


def _read_server_config(tls: ServerTls) -> Any:
    return grpc.ssl_server_certificate_configuration(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=tls.client_ca_file.read_bytes() if tls.client_ca_file else None,
    )


def _stamp(paths: list[Path]) -> tuple[float, ...]:
    return tuple(path.stat().st_mtime_ns for path in paths)


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """Credentials that re-read the certificate files on the first handshake after they
    change; a half-written rotation (unreadable or mismatched files) keeps the old ones."""
    state = {"stamp": _stamp(tls.files())}

    def fetch() -> Any:
        try:
            stamp = _stamp(tls.files())
            if stamp == state["stamp"]:
                return None  # unchanged: gRPC keeps the current configuration
            config = _read_server_config(tls)
        except (OSError, ValueError) as error:
            log.warning(
                "cannot reload TLS files, keeping the old ones", extra={"error": str(error)}
            )
            return None
        state["stamp"] = stamp
        log.info("TLS certificate reloaded", extra={"cert_file": str(tls.cert_file)})
        return config

    return grpc.dynamic_ssl_server_credentials(
        _read_server_config(tls),
        fetch,
        require_client_authentication=tls.client_ca_file is not None,
    )


def channel_credentials(security: ChannelSecurity) -> grpc.ChannelCredentials:
    read = lambda name: Path(name).read_bytes() if name else None  # noqa: E731
    if bool(security.client_cert_file) != bool(security.client_key_file):
        raise SystemExit("a TLS client certificate needs both its cert and key files")
    return grpc.ssl_channel_credentials(
        root_certificates=read(security.ca_file),
        private_key=read(security.client_key_file),
        certificate_chain=read(security.client_cert_file),
    )


class _TokenInterceptor:
    """Adds the bearer token to every call (works with and without TLS, unlike gRPC's call
    credentials, which refuse plaintext channels)."""

    def __init__(self, tokens: TokenSource) -> None:
        self._tokens = tokens

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return details._replace(metadata=(*(details.metadata or ()), *self._tokens.metadata()))


# grpc.aio files each interceptor under the first call kind it implements: one class each.
class _TokenUnaryUnary(_TokenInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Callable, details: Any, request: Any
    ) -> Any:
        return await continuation(self._with_token(details), request)


class _TokenUnaryStream(_TokenInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Callable, details: Any, request: Any
    ) -> Any:
        return await continuation(self._with_token(details), request)


class _TokenStreamUnary(_TokenInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Callable, details: Any, requests: Any
    ) -> Any:
        return await continuation(self._with_token(details), requests)


class _TokenStreamStream(_TokenInterceptor, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self, continuation: Callable, details: Any, requests: Any
    ) -> Any:
        return await continuation(self._with_token(details), requests)


def _token_interceptors(tokens: TokenSource) -> list[Any]:
    kinds = (_TokenUnaryUnary, _TokenUnaryStream, _TokenStreamUnary, _TokenStreamStream)
    return [kind(tokens) for kind in kinds]


class _AttachTokenSync(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """The blocking API's token interceptor (which, unlike grpc.aio, takes all four kinds)."""

    def __init__(self, tokens: TokenSource) -> None:
        self._tokens = tokens

    def _with_token(self, details: Any) -> Any:
        return _SyncDetails(
            details.method,
            details.timeout,
            (*(details.metadata or ()), *self._tokens.metadata()),
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Callable, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation: Callable, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)


@dataclass(frozen=True)
class _SyncDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


def dial_aio(
    address: str,
    security: ChannelSecurity | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to ``address``: TLS and token per ``security`` (default: the
    SSJF_TLS_* / SSJF_TOKEN* environment)."""
    security = security if security is not None else ChannelSecurity.from_env()
    interceptors = _token_interceptors(TokenSource(security)) if security.token else None
    if security.tls:
        return grpc.aio.secure_channel(
            address, channel_credentials(security), options=security.options(options),
            interceptors=interceptors,
        )  # fmt: skip
    return grpc.aio.insecure_channel(
        address, options=security.options(options), interceptors=interceptors
    )


def dial(
    address: str,
    security: ChannelSecurity | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> grpc.Channel:
    """``dial_aio`` for blocking code (the ``ssjf generate`` terminal client, health checks)."""
    security = security if security is not None else ChannelSecurity.from_env()
    if security.tls:
        channel = grpc.secure_channel(
            address, channel_credentials(security), options=security.options(options)
        )
    else:
        channel = grpc.insecure_channel(address, options=security.options(options))
    if security.token:
        return grpc.intercept_channel(channel, _AttachTokenSync(TokenSource(security)))
    return channel
