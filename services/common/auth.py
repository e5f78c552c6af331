"""Authentication and per-tenant quotas as gRPC server interceptors.

``AuthInterceptor`` finds the principal of each call (a client's bearer token -> its tenant,
a worker's token or mTLS certificate -> a worker) and checks it may call the service:
a missing or unknown credential is UNAUTHENTICATED, the wrong kind of principal is
PERMISSION_DENIED. Servicers read the principal with ``current_principal()``. Health is
public (load balancers and probes carry no credentials); reflection needs a valid credential.

``QuotaInterceptor`` then applies the caller's tenant limits that live in one process:
requests per second (a token bucket) and open streaming calls. Both answer
RESOURCE_EXHAUSTED with a ``retry-after-ms`` trailer. The queued-jobs limit spans replicas
and is kept in Redis by the scheduler's core.

Without an ``--auth-file`` there is no AuthInterceptor: every caller is ``ANONYMOUS`` (tenant
"", may act as client and worker), which is what ``ssjf up`` on loopback runs with.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from services.common.errors import (
    LIMIT_MAX_STREAMS,
    LIMIT_REQUESTS_PER_S,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
)
from services.common.grpc_server import Behaviour, rewrap_handler
from services.common.principals import (
    ANONYMOUS,
    Credentials,
    CredentialsError,
    Kind,
    Principal,
    TenantLimits,
    token_digest,
)

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
_PRINCIPAL: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "ssjf_principal", default=ANONYMOUS
)


def current_principal() -> Principal:
    """The principal of the call being served (``ANONYMOUS`` when auth is off)."""
    return _PRINCIPAL.get()


class Authenticator:
    """Maps credentials to principals with the credentials file, read again when it changes
    (checked at most once per ``recheck_s``), so tokens are added and revoked without a
    restart. A file that turns malformed keeps the last good one and logs why."""

    def __init__(self, path: Path, recheck_s: float = 1.0) -> None:
        self.path = path
        self.recheck_s = recheck_s
        self._credentials = Credentials.load(path)
        self._stamp = path.stat().st_mtime_ns
        self._checked_at = time.monotonic()
        self._lock = threading.Lock()

    def credentials(self) -> Credentials:
        now = time.monotonic()
        if now - self._checked_at < self.recheck_s:
            return self._credentials
        with self._lock:
            self._checked_at = now
            try:
                stamp = self.path.stat().st_mtime_ns
                if stamp != self._stamp:
                    self._credentials = Credentials.load(self.path)
                    self._stamp = stamp
                    log.info("credentials reloaded", extra={"auth_file": str(self.path)})
            except (OSError, CredentialsError) as error:
                log.warning("cannot reload credentials, keeping the old ones",
                            extra={"error": str(error)})  # fmt: skip
        return self._credentials

    def authenticate(
        self, metadata: Sequence[tuple[str, Any]] | None, common_names: Iterable[str]
    ) -> Principal:
        credentials = self.credentials()
        authorization = [value for key, value in metadata or () if key == "authorization"]
        if authorization:
            scheme, _, token = str(authorization[0]).partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
            principal = credentials.by_token_digest.get(token_digest(token.strip()))
            if principal is None:
                raise Unauthenticated("the bearer token is not valid (unknown or revoked)")
            return principal
        for name in common_names:
            principal = credentials.workers_by_common_name.get(name)
            if principal is not None:
                return principal
        raise Unauthenticated(
            "no credential: send 'authorization: Bearer <token>' metadata "
            "(workers may present a client certificate instead)"
        )


def _service_of(method: str) -> str:
    """``/pkg.Service/Method`` -> ``pkg.Service``."""
    return method.split("/")[1] if method.count("/") >= 2 else ""


def _peer_common_names(context: grpc.aio.ServicerContext) -> list[str]:
    """Common names of the verified client certificate (empty without mutual TLS)."""
    names = context.auth_context().get("x509_common_name", [])
    return [name.decode() if isinstance(name, bytes) else str(name) for name in names]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call but health; ``required`` maps a service's full name to the
    kind of principal it serves (services not named accept any valid principal)."""

    def __init__(self, authenticator: Authenticator, required: dict[str, Kind]) -> None:
        self.authenticator = authenticator
        self.required = required

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        service = _service_of(details.method)
        if handler is None or service == HEALTH_SERVICE:
            return handler
        needed = self.required.get(service)
        metadata = details.invocation_metadata

        def check(context: grpc.aio.ServicerContext) -> None:
            principal = self.authenticator.authenticate(metadata, _peer_common_names(context))
            if needed is not None and not principal.may_act_as(needed):
                raise PermissionDenied(
                    f"{service} serves {needed.value}s; a {principal.kind.value} credential "
                    "is not accepted here"
                )
            _PRINCIPAL.set(principal)

        return rewrap_handler(handler, details.method, lambda b, m, s: _before(b, s, check))


