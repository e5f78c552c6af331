"""The predictor service process: load the artifact, warm up, then serve over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from services.common.config import host_options
from services.common.grpc_server import ServiceHost
from services.predictor.core import LengthPredictor
from services.predictor.runtime import ArtifactRuntime
from services.predictor.servicer import SERVICE_NAME, PredictorServicer

log = logging.getLogger(__name__)


def predictor_host(
    predictor: LengthPredictor,
    *,
    host: str,
    port: int,
    metrics_port: int | None = None,
    **security: Any,
) -> ServiceHost:
    """A gRPC server for ``predictor`` (not started): the service, the bench and tests.
    ``security``: ServiceHost's ``tls`` and ``reflection``."""
    return ServiceHost(
        "predictor",
        host=host,
        port=port,
        service_names=[SERVICE_NAME],
        registrars=[PredictorServicer(predictor).register],
        metrics_port=metrics_port,
        **security,
    )


async def serve(args: argparse.Namespace) -> None:
    runtime = ArtifactRuntime(args.artifact, intra_op_threads=args.threads or None)
    predictor = LengthPredictor(
        runtime,
        max_batch_size=args.max_batch_size,
        max_wait_s=args.max_wait_ms / 1000.0,
        max_batch_request=args.max_batch_request,
        cache_size=args.cache_size,
    )
    host = predictor_host(predictor, **host_options(args))
    await host.start()  # health answers NOT_SERVING while the model warms up
    await predictor.start()
    await host.set_ready()
    watchdog = asyncio.create_task(_not_serving_when_batcher_dies(predictor, host))
    try:
        await host.serve_until_signal(drain=predictor.stop)
    finally:
        watchdog.cancel()


async def _not_serving_when_batcher_dies(predictor: LengthPredictor, host: ServiceHost) -> None:
    """A dead batch loop answers nothing: say so, so load balancers and orchestrators route
    around this replica and restart it."""
    await predictor.batcher.failed.wait()
    log.error("predictor batch loop died: health is NOT_SERVING")
    await host.set_not_serving()
