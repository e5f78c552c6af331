"""``ssjf worker``: load the model, warm it up, then lease and generate until SIGTERM.

Start-up order is what readiness means: the gRPC server (health NOT_SERVING) comes up first
so probes get an answer, the model loads and runs a warm-up batch, and only then does health
turn SERVING and leasing begin. On SIGTERM the worker stops leasing, finishes the jobs it
holds and reports them (up to --drain-timeout-s), then exits; jobs still running at the
deadline are not lost: their leases lapse and the scheduler requeues them, to resume after
the last token they streamed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import socket

import torch

from services.common.config import host_options
from services.common.grpc_server import ServiceHost
from services.common.tls import ChannelSecurity
from services.pb import worker_pb2, worker_pb2_grpc
from services.worker.engine import Batching, Engine
from services.worker.gateway import GatewayClient
from services.worker.metrics import step_observer
from services.worker.model import load_model
from services.worker.runner import EngineRunner
from services.worker.servicer import WorkerIdentity, WorkerServicer

log = logging.getLogger(__name__)

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name


def make_worker_id() -> str:
    """Host, pid and a random suffix: unique across restarts and containers."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def served_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise SystemExit("--served-model-name needs at least one name")
    return names


async def serve(args: argparse.Namespace) -> None:
    # Checked before the model loads, so a typo costs a second, not a model load.
    for flag, value in (
        ("--max-batch-size", args.max_batch_size),
        ("--max-prefill-tokens", args.max_prefill_tokens),
        ("--max-batch-total-tokens", args.max_batch_total_tokens),
    ):
        if value < 1:
            raise SystemExit(f"{flag} must be at least 1, got {value}")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    identity = WorkerIdentity(
        worker_id=args.worker_id or make_worker_id(),
        llms=served_names(args.served_model_name),
        model=args.model,
        batching=args.batching,
        max_batch_size=1 if args.batching == "none" else args.max_batch_size,
    )
    servicer = WorkerServicer(identity)
    host = ServiceHost(
        "worker",
        service_names=[WORKER_SERVICE],
        registrars=[lambda server: worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)],
        **host_options(args),
    )
    await host.start()
    model = await asyncio.to_thread(load_model, args.model, args.device, args.dtype)
    identity.device, identity.dtype = str(model.device), str(model.dtype).removeprefix("torch.")
    engine = Engine(
        model,
        Batching(args.batching),
        args.max_batch_size,
        on_step=step_observer(identity.llms, args.batching, identity.max_batch_size),
        max_prefill_tokens=args.max_prefill_tokens,
        max_batch_total_tokens=args.max_batch_total_tokens,
    )
    await asyncio.to_thread(engine.warm_up)
    runner = EngineRunner(engine)
    identity.runner = runner
    runner.start()
    client = GatewayClient(
        runner,
        scheduler_address=args.scheduler,
        worker_id=identity.worker_id,
        llms=identity.llms,
        default_max_new_tokens=args.default_max_new_tokens,
        lease_wait_ms=args.lease_wait_ms,
        security=ChannelSecurity.from_args(args),
    )
    client.start()
    await host.set_ready()
    log.info(
        "worker serving",
        extra={
            "worker_id": identity.worker_id,
            "llms": identity.llms,
            "scheduler": args.scheduler,
            "batching": args.batching,
            "max_batch_total_tokens": args.max_batch_total_tokens,
            "kv_cache_budget_mib": args.max_batch_total_tokens * model.kv_bytes_per_token >> 20,
        },
    )
    try:
        await host.serve_until_signal(drain=client.drain, grace_s=args.drain_timeout_s)
    finally:
        await client.close()
        await runner.stop()
