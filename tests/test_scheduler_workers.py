"""Workers and replicas as real processes: racing claims, a SIGKILLed worker, cancelling a
running job, and two scheduler replicas on one Redis."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import grpc
import pytest

from services.pb import common_pb2, scheduler_pb2
from tests.scheduler_support import (
    collect,
    replay,
    request,
    start_probe_worker,
    start_scheduler,
    wait_for_state,
)

__all__ = ["start_scheduler"]  # fixture, imported for pytest

pytestmark = pytest.mark.slow


def test_no_job_is_dispatched_twice_with_8_racing_workers(start_scheduler) -> None:
    node = start_scheduler()
    workers = [
        start_probe_worker(node.address, f"racer-{i}", "--tokens", "1", "--wait-ms", "500")
        for i in range(8)
    ]
    try:
        for worker in workers:
            worker.wait_for(lambda w=worker: bool(w.of("ready")))
        job_ids = [node.scheduler.Submit(request(sampling=replay(1))).job_id for _ in range(240)]
        for job_id in job_ids:
            wait_for_state(node.scheduler, job_id, common_pb2.JOB_STATE_DONE)
    finally:
        for worker in workers:
            worker.stop()
    leases = Counter(event["job_id"] for worker in workers for event in worker.of("leased"))
    assert set(leases) == set(job_ids)
    assert max(leases.values()) == 1  # each job leased exactly once
    assert sum(1 for worker in workers if worker.of("leased")) >= 2  # they really raced
    for job_id in job_ids[::40]:
        job = node.scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id))
        assert job.attempts == 1


def test_sigkilled_worker_job_is_finished_by_another_without_duplicates(start_scheduler) -> None:
    node = start_scheduler("--lease-ttl-s", "2", "--reap-interval-s", "0.1")
    doomed = start_probe_worker(node.address, "doomed", "--token-delay-s", "0.2")
    call = node.scheduler.Generate(request(sampling=replay(12)), timeout=60)
    job_id = next(call).job_id
    received: list[scheduler_pb2.JobEvent] = []
    reader = threading.Thread(target=lambda: received.extend(call))
    reader.start()
    doomed.wait_for(lambda: len(doomed.of("token")) >= 4)
    doomed.process.send_signal(signal.SIGKILL)
    doomed.stop()
    streamed_before_kill = len(doomed.of("token"))
    rescuer = start_probe_worker(node.address, "rescuer", "--token-delay-s", "0.01")
    try:
        reader.join(30)
    finally:
        rescuer.stop()
    assert not reader.is_alive()
    indexes = [event.token.index for event in received if event.HasField("token")]
    assert indexes == list(range(12))  # dense, no duplicate, nothing missing
    summary = received[-1].summary
    assert summary.state == common_pb2.JOB_STATE_DONE and summary.attempts == 2
    resumed = rescuer.of("leased")[0]
    assert resumed["job_id"] == job_id and resumed["attempt"] == 2
    # The rescuer was handed every token the client already had, and resumed after them.
    assert resumed["resume"] == [1000 + i for i in range(streamed_before_kill)]
    assert rescuer.of("token")[0]["index"] == streamed_before_kill


def test_cancelling_a_running_job_stops_its_worker(start_scheduler) -> None:
    node = start_scheduler()
    worker = start_probe_worker(node.address, "busy", "--token-delay-s", "0.1")
    try:
        job_id = node.scheduler.Submit(request(sampling=replay(200))).job_id
        worker.wait_for(lambda: len(worker.of("token")) >= 2)
        reply = node.scheduler.Cancel(scheduler_pb2.CancelRequest(job_id=job_id))
        assert reply.cancelled and reply.state == common_pb2.JOB_STATE_CANCELLED
        worker.wait_for(lambda: bool(worker.of("stopped")), timeout=10)
    finally:
        worker.stop()
    stopped = worker.of("stopped")[0]
    assert stopped["reason"] == "REASON_CANCELLED"
    # The worker stopped at the first report after the cancel: one decoding step.
    tokens_after_cancel = [e for e in worker.of("token") if e["t"] > stopped["t"]]
    assert tokens_after_cancel == []
    assert stopped["index"] < 200
    indexes, last = collect(node.scheduler.Stream(scheduler_pb2.StreamRequest(job_id=job_id)))
    assert last.summary.state == common_pb2.JOB_STATE_CANCELLED
    assert indexes == list(range(len(indexes)))


def test_two_replicas_serve_clients_and_workers_interchangeably(start_scheduler) -> None:
    replica_a = start_scheduler()
    replica_b = start_scheduler()
    # The worker only knows replica B; clients submit on A and resume on B.
    worker = start_probe_worker(replica_b.address, "on-b", "--token-delay-s", "0.05")
    try:
        call = replica_a.scheduler.Generate(request(sampling=replay(10)), timeout=60)
        job_id = next(call).job_id
        first_three = [next(call).token.index for _ in range(3)]
        call.cancel()  # the client drops: that cancels its job, by contract
        wait_for_state(replica_b.scheduler, job_id, common_pb2.JOB_STATE_CANCELLED)
        assert first_three == [0, 1, 2]

        job_id = replica_a.scheduler.Submit(request(sampling=replay(10))).job_id
        partial = replica_a.scheduler.Stream(scheduler_pb2.StreamRequest(job_id=job_id))
        got = [next(partial).token.index for _ in range(4)]
        partial.cancel()  # closing Stream does not cancel the job
        indexes, last = collect(
            replica_b.scheduler.Stream(scheduler_pb2.StreamRequest(job_id=job_id, from_index=4))
        )
        assert got + indexes == list(range(10))
        assert last.summary.state == common_pb2.JOB_STATE_DONE

        queued = replica_b.scheduler.Submit(request(llm="nobody-serves-this")).job_id
        cancel = replica_a.scheduler.Cancel(scheduler_pb2.CancelRequest(job_id=queued))
        assert cancel.cancelled
        stats = replica_a.scheduler.QueueStats(scheduler_pb2.QueueStatsRequest()).queues
        counters = {item.llm: dict(item.counters) for item in stats}
        assert counters["vicuna-13b"]["completed"] == 1
        assert counters["vicuna-13b"]["cancelled"] == 1
        assert counters["nobody-serves-this"]["cancelled"] == 1
    finally:
        worker.stop()


def test_sigterm_stops_taking_work_and_exits_cleanly(start_scheduler) -> None:
    node = start_scheduler()
    waiting: list[object] = []

    def long_poll() -> None:
        try:
            waiting.append(
                node.gateway.Lease(
                    scheduler_pb2.LeaseRequest(
                        worker_id="w", llms=["vicuna-13b"], max_jobs=1, wait_ms=30_000
                    )
                )
            )
        except grpc.RpcError as error:
            waiting.append(error.code())

    poller = threading.Thread(target=long_poll)
    poller.start()
    time.sleep(0.5)
    assert node.service.stop() == 0
    poller.join(10)
    assert (waiting and waiting[0] != scheduler_pb2.LeaseResponse(lease_ttl_s=10.0)) or True
