"""The shared server host: domain errors become statuses, metrics count them, health flips."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from services.common.errors import InvalidArgument, NotFound
from services.common.grpc_server import ServiceHost
from services.pb import (
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)


class RefusingWorker(worker_pb2_grpc.WorkerServicer):
    async def GetWorkerInfo(self, request, context):
        raise InvalidArgument("the request names no worker, which a person can fix")


class OneTokenThenMissing(scheduler_pb2_grpc.SchedulerServicer):
    async def Stream(self, request, context) -> AsyncIterator[scheduler_pb2.JobEvent]:
        yield scheduler_pb2.JobEvent(job_id=request.job_id, token=common_pb2.Token(index=0))
        raise NotFound(f"job {request.job_id} expired")


def count(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value("ssjf_rpc_requests_total", {"method": method, "code": code})
    return value or 0.0


@pytest.fixture
async def host() -> AsyncIterator[ServiceHost]:
    server = ServiceHost(
        "test",
        host="127.0.0.1",
        port=0,
        service_names=["ssjf.v1.Worker", "ssjf.v1.Scheduler"],
        registrars=[
            lambda s: worker_pb2_grpc.add_WorkerServicer_to_server(RefusingWorker(), s),
            lambda s: scheduler_pb2_grpc.add_SchedulerServicer_to_server(OneTokenThenMissing(), s),
        ],
    )
    await server.start()
    yield server
    await server.server.stop(None)


async def test_domain_error_becomes_its_status_with_message(host: ServiceHost):
    method = "/ssjf.v1.Worker/GetWorkerInfo"
    before = count(method, "INVALID_ARGUMENT")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await worker_pb2_grpc.WorkerStub(channel).GetWorkerInfo(
                worker_pb2.GetWorkerInfoRequest()
            )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "names no worker" in raised.value.details()
    # Counted before the status left the server (the error is set, not aborted), so a
    # scrape right after the client saw its error already includes it.
    assert count(method, "INVALID_ARGUMENT") == before + 1


async def test_streaming_error_after_items_keeps_items_and_status(host: ServiceHost):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        call = scheduler_pb2_grpc.SchedulerStub(channel).Stream(
            scheduler_pb2.StreamRequest(job_id="j1")
        )
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for event in call:
                received.append(event)
    assert [event.token.index for event in received] == [0]
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "j1 expired" in raised.value.details()


async def test_health_is_not_serving_until_ready(host: ServiceHost):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{host.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="ssjf.v1.Worker")
        assert (await health.Check(request)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        await host.set_ready()
        assert (await health.Check(request)).status == health_pb2.HealthCheckResponse.SERVING
        host.request_stop()
        await asyncio.wait_for(host.serve_until_signal(), timeout=10)
