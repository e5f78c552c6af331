"""The fault suite's stack and its invariant (issue 11).

``FaultStack`` runs real processes on loopback: its own redis-server (optionally with AOF),
scheduler replicas, tiny-model workers, the predictor. ``Client`` drives jobs the way a
careful client does: Generate, and on UNAVAILABLE resume with Stream(job_id, from_index) on
the next replica. ``check_invariant`` is what every case ends with: each accepted job ended
exactly once (DONE, FAILED with a reason, or CANCELLED), its token stream has no gap and no
duplicate, and nothing is left QUEUED or LEASED.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from dataclasses import dataclass, field

import grpc
import redis

from services.common.grpc_server import CHANNEL_OPTIONS
from services.common.net import free_port
from services.pb import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.keys import (
    LLMS_KEY,
    events_key,
    leases_key,
    metrics_key,
    queue_key,
    running_key,
)
from tests.helpers import Service, start_service, wait_for_health
from tests.redis_server import RedisServerProcess

LLM = "fault-llm"
FINAL = {"DONE", "FAILED", "CANCELLED"}
# Resumable: the replica went away (or Redis did, briefly); the job lives on in Redis.
RESUMABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


class FaultStack:
    """Processes of one fault case; ``close`` stops whatever is left."""

    def __init__(self, aof: bool = False) -> None:
        self.redis = RedisServerProcess(aof=aof)
        self.redis.start()
        self.schedulers: list[tuple[Service, str]] = []
        self.workers: list[Service] = []
        self.others: list[Service] = []

    def start_scheduler(self, *flags: str, wait: bool = True) -> str:
        port = free_port()
        service = start_service(
            [
                "scheduler",
                "--host", "127.0.0.1",
                "--port", str(port),
                "--redis-url", self.redis.url,
                "--policy", "fcfs",
                "--default-llm", LLM,
                "--lease-ttl-s", "3",
                "--reap-interval-s", "0.2",
                "--drain-s", "5",
                *flags,
            ]
        )  # fmt: skip
        address = f"127.0.0.1:{port}"
        self.schedulers.append((service, address))
        if wait:
            self.wait_ready(service, address)
        return address

    def start_worker(self, schedulers: list[str], *flags: str, wait: bool = True) -> Service:
        port = free_port()
        service = start_service(
            [
                "worker",
                "--scheduler", ",".join(schedulers),
                "--port", str(port),
                "--model", "tiny-llama",
                "--batching", "continuous",
                "--max-batch-size", "4",
                "--served-model-name", LLM,
                "--lease-wait-ms", "500",
                "--torch-threads", "1",
                *flags,
            ]
        )  # fmt: skip
        service.address = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
        self.workers.append(service)
        if wait:
            self.wait_ready(service, service.address)  # type: ignore[attr-defined]
        return service

    def start_predictor(self) -> str:
        port = free_port()
        service = start_service(["predictor", "--port", str(port), "--threads", "1"])
        address = f"127.0.0.1:{port}"
        self.others.append(service)
        self.wait_ready(service, address)
        return address

    @staticmethod
    def wait_ready(service: Service, address: str, timeout: float = 240.0) -> None:
        try:
            wait_for_health(address, timeout=timeout)
        except (TimeoutError, RuntimeError):
            raise AssertionError(
                f"{service.args[0]} did not start:\n{service.log()[-4000:]}"
            ) from None

    def scheduler_service(self, address: str) -> Service:
        return next(service for service, at in self.schedulers if at == address)

    def logs(self) -> str:
        parts = [(s.args[0], s) for s, _ in self.schedulers] + [
            (s.args[0], s) for s in self.workers + self.others
        ]
        return "\n".join(f"--- {name} ---\n{s.log()[-3000:]}" for name, s in parts)

    def close(self) -> None:
        for service in [*self.workers, *self.others, *(s for s, _ in self.schedulers)]:
            if service.process.poll() is None:
                with _suppress():
                    os.kill(service.process.pid, signal.SIGCONT)
            service.stop(timeout=15)
        self.redis.cleanup()


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


@dataclass
class JobResult:
    job_id: str = ""
    indexes: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    summary: scheduler_pb2.JobSummary | None = None
    resumes: int = 0
    errors: list[str] = field(default_factory=list)


class Client:
    """An asyncio gRPC client over one or more replicas (rotating on failure)."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = list(addresses)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._turn = itertools.count()

    def stub(self, address: str | None = None) -> scheduler_pb2_grpc.SchedulerStub:
        address = address or self.addresses[next(self._turn) % len(self.addresses)]
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return scheduler_pb2_grpc.SchedulerStub(self._channels[address])

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

    async def run(
        self,
        request: scheduler_pb2.GenerateRequest,
        timeout_s: float = 120.0,
        on_token: object = None,
    ) -> JobResult:
        """Generate, resuming with Stream on another replica until the summary arrives."""
        result = JobResult()
        deadline = time.monotonic() + timeout_s
        while result.summary is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {result.job_id or '?'} did not end: {result.errors}")
            try:
                if not result.job_id:
                    call = self.stub().Generate(
                        request, timeout=max(1.0, deadline - time.monotonic())
                    )
                else:
                    call = self.stub().Stream(
                        scheduler_pb2.StreamRequest(
                            job_id=result.job_id, from_index=len(result.indexes)
                        ),
                        timeout=max(1.0, deadline - time.monotonic()),
                    )
                async for event in call:
                    self._take(event, result, on_token)
            except grpc.aio.AioRpcError as error:
                if error.code() not in RESUMABLE:
                    raise
                result.errors.append(f"{error.code().name}: {error.details()}")
                result.resumes += 1
                await asyncio.sleep(0.2)
        return result

    @staticmethod
    def _take(event: scheduler_pb2.JobEvent, result: JobResult, on_token: object) -> None:
        result.job_id = event.job_id or result.job_id
        if event.HasField("token"):
            result.indexes.append(event.token.index)
            result.token_ids.append(event.token.token_id)
            if callable(on_token):
                on_token(result)
        elif event.HasField("summary"):
            result.summary = event.summary


