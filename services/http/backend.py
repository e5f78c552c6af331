"""The front's side of the scheduler's gRPC API: one channel, the calls, the model catalog.

Everything that decides (ordering, cancellation, leases, validation of what the scheduler
owns) stays in the scheduler; this module only carries requests there and answers back.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace

import grpc

from services.common.channels import dial_aio
from services.common.grpc_server import CHANNEL_OPTIONS
from services.common.tls import ChannelSecurity
from services.http.errors import from_grpc, model_not_found, no_worker
from services.pb import scheduler_pb2, scheduler_pb2_grpc

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Catalog:
    """The scheduler's ListModels(include_offline) answer: live models and known ones."""

    models: tuple[scheduler_pb2.ServedModel, ...]
    fetched_at: float

    @property
    def live(self) -> list[scheduler_pb2.ServedModel]:
        return [model for model in self.models if model.workers > 0]

    def workers(self, model: str) -> int | None:
        """Live workers serving ``model``; None when the model is unknown."""
        for served in self.models:
            if served.llm == model:
                return served.workers
        return None


class SchedulerBackend:
    """A gRPC client of the scheduler, shared by every request of this front process."""

    def __init__(
        self,
        address: str,
        *,
        catalog_ttl_s: float = 1.0,
        security: ChannelSecurity | None = None,
    ) -> None:
        self.address = address
        # TLS to the scheduler; never a token of the front's own: each call carries its
        # caller's (the forwarded Authorization header).
        self.security = replace(security or ChannelSecurity.from_env(), token="", token_file="")
        self.catalog_ttl_s = catalog_ttl_s
        # Made in start(): a grpc.aio channel belongs to the event loop it is made on.
        self._channel: grpc.aio.Channel | None = None
        self.stub: scheduler_pb2_grpc.SchedulerStub = None  # type: ignore[assignment]
        self._catalog: Catalog | None = None
        self._refreshing: asyncio.Task[Catalog | None] | None = None
        # False once the scheduler answered UNIMPLEMENTED (an older scheduler): the front
        # then leaves unknown models to the scheduler's own answer.
        self.catalog_supported = True

    async def start(self) -> None:
        # round_robin: a DNS name with several scheduler replicas (a headless Service)
        # spreads the front's calls over all of them instead of pinning one.
        options = [*CHANNEL_OPTIONS, ("grpc.lb_policy_name", "round_robin")]
        self._channel = dial_aio(self.address, self.security, options)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def list_models(self, metadata: Metadata = ()) -> Catalog:
        reply = await self.stub.ListModels(
            scheduler_pb2.ListModelsRequest(include_offline=True), metadata=metadata, timeout=10
        )
        return Catalog(tuple(reply.models), time.monotonic())

    async def catalog(
        self, metadata: Metadata = (), max_age_s: float | None = None
    ) -> Catalog | None:
        """The cached catalog, refreshed once it is older than ``max_age_s`` (default
        ``catalog_ttl_s``) by one call that concurrent requests share."""
        cached = self._catalog
        max_age_s = self.catalog_ttl_s if max_age_s is None else max_age_s
        if cached is not None and time.monotonic() - cached.fetched_at < max_age_s:
            return cached
        if not self.catalog_supported:
            return None
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh(metadata))
        return await asyncio.shield(self._refreshing)

    async def _refresh(self, metadata: Metadata) -> Catalog | None:
        try:
            self._catalog = await self.list_models(metadata)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.catalog_supported = False
                return None
            if error.code() in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
            ):
                # The refresh ran with one client's credentials and is shared by concurrent
                # requests: a refusal of those credentials is not theirs to answer. Skip the
                # check; Generate, under each request's own credentials, answers 401/403.
                return None
            raise from_grpc(error) from None
        return self._catalog

    async def fresh_catalog(self, metadata: Metadata) -> Catalog | None:
        """The scheduler's list now, asked with this request's own credentials (its refusal
        is this request's 401/403); it also renews the shared cache."""
        try:
            self._catalog = await self.list_models(metadata)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise from_grpc(error) from None
        return self._catalog

    async def check_served(self, model: str, metadata: Metadata = ()) -> None:
        """Raise 404 for a model no worker ever served (lately), 503 for one no live worker
        serves now; pass when the catalog is unavailable (the scheduler decides)."""
        catalog = await self.catalog(metadata)
        if catalog is None:
            return
        workers = catalog.workers(model)
        if workers:
            return
        # Not served as far as the cache knows: look again (a worker may have just started),
        # with this request's own credentials: the cache was filled under someone else's, and
        # a caller the scheduler would refuse must get its 401/403, not learn what is served.
        catalog = await self.fresh_catalog(metadata)
        if catalog is None:
            return
        workers = catalog.workers(model)
        if workers:
            return
        raise model_not_found(model) if workers is None else no_worker(model)
