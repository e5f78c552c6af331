"""Prediction off the critical path: queue at once, re-score while queued, breaker, clamp.

Integration tests run the real scheduler process on a real Redis with a real gRPC predictor
whose answers the test releases (a gate), so "before the prediction arrives" is a fact of
the test, not a guess about speed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from services.bench.loadgen import RequestResult, read_back
from services.common.first_stage import FirstStageModel, fit_first_stage
from services.pb import predictor_pb2, predictor_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.policies import MAX_AGING_RATE, JobFeatures, make_policy
from services.scheduler.predictor_client import (
    MAX_PREDICTED_TOKENS,
    BreakerState,
    CircuitBreaker,
    PredictorClient,
    clamp_prediction,
)
from tests.scheduler_support import request, start_scheduler

__all__ = ["start_scheduler"]  # fixture, imported for pytest

LLM = "vicuna-13b"
VERSION = "gated-test"


class GatedPredictor(predictor_pb2_grpc.PredictorServicer):
    """Predicts ten tokens per word, but only once the test opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls = 0
        self.predicted = 0

    def Predict(self, request, context):
        self.calls += 1
        if not self.gate.wait(timeout=30):
            context.abort(grpc.StatusCode.UNAVAILABLE, "gate never opened")
        self.predicted += 1
        return predictor_pb2.PredictResponse(
            predicted_output_tokens=10.0 * len(request.prompt.split()),
            model_version=VERSION,
            llm=request.llm,
        )


@pytest.fixture
def gated_predictor():
    servicer = GatedPredictor()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    predictor_pb2_grpc.add_PredictorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    servicer.gate.set()
    server.stop(grace=None)


def lease(node, max_jobs: int = 1, wait_ms: int = 0):
    return node.gateway.Lease(
        scheduler_pb2.LeaseRequest(worker_id="w", llms=[LLM], max_jobs=max_jobs, wait_ms=wait_ms)
    ).jobs


def counters(node) -> dict[str, int]:
    queues = node.scheduler.QueueStats(scheduler_pb2.QueueStatsRequest(llm=LLM)).queues
    return dict(queues[0].counters) if queues else {}


def wait_for_counters(node, timeout: float = 30.0, **expected: int) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        seen = counters(node)
        if all(seen.get(name, 0) >= value for name, value in expected.items()):
            return seen
        assert time.monotonic() < deadline, f"counters {seen}, expected at least {expected}"
        time.sleep(0.05)


def test_job_is_leasable_before_its_prediction_arrives(start_scheduler, gated_predictor) -> None:
    address, predictor = gated_predictor
    # No grace: the predictor is asked at once, so the lease below happens while it is busy.
    node = start_scheduler(
        "--predictor", address, "--predictor-timeout-ms", "60000", "--prediction-grace-ms", "0"
    )
    reply = node.scheduler.Submit(request(prompt="one two three"))
    assert not reply.job.prediction_fallback  # pending, not failed
    [job] = lease(node)  # the predictor has not answered (its gate is closed)
    assert job.job_id == reply.job_id
    assert predictor.predicted == 0
    predictor.gate.set()
    seen = wait_for_counters(node, prediction_late=1)
    assert seen.get("rescored", 0) == 0
    record = node.scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=job.job_id))
    assert record.predictor_version != VERSION  # dispatched on its first-stage score
    assert not record.prediction_fallback


