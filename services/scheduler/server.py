"""Runs one scheduler replica: Redis store, policy, predictor client, gRPC host, reaper."""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import replace
from pathlib import Path

from services.common.auth import security_interceptors
from services.common.config import host_options, redis_url
from services.common.errors import FailedPrecondition
from services.common.first_stage import FirstStageModel
from services.common.grpc_server import ServiceHost
from services.common.principals import Kind
from services.common.redis_store import connect
from services.common.tls import ChannelSecurity
from services.pb import scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.core import SchedulerConfig, SchedulerCore
from services.scheduler.metrics import refresh_queue_metrics
from services.scheduler.policies import make_policy
from services.scheduler.prediction import PredictionMode
from services.scheduler.predictor_client import CircuitBreaker, PredictorClient
from services.scheduler.servicer import SchedulerServicer, WorkerGatewayServicer
from services.scheduler.store import JobStore, StoreSettings

log = logging.getLogger(__name__)

SCHEDULER_SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name
GATEWAY_SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["WorkerGateway"].full_name
SERVICE_NAMES = [SCHEDULER_SERVICE, GATEWAY_SERVICE]
# Which principal each service serves: clients never reach the WorkerGateway, workers never
# the client API.
REQUIRED_KIND = {SCHEDULER_SERVICE: Kind.CLIENT, GATEWAY_SERVICE: Kind.WORKER}


def _hosts(
    args: argparse.Namespace, scheduler: SchedulerServicer, gateway: WorkerGatewayServicer
) -> list[ServiceHost]:
    """One server for clients and workers, or two when --worker-port sets the gateway apart."""
    interceptors = security_interceptors(args.auth_file, REQUIRED_KIND, [SCHEDULER_SERVICE])
    add_scheduler = lambda server: scheduler_pb2_grpc.add_SchedulerServicer_to_server(  # noqa: E731
        scheduler, server
    )
    add_gateway = lambda server: scheduler_pb2_grpc.add_WorkerGatewayServicer_to_server(  # noqa: E731
        gateway, server
    )
    options = host_options(args)
    if args.worker_port < 0:
        return [
            ServiceHost("scheduler", service_names=SERVICE_NAMES, interceptors=interceptors,
                        registrars=[add_scheduler, add_gateway], **options)
        ]  # fmt: skip
    worker_tls = options["tls"]
    if worker_tls is not None and args.worker_tls_client_ca_file:
        worker_tls = replace(worker_tls, client_ca_file=Path(args.worker_tls_client_ca_file))
    worker_options = {
        **options,
        "host": args.worker_host or args.host,
        "port": args.worker_port,
        "metrics_port": None,
        "tls": worker_tls,
    }
    return [
        ServiceHost("scheduler", service_names=[SCHEDULER_SERVICE], interceptors=interceptors,
                    registrars=[add_scheduler], **options),
        ServiceHost("worker-gateway", service_names=[GATEWAY_SERVICE],
                    interceptors=interceptors, registrars=[add_gateway], **worker_options),
    ]  # fmt: skip


async def serve(args: argparse.Namespace) -> None:
    url = redis_url(args)
    if not url:
        raise FailedPrecondition("the scheduler needs --redis-url-file, REDIS_URL or --redis-url")
    if args.max_attempts < 1 or args.lease_ttl_s <= 0 or args.job_ttl_s < 1:
        raise FailedPrecondition("--max-attempts, --lease-ttl-s and --job-ttl-s must be positive")
    redis = connect(url)
    await redis.ping()
    store = JobStore(
        redis,
        StoreSettings(
            job_ttl_s=args.job_ttl_s,
            lease_ttl_s=args.lease_ttl_s,
            max_attempts=args.max_attempts,
            completions_maxlen=args.completions_maxlen,
        ),
    )
    predictor = (
        PredictorClient(
            args.predictor,
            args.predictor_timeout_ms / 1e3,
            ChannelSecurity.from_args(args),
            max_predicted_tokens=args.max_predicted_tokens,
            breaker=CircuitBreaker(args.breaker_failures, args.breaker_open_s),
        )
        if args.predictor
        else None
    )
    first_stage = _load_first_stage(args.first_stage)
    core = SchedulerCore(
        store,
        make_policy(args.policy, args.aging_rate),
        SchedulerConfig(
            default_llm=args.default_llm,
            max_prompt_chars=args.max_prompt_chars,
            max_queue_depth=args.max_queue_depth,
            max_wait_s=args.max_wait_s,
            fallback_tokens=args.fallback_tokens,
            allow_oracle=args.allow_oracle,
            reap_interval_s=args.reap_interval_s,
            default_start_timeout_s=args.default_start_timeout_s,
            prediction_mode=PredictionMode(args.prediction_mode),
            prediction_grace_s=args.prediction_grace_ms / 1e3,
        ),
        predictor,
        first_stage,
    )
    scheduler = SchedulerServicer(core)
    gateway = WorkerGatewayServicer(core)
    host, *other_hosts = _hosts(args, scheduler, gateway)
    for each in (host, *other_hosts):
        await each.start()
    background = [asyncio.create_task(core.run_reaper())]
    if args.metrics_port:
        background.append(asyncio.create_task(refresh_queue_metrics(core)))
    log.info(
        "scheduler configured",
        extra={
            "policy": args.policy,
            "aging_rate": args.aging_rate,
            "max_wait_s": args.max_wait_s,
            "predictor": args.predictor or None,
            "lease_ttl_s": args.lease_ttl_s,
            "max_attempts": args.max_attempts,
            "auth": "on" if args.auth_file else "off: every caller is trusted",
            "worker_port": other_hosts[0].port if other_hosts else host.port,
        },
    )
    if not args.auth_file and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "auth is off on a non-loopback interface: anyone who reaches this port can read "
            "every job and act as a worker (set --auth-file, see SECURITY.md)",
            extra={"host": args.host},
        )
    for each in (host, *other_hosts):
        await each.set_ready()

    async def drain() -> None:
        # Refuse new submissions, release waiting leases, stop the reaper (the other
        # replicas' reapers carry on); streams end with the server and clients resume
        # elsewhere with Stream.
        core.stop()
        await asyncio.gather(*background)
        if core.predictions is not None:
            await core.predictions.drain(timeout_s=1.0)
        for other in other_hosts:
            await other.server.stop(grace=min(args.drain_s, 5.0))

    try:
        await host.serve_until_signal(drain=drain, grace_s=args.drain_s)
    finally:
        for task in background:
            task.cancel()
        if predictor is not None:
            await predictor.close()
        await store.close()
        await redis.aclose()


def _load_first_stage(path: str) -> FirstStageModel | None:
    if not path:
        return None
    if not Path(path).exists():
        log.warning(
            "no first-stage model; jobs wait in the queue with the fallback score "
            "until their prediction arrives",
            extra={"path": path},
        )
        return None
    model = FirstStageModel.load(Path(path))
    log.info(
        "first-stage model loaded", extra={"version": model.version, "heads": len(model.heads)}
    )
    return model


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve(args))
    return 0
