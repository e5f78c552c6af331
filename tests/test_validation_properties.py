"""Property-based tests (hypothesis) of request validation on real scheduler and predictor
processes: whatever a client or worker sends, the answer is OK or a status that names the
problem — never UNKNOWN or INTERNAL (a crash in a servicer), and the server keeps serving.

Inputs are drawn over every field of every request: odd unicode, huge and negative numbers,
NaN and infinities, empty and oversized strings, ids of jobs that do not exist or belong to
someone else, progress for leases never granted.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.health import wait_for_serving
from services.common.net import free_port
from services.pb import (
    common_pb2,
    predictor_pb2,
    predictor_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from tests.helpers import start_service
from tests.scheduler_support import start_scheduler
from tests.security_support import Tokens, start_secure_scheduler, write_auth_file

__all__ = ["start_scheduler", "start_secure_scheduler"]  # fixtures, imported for pytest

# Statuses a well-behaved server may answer with; UNKNOWN and INTERNAL mean a crash.
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
PROPERTY = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "vicuna-13b", "*", "../../etc", "a" * 300, "\x00", "ssjf:job:x"]),
)
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
int32 = st.integers(-(2**31), 2**31 - 1)
uint32 = st.integers(0, 2**32 - 1)


@st.composite
def generate_requests(draw: st.DrawFn) -> scheduler_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(
        max_new_tokens=draw(uint32),
        temperature=draw(floats),
        top_p=draw(floats),
        stop=draw(st.lists(texts, max_size=20)),
        replay_output_tokens=draw(st.integers(0, 2**32 - 1)),
    )
    if draw(st.booleans()):
        sampling.seed = draw(st.integers(0, 2**64 - 1))
    return scheduler_pb2.GenerateRequest(
        client_request_id=draw(texts),
        llm=draw(texts),
        prompt=draw(st.one_of(texts, st.text(min_size=1, max_size=2000))),
        sampling=sampling,
        priority=draw(int32),
        oracle_output_tokens=draw(uint32),
        start_timeout_ms=draw(uint32),
    )


def status(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        result = call(*args, timeout=30, **kwargs)
        if not hasattr(result, "ListFields"):
            for _ in result:  # a stream: read to the end or the deadline
                pass
    except grpc.RpcError as error:
        assert error.code() in EXPECTED, (error.code(), error.details())
        return error.code()
    return grpc.StatusCode.OK


@pytest.fixture
def node(start_scheduler):
    return start_scheduler("--max-prompt-chars", "1000", "--lease-ttl-s", "30")


def test_submit_never_crashes(node) -> None:
    @PROPERTY
    @given(generate_requests())
    def check(request: scheduler_pb2.GenerateRequest) -> None:
        status(node.scheduler.Submit, request)

    check()
    assert status(node.scheduler.QueueStats, scheduler_pb2.QueueStatsRequest()) == (
        grpc.StatusCode.OK
    )


def test_job_lookups_never_crash(node) -> None:
    real = node.scheduler.Submit(scheduler_pb2.GenerateRequest(prompt="hi"), timeout=30).job_id

    @PROPERTY
    @given(st.one_of(texts, st.just(real)), uint32)
    def check(job_id: str, from_index: int) -> None:
        status(node.scheduler.GetJob, scheduler_pb2.GetJobRequest(job_id=job_id))
        status(node.scheduler.QueueStats, scheduler_pb2.QueueStatsRequest(llm=job_id))
        if job_id != real:  # the real one is left queued: its stream would wait
            stream = scheduler_pb2.StreamRequest(job_id=job_id, from_index=from_index)
            status(node.scheduler.Stream, stream)
            status(node.scheduler.Cancel, scheduler_pb2.CancelRequest(job_id=job_id))

    check()


@st.composite
def job_progress(draw: st.DrawFn) -> scheduler_pb2.JobProgress:
    item = scheduler_pb2.JobProgress(
        job_id=draw(texts),
        lease_id=draw(texts),
        tokens=[
            common_pb2.Token(index=draw(uint32), text=draw(texts), token_id=draw(uint32))
            for _ in range(draw(st.integers(0, 4)))
        ],
    )
    if draw(st.booleans()):
        item.outcome.CopyFrom(
            scheduler_pb2.JobOutcome(
                finish_reason=draw(st.sampled_from(list(common_pb2.FinishReason.values()))),
                error=draw(texts),
                generated_tokens=draw(uint32),
                prompt_tokens=draw(uint32),
                prefill_s=draw(st.floats(allow_nan=True, allow_infinity=True)),
                decode_s=draw(st.floats(allow_nan=True, allow_infinity=True)),
            )
        )
    return item


def test_worker_calls_never_crash(node) -> None:
    @PROPERTY
    @given(texts, st.lists(texts, max_size=5), uint32, st.integers(0, 50))
    def lease(worker_id: str, llms: list[str], max_jobs: int, wait_ms: int) -> None:
        request = scheduler_pb2.LeaseRequest(
            worker_id=worker_id, llms=llms, max_jobs=max_jobs, wait_ms=wait_ms
        )
        status(node.gateway.Lease, request)

    @PROPERTY
    @given(texts, st.lists(job_progress(), max_size=4))
    def report(worker_id: str, items: list[scheduler_pb2.JobProgress]) -> None:
        reports = iter([scheduler_pb2.WorkerReport(worker_id=worker_id, progress=items)])
        status(node.gateway.Report, reports)

    lease()
    report()


def test_any_authorization_header_is_answered_unauthenticated(
    start_secure_scheduler, tmp_path
) -> None:
    tokens = Tokens.new()
    node = start_secure_scheduler("--auth-file", str(write_auth_file(tmp_path / "a", tokens)))
    channel = node.channel()
    scheduler = scheduler_pb2_grpc.SchedulerStub(channel)
    gateway = scheduler_pb2_grpc.WorkerGatewayStub(channel)
    header = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)

    @PROPERTY
    @given(st.one_of(header, header.map(lambda text: "Bearer " + text)))
    def check(value: str) -> None:
        metadata = (("authorization", value),)
        for call, message in (
            (scheduler.QueueStats, scheduler_pb2.QueueStatsRequest()),
            (gateway.Lease, scheduler_pb2.LeaseRequest(worker_id="w", llms=["x"], max_jobs=1)),
        ):
            try:
                call(message, metadata=metadata, timeout=30)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
            else:
                raise AssertionError(f"{value!r} was let in")

    check()


@pytest.fixture
def predictor_stub():
    """A real ``ssjf predictor`` process (the shipped ONNX artifact)."""
    port = free_port()
    service = start_service(["predictor", "--host", "127.0.0.1", "--port", str(port)])
    try:
        wait_for_serving(f"127.0.0.1:{port}", 180, alive=lambda: service.process.poll() is None)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield predictor_pb2_grpc.PredictorStub(channel)
    finally:
        service.stop()


def test_predictor_never_crashes(predictor_stub) -> None:
    prompts = st.one_of(texts, st.text(max_size=3000))

    @PROPERTY
    @given(prompts, texts, st.lists(st.tuples(prompts, texts), max_size=40))
    def check(prompt: str, llm: str, batch: list[tuple[str, str]]) -> None:
        status(predictor_stub.Predict, predictor_pb2.PredictRequest(prompt=prompt, llm=llm))
        requests = [predictor_pb2.PredictRequest(prompt=p, llm=name) for p, name in batch]
        status(predictor_stub.PredictBatch, predictor_pb2.PredictBatchRequest(requests=requests))

    check()


def test_submit_never_crashes_with_auth_and_tenant_limits(start_secure_scheduler, tmp_path):
    """The same requests through authentication, the quota interceptor, the priority
    ceiling and the queued-jobs limit: refused or accepted, never UNKNOWN."""
    tokens = Tokens.new()
    limits = "best_priority = 0\nmax_queued_jobs = 5\nmax_streams = 2\nrequests_per_s = 1000"
    auth = write_auth_file(tmp_path / "a", tokens, acme_limits=limits)
    node = start_secure_scheduler("--auth-file", str(auth), "--max-prompt-chars", "1000")
    scheduler = scheduler_pb2_grpc.SchedulerStub(node.channel(tokens.acme))

    @PROPERTY
    @given(generate_requests())
    def check(request: scheduler_pb2.GenerateRequest) -> None:
        status(scheduler.Submit, request)

    check()