def replay_request(tokens: int, client_request_id: str = "", **fields: object):
    return scheduler_pb2.GenerateRequest(
        llm=LLM,
        prompt="Tell me about the sea.",
        client_request_id=client_request_id,
        sampling=common_pb2.SamplingParams(replay_output_tokens=tokens),
        **fields,
    )


def _stream_entries(client: redis.Redis, job_id: str) -> tuple[list[int], int]:
    """Token indexes stored in a job's event stream, and how many end markers it has."""
    indexes: list[int] = []
    ends = 0
    for _, fields in client.xrange(events_key(job_id)):
        if fields["k"] == "end":
            ends += 1
        else:
            first = int(fields["i"])
            indexes += range(first, first + len(fields["ids"].split(",")))
    return indexes, ends


def check_job(client: redis.Redis, result: JobResult, record: dict[str, str]) -> str:
    """One job's part of the invariant, given its record; returns its final state."""
    assert record, f"job {result.job_id} was lost (no record)"
    state = record["state"]
    assert state in FINAL, f"job {result.job_id} never ended: {record}"
    if state == "FAILED":
        assert record["error"], f"job {result.job_id} FAILED without a reason"
    stored, ends = _stream_entries(client, result.job_id)
    assert ends == 1, f"job {result.job_id} ended {ends} times"
    assert stored == list(range(len(stored))), f"job {result.job_id} stored {stored}"
    assert int(record["generated_tokens"]) == len(stored)
    got = result.indexes
    assert got == list(range(len(got))), f"job {result.job_id}: client got {got}"
    if result.summary is not None:
        assert len(got) == len(stored), (result.job_id, len(got), len(stored))
    return state


def check_no_live_work(client: redis.Redis) -> None:
    """Nothing queued, leased or running; every submitted job counted as ended once."""
    for llm in client.smembers(LLMS_KEY):
        leases = leases_key(llm)
        assert client.zcard(leases) == 0, client.zrange(leases, 0, -1, withscores=True)
        assert client.zcard(queue_key(llm)) == 0, f"jobs left queued for {llm}"
        assert client.scard(running_key(llm)) == 0, f"jobs left running for {llm}"
        counters = {k: int(v) for k, v in client.hgetall(metrics_key(llm)).items()}
        ended = sum(counters.get(name, 0) for name in ("completed", "failed", "cancelled"))
        assert ended == counters.get("submitted", 0), counters
    for key in client.scan_iter("ssjf:job:*"):
        assert client.hget(key, "state") in FINAL, f"{key} left live"


def wait_final(client: redis.Redis, job_ids: list[str], timeout_s: float) -> dict:
    """The jobs' records, once all are final (cancelled jobs end shortly after their client
    left) or the timeout passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = {job_id: client.hgetall(f"ssjf:job:{job_id}") for job_id in job_ids}
        if all(r.get("state") in FINAL for r in records.values()) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def check_invariant(redis_url: str, results: list[JobResult], timeout_s: float = 60.0) -> None:
    """Every accepted job ended exactly once with a dense, duplicate-free token stream (as
    stored and as each client received it); nothing is left queued or leased."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    accepted = [result for result in results if result.job_id]
    records = wait_final(client, [result.job_id for result in accepted], timeout_s)
    for result in accepted:
        check_job(client, result, records[result.job_id])
    check_no_live_work(client)


def states(results: list[JobResult]) -> dict[str, int]:
    names = {v: k for k, v in common_pb2.JobState.items()}
    counts: dict[str, int] = {}
    for result in results:
        if result.summary is not None:
            name = names[result.summary.state].removeprefix("JOB_STATE_")
            counts[name] = counts.get(name, 0) + 1
    return counts


def signal_process(service: Service, signum: int) -> None:
    os.kill(service.process.pid, signum)
