"""Bad input and protocol abuse (issue 11, items 4-8): each case failed before its fix.

Real scheduler processes on a real Redis, driven through gRPC; a few cases drive the store,
the core or the worker's gateway client in-process where a fault must be placed exactly.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import redis

from services.pb import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.scheduler import core as core_module
from services.scheduler.core import SchedulerConfig, SchedulerCore
from services.scheduler.keys import events_key, job_key, leases_key, notify_key
from services.scheduler.models import JobRequest
from services.scheduler.policies import make_policy
from services.scheduler.store import JobStore, StoreSettings
from services.worker.text import TextStream
from tests.scheduler_support import (
    ReportSession,
    replay,
    request,
    start_scheduler,
)

__all__ = ["start_scheduler"]  # fixture, imported for pytest

LLM = "vicuna-13b"
QUEUED = common_pb2.JOB_STATE_QUEUED
FAILED = common_pb2.JOB_STATE_FAILED


def refused(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call(*args, timeout=20)
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)
    return caught.value


def test_llm_name_with_a_trailing_newline_is_refused(start_scheduler) -> None:
    node = start_scheduler()
    error = refused(node.scheduler.Submit, request(llm=f"{LLM}\n"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "llm" in error.details()


def test_a_job_for_an_llm_nobody_serves_fails_at_the_default_start_deadline(
    start_scheduler,
) -> None:
    node = start_scheduler("--default-start-timeout-s", "1", "--reap-interval-s", "0.2")
    events = list(node.scheduler.Generate(request(llm="made-up-llm"), timeout=30))
    summary = events[-1].summary
    assert summary.state == FAILED
    assert summary.finish_reason == common_pb2.FINISH_REASON_DEADLINE


def test_oversized_sampling_requests_are_refused(start_scheduler) -> None:
    node = start_scheduler()
    for sampling in (
        common_pb2.SamplingParams(replay_output_tokens=10_000_000),
        common_pb2.SamplingParams(max_new_tokens=10_000_000),
        common_pb2.SamplingParams(stop=["x" * 1_000_000]),
    ):
        error = refused(node.scheduler.Submit, request(sampling=sampling))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, sampling
        assert len(error.details()) < 1000
    assert redis.Redis.from_url(node_redis(node)).keys("ssjf:job:*") == []


def node_redis(node) -> str:
    args = node.service.args
    return args[args.index("--redis-url") + 1]


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xff\xff\xff", b"\x1a\x02\xff\xfe"],  # malformed; prompt (field 3) not UTF-8
    ids=["malformed", "invalid-utf8"],
)
def test_undecodable_requests_are_invalid_argument(start_scheduler, payload: bytes) -> None:
    node = start_scheduler()
    raw = node.channel.unary_unary("/ssjf.v1.Scheduler/Submit")
    error = refused(raw, payload)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "could not be parsed" in error.details()
    stream = node.channel.unary_stream("/ssjf.v1.Scheduler/Generate")
    assert refused(stream, payload).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_huge_job_id_is_invalid_argument_not_an_echo(start_scheduler) -> None:
    node = start_scheduler()
    huge = "j" * 100_000
    for call, message in (
        (node.scheduler.GetJob, scheduler_pb2.GetJobRequest(job_id=huge)),
        (node.scheduler.Cancel, scheduler_pb2.CancelRequest(job_id=huge)),
        (node.scheduler.Stream, scheduler_pb2.StreamRequest(job_id=huge)),
    ):
        error = refused(call, message)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "job_id has 100000 characters" in error.details()


def test_progress_with_an_empty_lease_id_changes_nothing(start_scheduler) -> None:
    node = start_scheduler()
    job_id = node.scheduler.Submit(request()).job_id
    session = ReportSession(node.gateway, "intruder")
    try:
        forged = scheduler_pb2.JobProgress(
            job_id=job_id, lease_id="", tokens=[common_pb2.Token(index=0, text="x", token_id=1)]
        )
        directive = session.send(forged)
    finally:
        session.close()
    assert [s.reason for s in directive.stop] == [scheduler_pb2.StopJob.REASON_LEASE_LOST]
    job = node.scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id))
    assert job.state == QUEUED and job.generated_tokens == 0


def test_a_stream_whose_record_expires_ends_with_not_found(start_scheduler) -> None:
    node = start_scheduler()
    job_id = node.scheduler.Submit(request()).job_id
    stream = node.scheduler.Stream(scheduler_pb2.StreamRequest(job_id=job_id), timeout=60)
    time.sleep(0.5)
    redis.Redis.from_url(node_redis(node)).delete(job_key(job_id), events_key(job_id))
    with pytest.raises(grpc.RpcError) as caught:
        list(stream)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "expired" in caught.value.details()


def test_a_stop_for_an_old_lease_carries_that_lease(start_scheduler) -> None:
    """The scheduler names the lease it stops, so a worker can keep the job's new lease."""
    node = start_scheduler()
    node.scheduler.Submit(request(sampling=replay(3)))
    job = node.gateway.Lease(
        scheduler_pb2.LeaseRequest(worker_id="w", llms=[LLM], max_jobs=1), timeout=10
    ).jobs[0]
    session = ReportSession(node.gateway, "w")
    try:
        stale = scheduler_pb2.JobProgress(job_id=job.job_id, lease_id="old-lease")
        [stop] = session.send(stale).stop
    finally:
        session.close()
    assert stop.reason == scheduler_pb2.StopJob.REASON_LEASE_LOST
    assert stop.lease_id == "old-lease"


