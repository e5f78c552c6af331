"""The scheduler as a real process on a real Redis, driven through its gRPC API.

Worker-side behaviour is played by the test itself through WorkerGateway (Lease + Report),
or by tests/scheduler_probe_worker.py processes.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
import redis

from services.common.net import free_port
from services.pb import common_pb2, scheduler_pb2
from tests.scheduler_support import (
    ReportSession,
    collect,
    progress,
    replay,
    request,
    start_predictor,
    start_probe_worker,
    start_scheduler,
    wait_for_state,
)

__all__ = ["start_predictor", "start_scheduler"]  # fixtures, imported for pytest

LLM = "vicuna-13b"
DONE = common_pb2.JOB_STATE_DONE
FAILED = common_pb2.JOB_STATE_FAILED
CANCELLED = common_pb2.JOB_STATE_CANCELLED
QUEUED = common_pb2.JOB_STATE_QUEUED


def lease(node, worker_id: str = "w", max_jobs: int = 1, wait_ms: int = 0):
    return node.gateway.Lease(
        scheduler_pb2.LeaseRequest(
            worker_id=worker_id, llms=[LLM], max_jobs=max_jobs, wait_ms=wait_ms
        )
    )


def test_generate_streams_accepted_tokens_then_summary(start_scheduler) -> None:
    node = start_scheduler()
    worker = start_probe_worker(node.address, "probe-1")
    try:
        events = list(node.scheduler.Generate(request(sampling=replay(6)), timeout=30))
    finally:
        worker.stop()
    assert events[0].HasField("accepted")
    assert events[0].accepted.prediction_fallback  # no predictor configured
    tokens = [event.token for event in events if event.HasField("token")]
    assert [token.index for token in tokens] == list(range(6))
    assert "".join(token.text for token in tokens) == "t0 t1 t2 t3 t4 t5 "
    summary = events[-1].summary
    assert summary.state == DONE
    assert summary.finish_reason == common_pb2.FINISH_REASON_REPLAY_LENGTH
    assert summary.generated_tokens == 6 and summary.attempts == 1
    assert 0 < summary.queue_wait_s <= summary.time_to_first_token_s <= summary.completion_s
    job = node.scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=events[0].job_id))
    assert job.worker_id == "probe-1" and job.policy == "ssjf" and job.state == DONE


MALFORMED = [
    (request(prompt=""), "prompt must not be empty"),
    (request(prompt="x" * 101), "more than the 100"),
    (request(sampling=common_pb2.SamplingParams(temperature=-0.5)), "temperature must be >= 0"),
    (request(sampling=common_pb2.SamplingParams(top_p=1.5)), "top_p must be within"),
    (request(priority=101), "priority must be within"),
    (request(llm="bad name!"), "not a valid name"),
    (request(oracle_output_tokens=12), "--allow-oracle"),
]


def test_malformed_requests_get_clear_statuses(start_scheduler) -> None:
    node = start_scheduler("--max-prompt-chars", "100")
    for bad, message in MALFORMED:
        for call in (node.scheduler.Submit, lambda r: list(node.scheduler.Generate(r))):
            with pytest.raises(grpc.RpcError) as caught:
                call(bad)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
            assert message in caught.value.details()


def test_unknown_jobs_and_bad_leases_are_refused(start_scheduler) -> None:
    node = start_scheduler()
    for call in (
        lambda: node.scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id="nope")),
        lambda: node.scheduler.Cancel(scheduler_pb2.CancelRequest(job_id="nope")),
        lambda: list(node.scheduler.Stream(scheduler_pb2.StreamRequest(job_id="nope"))),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no job 'nope'" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        node.gateway.Lease(scheduler_pb2.LeaseRequest(worker_id="w", llms=[LLM], max_jobs=0))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_jobs" in caught.value.details()


def test_submit_is_idempotent_by_client_request_id(start_scheduler) -> None:
    node = start_scheduler()
    first = node.scheduler.Submit(request(client_request_id="req-1"))
    again = node.scheduler.Submit(request(client_request_id="req-1"))
    other = node.scheduler.Submit(request(client_request_id="req-2"))
    assert not first.deduplicated and again.deduplicated
    assert again.job_id == first.job_id != other.job_id
    # The same key with a different request is an error, not the old job (issue 11 item 5).
    with pytest.raises(grpc.RpcError) as caught:
        node.scheduler.Submit(request(prompt="other text", client_request_id="req-1"))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first.job_id in caught.value.details()
    stats = node.scheduler.QueueStats(scheduler_pb2.QueueStatsRequest(llm=LLM)).queues[0]
    assert stats.queued == 2 and stats.counters["submitted"] == 2
    # Generate with a known id attaches to the earlier job; closing it early does not cancel
    # the job, which belongs to the first request (issue 11 item 5).
    call = node.scheduler.Generate(request(client_request_id="req-1"))
    accepted = next(call)
    assert accepted.job_id == first.job_id and accepted.accepted.deduplicated
    call.cancel()
    time.sleep(0.5)
    assert node.scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=first.job_id)).state == QUEUED


def test_full_queue_answers_resource_exhausted(start_scheduler) -> None:
    node = start_scheduler("--max-queue-depth", "2")
    node.scheduler.Submit(request())
    node.scheduler.Submit(request())
    with pytest.raises(grpc.RpcError) as caught:
        node.scheduler.Submit(request())
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "is full (2 jobs" in caught.value.details()
    node.scheduler.Submit(request(llm="another-llm"))  # one queue per LLM


def test_job_past_its_start_deadline_is_never_started(start_scheduler) -> None:
    node = start_scheduler("--reap-interval-s", "0.1")
    job_id = node.scheduler.Submit(request(start_timeout_ms=300)).job_id
    kept = node.scheduler.Submit(request()).job_id
    _, summary = collect(node.scheduler.Stream(scheduler_pb2.StreamRequest(job_id=job_id)))
    assert summary.summary.state == FAILED
    assert summary.summary.finish_reason == common_pb2.FINISH_REASON_DEADLINE
    leased = lease(node, max_jobs=5).jobs
    assert [job.job_id for job in leased] == [kept]


def test_finished_records_expire_after_job_ttl(start_scheduler) -> None:
    node = start_scheduler("--job-ttl-s", "1")
    job_id = node.scheduler.Submit(request(client_request_id="expiring")).job_id
    node.scheduler.Cancel(scheduler_pb2.CancelRequest(job_id=job_id))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            node.scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            break
        time.sleep(0.2)
    else:
        pytest.fail("record did not expire")
    # The idempotency key expired with it: the same client id makes a new job.
    assert node.scheduler.Submit(request(client_request_id="expiring")).job_id != job_id


def test_cancel_removes_a_queued_job(start_scheduler) -> None:
    node = start_scheduler()
    job_id = node.scheduler.Submit(request()).job_id
    reply = node.scheduler.Cancel(scheduler_pb2.CancelRequest(job_id=job_id))
    assert reply.cancelled and reply.state == CANCELLED
    again = node.scheduler.Cancel(scheduler_pb2.CancelRequest(job_id=job_id))
    assert not again.cancelled and again.state == CANCELLED
    _, last = collect(node.scheduler.Stream(scheduler_pb2.StreamRequest(job_id=job_id)))
    assert last.summary.finish_reason == common_pb2.FINISH_REASON_CANCELLED
    assert lease(node).jobs == []
    stats = node.scheduler.QueueStats(scheduler_pb2.QueueStatsRequest()).queues[0]
    assert stats.queued == 0 and stats.counters["cancelled"] == 1


def test_closing_generate_cancels_the_job(start_scheduler) -> None:
    node = start_scheduler()
    call = node.scheduler.Generate(request())
    job_id = next(call).job_id
    call.cancel()
    wait_for_state(node.scheduler, job_id, CANCELLED)
    assert lease(node).jobs == []


def test_idle_lease_waits_and_wakes_on_submit(start_scheduler, redis_url) -> None:
    node = start_scheduler("--reap-interval-s", "600")  # no reaper script calls meanwhile
    result: list[scheduler_pb2.LeaseResponse] = []
    waiter = threading.Thread(target=lambda: result.append(lease(node, wait_ms=20_000)))
    waiter.start()
    time.sleep(0.5)
    job_id = node.scheduler.Submit(request()).job_id
    waiter.join(15)
    assert not waiter.is_alive()
    assert [job.job_id for job in result[0].jobs] == [job_id]
    assert result[0].lease_ttl_s == 10.0
    # An idle worker waits without polling: 1.5 s of long poll is one claim and one BLPOP.
    redis_client = redis.Redis.from_url(redis_url)
    redis_client.config_resetstat()
    assert lease(node, wait_ms=1500).jobs == []  # an empty long poll returns empty
    stats = redis_client.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1
    assert stats["cmdstat_blpop"]["calls"] == 1


def test_report_protocol_heartbeats_stale_leases_and_duplicate_tokens(start_scheduler) -> None:
    node = start_scheduler("--lease-ttl-s", "2", "--reap-interval-s", "0.1")
    job_id = node.scheduler.Submit(request()).job_id
    job = lease(node).jobs[0]
    assert job.job_id == job_id and job.attempt == 1 and list(job.resume_token_ids) == []
    session = ReportSession(node.gateway, "w")
    try:
        assert list(session.send(progress(job, range(0, 3))).stop) == []
        for _ in range(8):  # heartbeats for two lease lifetimes keep the lease
            time.sleep(0.5)
            assert list(session.send(progress(job)).stop) == []
        assert node.scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id)).attempts == 1
        # A resent batch overlapping stored tokens: indexes 1 and 2 are dropped.
        assert list(session.send(progress(job, range(1, 5))).stop) == []
        stale = scheduler_pb2.LeasedJob(job_id=job_id, lease_id="not-the-lease")
        directive = session.send(progress(stale, [5]))
        assert [(s.job_id, s.reason) for s in directive.stop] == [
            (job_id, scheduler_pb2.StopJob.REASON_LEASE_LOST)
        ]
        assert (
            list(session.send(progress(job, [5], finish=common_pb2.FINISH_REASON_EOS)).stop) == []
        )
        duplicate = session.send(progress(job, finish=common_pb2.FINISH_REASON_EOS))
        assert [s.reason for s in duplicate.stop] == [scheduler_pb2.StopJob.REASON_FINISHED]
    finally:
        session.close()
    indexes, last = collect(node.scheduler.Stream(scheduler_pb2.StreamRequest(job_id=job_id)))
    assert indexes == list(range(6))
    assert last.summary.state == DONE and last.summary.generated_tokens == 6
    assert last.summary.finish_reason == common_pb2.FINISH_REASON_EOS
    resumed, _ = collect(
        node.scheduler.Stream(scheduler_pb2.StreamRequest(job_id=job_id, from_index=4))
    )
    assert resumed == [4, 5]


def test_expired_lease_requeues_then_fails_after_max_attempts(start_scheduler) -> None:
    node = start_scheduler(
        "--lease-ttl-s", "0.3", "--max-attempts", "2", "--reap-interval-s", "0.05"
    )
    job_id = node.scheduler.Submit(request()).job_id
    first = lease(node).jobs[0]
    session = ReportSession(node.gateway, "w")
    try:
        session.send(progress(first, range(2)))
        second = lease(node, wait_ms=10_000).jobs[0]  # the first lease expires: requeued
        assert second.job_id == job_id and second.attempt == 2
        assert list(second.resume_token_ids) == [1000, 1001]
        late = session.send(progress(first, [2]))
        assert [s.reason for s in late.stop] == [scheduler_pb2.StopJob.REASON_LEASE_LOST]
    finally:
        session.close()
    job = wait_for_state(node.scheduler, job_id, FAILED)  # second lease expires too
    assert job.attempts == 2 and "leased 2 times" in job.error
    assert job.finish_reason == common_pb2.FINISH_REASON_ERROR


def test_ssjf_orders_by_prediction_from_the_predictor(start_scheduler, start_predictor) -> None:
    address, predictor = start_predictor(0.0)
    node = start_scheduler("--predictor", address, "--prediction-mode", "sync")
    prompts = ["one two three four five six", "one", "one two three"]
    ids = {}
    for prompt in prompts:
        reply = node.scheduler.Submit(request(prompt=prompt))
        assert not reply.job.prediction_fallback
        assert reply.job.predictor_version == "word-count-test"
        ids[reply.job_id] = prompt
    served = [ids[job.job_id] for job in lease(node, max_jobs=3).jobs]
    assert served == ["one", "one two three", "one two three four five six"]
    assert predictor.calls == 3


def test_fcfs_policy_ignores_predictions(start_scheduler, start_predictor) -> None:
    address, predictor = start_predictor(0.0)
    node = start_scheduler("--predictor", address, "--policy", "fcfs")
    ids = [node.scheduler.Submit(request(prompt="a " * n)).job_id for n in (9, 1, 5)]
    assert [job.job_id for job in lease(node, max_jobs=3).jobs] == ids
    assert predictor.calls == 0


def test_oracle_policy_needs_allow_oracle_and_orders_by_true_length(start_scheduler) -> None:
    node = start_scheduler("--policy", "sjf-oracle", "--allow-oracle")
    ids = {node.scheduler.Submit(request(oracle_output_tokens=n)).job_id: n for n in (30, 10, 20)}
    assert [ids[job.job_id] for job in lease(node, max_jobs=3).jobs] == [10, 20, 30]
    with pytest.raises(grpc.RpcError) as caught:
        node.scheduler.Submit(request())
    assert "needs oracle_output_tokens" in caught.value.details()


@pytest.mark.parametrize("predictor", ["down", "slow"])
def test_predictor_down_or_slow_queues_with_fallback(
    start_scheduler, start_predictor, predictor
) -> None:
    if predictor == "down":
        address = f"127.0.0.1:{free_port()}"  # nothing listens there
    else:
        address, _ = start_predictor(2.0)
    node = start_scheduler(
        "--predictor", address, "--predictor-timeout-ms", "100",
        "--prediction-mode", "sync", "--first-stage", "",
    )  # fmt: skip
    call = node.scheduler.Generate(request(), timeout=10)
    accepted = next(call)
    assert accepted.accepted.prediction_fallback
    assert accepted.accepted.predicted_output_tokens == 0
    call.cancel()
    job = wait_for_state(node.scheduler, accepted.job_id, CANCELLED)
    assert job.prediction_fallback
    ids = [node.scheduler.Submit(request(prompt=p)).job_id for p in ("a b c d", "a")]
    # Equal fallback scores: the queue degrades to first come, first served.
    assert [job.job_id for job in lease(node, max_jobs=2).jobs] == ids
    counters = node.scheduler.QueueStats(scheduler_pb2.QueueStatsRequest()).queues[0].counters
    assert counters["prediction_fallback"] == 3 == counters["submitted"]


@pytest.mark.slow
def test_prometheus_metrics_show_queues_and_counters(start_scheduler) -> None:
    metrics_port = free_port()
    node = start_scheduler("--metrics-port", str(metrics_port))
    node.scheduler.Submit(request())
    deadline = time.monotonic() + 15
    text = ""
    while time.monotonic() < deadline:  # the snapshot refreshes every 5 s
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as reply:
            text = reply.read().decode()
        if 'ssjf_scheduler_queued{llm="vicuna-13b"} 1.0' in text:
            break
        time.sleep(0.5)
    assert 'ssjf_scheduler_queued{llm="vicuna-13b"} 1.0' in text
    assert 'ssjf_scheduler_jobs_total{event="submitted",llm="vicuna-13b"} 1.0' in text


def test_redis_outage_is_unavailable_and_the_scheduler_recovers(
    start_scheduler, redis_server
) -> None:
    node = start_scheduler()
    node.scheduler.Submit(request())
    redis_server.kill()
    with pytest.raises(grpc.RpcError) as caught:
        node.scheduler.Submit(request())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Redis is unreachable" in caught.value.details()
    redis_server.start()  # no persistence: queues, records and cached scripts are gone
    deadline = time.monotonic() + 15
    while True:
        try:
            job_id = node.scheduler.Submit(request()).job_id
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, "scheduler did not recover"
            time.sleep(0.2)
    assert [job.job_id for job in lease(node).jobs] == [job_id]