def test_late_prediction_rescores_only_queued_jobs(start_scheduler, gated_predictor) -> None:
    address, predictor = gated_predictor
    # No first-stage model: every job waits at the same fallback score, in arrival order.
    node = start_scheduler(
        "--predictor",
        address,
        "--predictor-timeout-ms",
        "60000",
        "--first-stage",
        "",
        "--prediction-grace-ms",
        "0",
    )
    prompts = ["a b c d e f", "a b c", "a"]  # 60, 30, 10 predicted tokens
    ids = {node.scheduler.Submit(request(prompt=p)).job_id: p for p in prompts}
    [first] = lease(node)
    assert ids[first.job_id] == "a b c d e f"  # arrival order before any prediction
    predictor.gate.set()
    wait_for_counters(node, rescored=2, prediction_late=1)
    served = [ids[job.job_id] for job in lease(node, max_jobs=2)]
    assert served == ["a", "a b c"]  # re-scored: shortest predicted first, not arrival order
    leased = node.scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=first.job_id))
    assert leased.predictor_version == ""  # the leased job kept its record and score
    for job_id, prompt in ids.items():
        if job_id != first.job_id:
            record = node.scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id))
            assert record.predictor_version == VERSION
            assert record.predicted_output_tokens == 10 * len(prompt.split())


def test_a_job_taken_within_the_grace_is_never_predicted(start_scheduler, gated_predictor) -> None:
    """A job an idle worker takes at once needs no prediction: the predictor is not asked
    (no work for it, nothing competing with the lease), and the job is counted as such; a
    job still queued when the grace ends is predicted and re-scored as before."""
    address, predictor = gated_predictor
    predictor.gate.set()
    node = start_scheduler(
        "--predictor", address, "--predictor-timeout-ms", "60000", "--prediction-grace-ms", "2000"
    )
    taken = node.scheduler.Submit(request(prompt="one two three")).job_id
    [job] = lease(node)
    assert job.job_id == taken
    waiting = node.scheduler.Submit(request(prompt="four five")).job_id
    seen = wait_for_counters(node, prediction_unneeded=1, rescored=1)
    assert seen.get("prediction_late", 0) == 0
    assert predictor.calls == 1  # only the job that was still queued
    record = node.scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=waiting))
    assert record.predictor_version == VERSION
    assert record.predicted_output_tokens == 20
    taken_record = node.scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=taken))
    assert taken_record.predictor_version != VERSION  # kept its first-stage score
    assert not taken_record.prediction_fallback


def test_bench_records_the_score_a_job_ended_with(start_scheduler, gated_predictor) -> None:
    """ssjf bench reads each job's predicted tokens back from its record: the proxy model's
    answer where it re-scored the queued job, not the first-stage estimate the job was
    accepted with (which the benchmark once recorded, and the simulator then replayed)."""
    address, predictor = gated_predictor
    node = start_scheduler("--predictor", address, "--predictor-timeout-ms", "60000")
    job_id = node.scheduler.Submit(request(prompt="one two three four")).job_id
    accepted = node.scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id))
    assert accepted.predictor_version != VERSION  # the first-stage estimate, for now
    predictor.gate.set()
    wait_for_counters(node, rescored=1)
    result = RequestResult(
        index=0, prompt_id=0, output_tokens=1, true_output_tokens=1, arrival_s=0.0,
        submitted_s=0.0, job_id=job_id,
        predicted_output_tokens=accepted.predicted_output_tokens,
    )  # fmt: skip

    async def read() -> None:
        async with grpc.aio.insecure_channel(node.address) as channel:
            await read_back(scheduler_pb2_grpc.SchedulerStub(channel), [result])

    asyncio.run(read())
    assert accepted.predicted_output_tokens != 40.0
    assert result.predicted_output_tokens == 40.0  # ten per word, the gated model's answer
    assert result.predictor_version == VERSION


def test_breaker_stops_calling_a_hung_predictor_then_closes(
    start_scheduler, gated_predictor
) -> None:
    address, predictor = gated_predictor
    node = start_scheduler(
        "--predictor", address, "--predictor-timeout-ms", "200",
        "--breaker-failures", "2", "--breaker-open-s", "2",
    )  # fmt: skip
    for index in range(2):  # one at a time: two timeouts in a row open the breaker
        node.scheduler.Submit(request(prompt=f"hung {index}"))
        wait_for_counters(node, prediction_fallback=index + 1)
    for index in range(2, 6):
        node.scheduler.Submit(request(prompt=f"hung {index}"))
    wait_for_counters(node, prediction_fallback=6)
    assert predictor.calls == 2  # then the breaker opened: no more calls, no more timeouts
    predictor.gate.set()  # the predictor recovers
    time.sleep(2.5)  # the breaker's open period passes
    node.scheduler.Submit(request(prompt="probe"))
    wait_for_counters(node, rescored=1)
    node.scheduler.Submit(request(prompt="closed again"))
    wait_for_counters(node, rescored=2)
    assert predictor.calls == 4