# --- in-process: the store and core on the test Redis --------------------------------------


def make_core(redis_url: str, **config: object) -> SchedulerCore:
    from services.common.redis_store import connect

    store = JobStore(
        connect(redis_url),
        StoreSettings(job_ttl_s=60, lease_ttl_s=10, max_attempts=3, completions_maxlen=100),
    )
    return SchedulerCore(store, make_policy("fcfs", 0.0), SchedulerConfig(**config), None)


def test_a_lease_call_cancelled_after_its_claim_gives_the_jobs_back(redis_url: str) -> None:
    async def scenario() -> None:
        core = make_core(redis_url)
        job_id = (await core.submit(JobRequest(prompt="hello", llm=LLM))).record.job_id
        leasing = asyncio.ensure_future(core.lease("w", [LLM], 1, 0))
        await asyncio.sleep(0)  # the claim is on its way to Redis
        leasing.cancel()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            record = await core.store.get(job_id)
            # Claimed (leased_at set: the shielded claim ran) and given back.
            if record.leased_at and record.state.value == "QUEUED" and record.attempts == 0:
                break
            await asyncio.sleep(0.05)
        record = await core.store.get(job_id)
        assert (record.state.value, record.attempts) == ("QUEUED", 0)
        assert await core.store.redis.zcard(leases_key(LLM)) == 0
        # ... and it is leased normally afterwards, as its first attempt.
        [job] = await core.lease("w2", [LLM], 1, 0)
        assert job.job_id == job_id and job.attempt == 1
        await core.store.close()

    asyncio.run(scenario())


def test_claim_leaves_a_wake_up_for_jobs_still_queued(redis_url: str) -> None:
    """A wake-up lost with a cancelled BLPOP is replaced by the next claim."""

    async def scenario() -> None:
        core = make_core(redis_url)
        for index in range(3):
            await core.submit(JobRequest(prompt=f"job {index}", llm=LLM))
        await core.store.redis.delete(notify_key(LLM))  # every wake-up lost
        await core.lease("w", [LLM], 1, 0)
        assert await core.store.redis.llen(notify_key(LLM)) == 1
        await core.store.close()

    asyncio.run(scenario())


def test_times_come_from_redis_clock_not_the_replicas(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica whose clock is an hour fast still queues, leases and ages by Redis's."""

    async def scenario() -> None:
        core = make_core(redis_url)
        real_time = time.time
        await core.store.sync_clock()
        monkeypatch.setattr(core_module.time, "time", lambda: real_time() + 3600)
        monkeypatch.setattr("services.scheduler.store.time.time", lambda: real_time() + 3600)
        await core.store.sync_clock()
        record = (await core.submit(JobRequest(prompt="hello", llm=LLM))).record
        seconds, micros = await core.store.redis.time()
        redis_now = seconds + micros / 1e6
        assert abs(record.submitted_at - redis_now) < 5
        [job] = await core.lease("w", [LLM], 1, 0)
        expires = float(await core.store.redis.hget(job_key(job.job_id), "lease_expires_at"))
        assert abs(expires - (redis_now + 10)) < 5
        await core.store.close()

    asyncio.run(scenario())


def test_resume_inside_a_multibyte_character_keeps_the_character() -> None:
    def decode(ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    # The first attempt streamed "ab" and the first byte of "é" (with empty text).
    stream = TextStream(decode, already_streamed=(*b"ab", 0xC3))
    assert stream.push(0xA9) == [(3, 0xA9, "é")]
    assert stream.push(ord("x")) == [(4, ord("x"), "x")]


def test_an_idle_stream_survives_the_clients_keepalive_pings(start_scheduler) -> None:
    """Clients ping every 20 s (CHANNEL_OPTIONS), also while a stream is idle (a job waiting
    in the queue); gRPC's server default answered the third such ping with GOAWAY
    "too_many_pings", cancelling every call on the connection. A fast-pinging client shows
    it in seconds."""
    node = start_scheduler()
    job_id = node.scheduler.Submit(request()).job_id
    options = [
        ("grpc.keepalive_time_ms", 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    with grpc.insecure_channel(node.address, options=options) as channel:
        stream = scheduler_pb2_grpc.SchedulerStub(channel).Stream(
            scheduler_pb2.StreamRequest(job_id=job_id), timeout=60
        )
        time.sleep(8)  # idle, pinged about 8 times
        node.scheduler.Cancel(scheduler_pb2.CancelRequest(job_id=job_id))
        events = list(stream)
    assert events[-1].summary.state == common_pb2.JOB_STATE_CANCELLED


def test_a_burst_of_thousands_of_new_calls_is_served_not_cancelled(start_scheduler) -> None:
    """gRPC's server default cancelled calls beyond 1,000-3,000 waiting to be picked up: a
    burst of clients (reconnecting after a replica restart) got CANCELLED."""
    node = start_scheduler()

    async def burst() -> dict[str, int]:
        async with grpc.aio.insecure_channel(node.address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            replies = await asyncio.gather(
                *(
                    stub.QueueStats(scheduler_pb2.QueueStatsRequest(), timeout=120)
                    for _ in range(4000)
                ),
                return_exceptions=True,
            )
        codes: dict[str, int] = {}
        for reply in replies:
            code = reply.code().name if isinstance(reply, grpc.aio.AioRpcError) else "OK"
            codes[code] = codes.get(code, 0) + 1
        return codes

    assert asyncio.run(burst()) == {"OK": 4000}
