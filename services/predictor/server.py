"""The predictor service process: load the artifact, warm up, then serve over gRPC."""

from __future__ import annotations

import argparse
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
    )
    host = predictor_host(predictor, **host_options(args))
    await host.start()  # health answers NOT_SERVING while the model warms up
    await predictor.start()
    await host.set_ready()
    await host.serve_until_signal(drain=predictor.stop)