def test_sync_mode_waits_for_the_prediction(start_scheduler, gated_predictor) -> None:
    address, predictor = gated_predictor
    predictor.gate.set()
    node = start_scheduler("--predictor", address, "--prediction-mode", "sync")
    reply = node.scheduler.Submit(request(prompt="one two"))
    assert reply.job.predictor_version == VERSION
    assert reply.job.predicted_output_tokens == 20


def test_circuit_breaker_opens_half_opens_and_closes() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=3, open_s=10.0, clock=lambda: now[0])
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and breaker.times_opened == 1
    now[0] = 9.9
    assert not breaker.allow()
    now[0] = 10.0
    assert breaker.allow()  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow()  # one probe at a time
    breaker.record_failure()  # the probe failed: open again at once
    assert breaker.state is BreakerState.OPEN and breaker.times_opened == 2
    now[0] = 20.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()
    breaker.record_failure()  # one failure after closing does not reopen it
    assert breaker.state is BreakerState.CLOSED


def test_clamped_predictions_never_outweigh_a_priority_class() -> None:
    assert clamp_prediction(1e30) == MAX_PREDICTED_TOKENS
    assert clamp_prediction(0.0) == 1.0
    assert clamp_prediction(500.0, high=100.0) == 100.0
    policy = make_policy("ssjf", MAX_AGING_RATE)
    thirty_years = 30 * 365 * 86400.0
    urgent_long = JobFeatures(
        arrival_s=1.8e9 + thirty_years, predicted_tokens=clamp_prediction(1e30), priority=-1
    )
    normal_short = JobFeatures(arrival_s=1.8e9, predicted_tokens=1.0, priority=0)
    assert policy.score(urgent_long) < policy.score(normal_short)
    with pytest.raises(ValueError, match="max_predicted_tokens"):
        PredictorClient("127.0.0.1:1", 0.1, max_predicted_tokens=1e12)


def test_first_stage_model_learns_and_round_trips(tmp_path) -> None:
    texts = [f"write {'a long essay ' * n}about topic {n}" for n in range(1, 41)]
    texts += [f"answer yes or no {n}" for n in range(40)]
    lengths = np.array([[np.log1p(400.0 + n) for n in range(40)] + [np.log1p(5.0)] * 40])
    model = fit_first_stage(texts, lengths, ["m"], dim=1 << 10, version="fs-test")
    assert model.predict("write a long essay about dogs", "m") > 4 * model.predict(
        "answer yes or no please", "m"
    )
    assert model.head_for("unknown-llm") == "*"
    model.save(tmp_path / "fs.npz")
    loaded = FirstStageModel.load(tmp_path / "fs.npz")
    assert loaded.version == "fs-test" and loaded.heads == ["m", "*"]
    assert loaded.predict("answer yes or no", "m") == pytest.approx(
        model.predict("answer yes or no", "m"), rel=1e-2
    )


def test_the_grace_flag_defaults_to_the_core_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI writes the default out (importing the prediction module would slow every
    `ssjf` command's start-up); it must stay the core's."""
    import argparse

    from services.scheduler.cli import add_arguments
    from services.scheduler.prediction import DEFAULT_GRACE_S

    monkeypatch.delenv("SSJF_PREDICTION_GRACE_MS", raising=False)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).prediction_grace_ms == pytest.approx(1e3 * DEFAULT_GRACE_S)