def _before(
    behaviour: Behaviour, streaming: bool, check: Callable[[grpc.aio.ServicerContext], None]
) -> Behaviour:
    """``behaviour`` that first runs ``check`` (which raises to refuse the call). Refusals
    abort here: reflection, which is guarded too, is outside the error interceptor."""

    async def admit(context: grpc.aio.ServicerContext) -> None:
        try:
            check(context)
        except ServiceError as refused:
            log.info("call refused", extra={"code": refused.status, "why": str(refused)})
            await context.abort(getattr(grpc.StatusCode, refused.status), str(refused))

    if streaming:

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await admit(context)
            async for item in behaviour(request, context):
                yield item

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await admit(context)
        return await behaviour(request, context)

    return unary


class _Bucket:
    """A token bucket: ``rate`` requests per second, up to ``capacity`` at once."""

    def __init__(self) -> None:
        self.tokens = -1.0  # filled on first use
        self.updated = time.monotonic()

    def take(self, rate: float, capacity: float) -> float:
        """0 when a request may go now, else the seconds until it may."""
        now = time.monotonic()
        if self.tokens < 0:
            self.tokens = capacity
        self.tokens = min(capacity, self.tokens + (now - self.updated) * rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / rate


class QuotaInterceptor(grpc.aio.ServerInterceptor):
    """Per-tenant requests/s and concurrent streams for clients of ``services`` (this
    replica's share: with N replicas behind a balancer a tenant gets up to N times each)."""

    def __init__(self, services: Iterable[str]) -> None:
        self.services = set(services)
        self._buckets: dict[str, _Bucket] = {}
        self._streams: dict[str, int] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or _service_of(details.method) not in self.services:
            return handler
        return rewrap_handler(handler, details.method, self._limit)

    def _admit(self) -> TenantLimits | None:
        principal = current_principal()
        if principal.kind is not Kind.CLIENT:
            return None
        limits = principal.limits
        if limits.requests_per_s > 0:
            capacity = limits.burst or max(1.0, limits.requests_per_s)
            bucket = self._buckets.setdefault(principal.tenant, _Bucket())
            wait_s = bucket.take(limits.requests_per_s, capacity)
            if wait_s > 0:
                raise ResourceExhausted(
                    f"tenant {principal.tenant!r} is over its {limits.requests_per_s:g} "
                    f"requests/s; retry in {wait_s:.2f} s",
                    retry_after_s=wait_s,
                    limit=LIMIT_REQUESTS_PER_S,
                )
        return limits

    def _limit(self, behaviour: Behaviour, method: str, streaming: bool) -> Behaviour:
        if not streaming:

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                self._admit()
                return await behaviour(request, context)

            return unary

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            limits = self._admit()
            if limits is None or not limits.max_streams:
                async for item in behaviour(request, context):
                    yield item
                return
            tenant = current_principal().tenant
            if self._streams.get(tenant, 0) >= limits.max_streams:
                raise ResourceExhausted(
                    f"tenant {tenant!r} already has {limits.max_streams} open streams "
                    "(its limit); close one, or retry in 1 s",
                    retry_after_s=1.0,
                    limit=LIMIT_MAX_STREAMS,
                )
            self._streams[tenant] = self._streams.get(tenant, 0) + 1
            try:
                async for item in behaviour(request, context):
                    yield item
            finally:
                self._streams[tenant] -= 1

        return stream


def security_interceptors(
    auth_file: str, required: dict[str, Kind], quota_services: Iterable[str] = ()
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors for ``--auth-file`` (none when it is empty: auth off)."""
    if not auth_file:
        return []
    try:
        authenticator = Authenticator(Path(auth_file))
    except (OSError, CredentialsError) as error:
        raise SystemExit(f"--auth-file: {error}") from None
    interceptors: list[grpc.aio.ServerInterceptor] = [AuthInterceptor(authenticator, required)]
    if quota_services:
        interceptors.append(QuotaInterceptor(quota_services))
    return interceptors
