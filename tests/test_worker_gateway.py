"""The worker process against a real WorkerGateway peer: a minimal gRPC server in the test
that hands out jobs through Lease and records every Report, like the scheduler does."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from services.common.net import free_port
from services.pb import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.helpers import Service, start_service, wait_for_health

pytestmark = pytest.mark.slow
LLM = "vicuna-13b"


class RecordingGateway(scheduler_pb2_grpc.WorkerGatewayServicer):
    """Hands queued jobs to whoever leases, records reports, and sends stop directives."""

    def __init__(self, lease_ttl_s: float) -> None:
        self.lease_ttl_s = lease_ttl_s
        self._lock = threading.Condition()
        self._queue: list[scheduler_pb2.LeasedJob] = []
        self._to_stop: dict[str, scheduler_pb2.StopJob.Reason] = {}
        self.progress: dict[str, list[scheduler_pb2.JobProgress]] = {}
        self.leases: list[scheduler_pb2.LeaseRequest] = []

    def enqueue(
        self, job_id: str, prompt: str, resume: list[int] = (), lease_id: str = "", **sampling
    ) -> None:
        job = scheduler_pb2.LeasedJob(
            job_id=job_id,
            lease_id=lease_id or f"lease-{job_id}",
            llm=LLM,
            prompt=prompt,
            sampling=common_pb2.SamplingParams(**sampling),
            resume_token_ids=resume,
            attempt=2 if resume else 1,
        )
        with self._lock:
            self._queue.append(job)
            self._lock.notify_all()

    def stop(self, job_id: str) -> None:
        with self._lock:
            self._to_stop[job_id] = scheduler_pb2.StopJob.REASON_CANCELLED

    def Lease(self, request, context):
        deadline = time.monotonic() + request.wait_ms / 1000
        with self._lock:
            self.leases.append(request)
            while not self._queue and time.monotonic() < deadline:
                self._lock.wait(deadline - time.monotonic())
            jobs = [job for job in self._queue if job.llm in request.llms][: request.max_jobs]
            self._queue = [job for job in self._queue if job not in jobs]
        return scheduler_pb2.LeaseResponse(jobs=jobs, lease_ttl_s=self.lease_ttl_s)

    def Report(self, request_iterator, context):
        for report in request_iterator:
            with self._lock:
                for entry in report.progress:
                    self.progress.setdefault(entry.job_id, []).append(entry)
                stops = [
                    scheduler_pb2.StopJob(job_id=job_id, reason=reason)
                    for job_id, reason in self._to_stop.items()
                ]
                self._to_stop.clear()
                self._lock.notify_all()
            yield scheduler_pb2.WorkerDirective(stop=stops)

    def tokens(self, job_id: str) -> list[common_pb2.Token]:
        with self._lock:
            return [token for entry in self.progress.get(job_id, []) for token in entry.tokens]

    def outcome(self, job_id: str, timeout: float = 60.0) -> scheduler_pb2.JobOutcome:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for entry in self.progress.get(job_id, []):
                    if entry.HasField("outcome"):
                        return entry.outcome
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no outcome for {job_id}")
                self._lock.wait(0.1)

    def wait_for_tokens(self, job_id: str, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.tokens(job_id)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{job_id}: fewer than {count} tokens")
            time.sleep(0.01)


class Setup:
    def __init__(self, gateway: RecordingGateway, worker: Service, worker_address: str):
        self.gateway, self.worker, self.worker_address = gateway, worker, worker_address

    def info(self) -> worker_pb2.WorkerInfo:
        with grpc.insecure_channel(self.worker_address) as channel:
            return worker_pb2_grpc.WorkerStub(channel).GetWorkerInfo(
                worker_pb2.GetWorkerInfoRequest(), timeout=5
            )


def start_gateway(port: int, lease_ttl_s: float) -> tuple[grpc.Server, RecordingGateway]:
    gateway = RecordingGateway(lease_ttl_s)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    scheduler_pb2_grpc.add_WorkerGatewayServicer_to_server(gateway, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, gateway


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    scheduler_port, worker_port = free_port(), free_port()
    # The worker starts before its scheduler exists: it must keep retrying, not crash.
    worker = start_service(
        [
            "worker",
            "--scheduler", f"127.0.0.1:{scheduler_port}",
            "--port", str(worker_port),
            "--batching", "continuous",
            "--max-batch-size", "4",
            "--model", "tiny-llama",
            "--served-model-name", f"other-llm,{LLM}",
            "--lease-wait-ms", "300",
            "--torch-threads", "1",
        ],
    )  # fmt: skip
    worker_address = f"127.0.0.1:{worker_port}"
    try:
        wait_for_health(worker_address, timeout=180)
    except TimeoutError:
        worker.kill()
        print(worker.log())
        raise
    time.sleep(0.5)  # a few failed Lease attempts happen here
    server, gateway = start_gateway(scheduler_port, lease_ttl_s=0.3)
    yield Setup(gateway, worker, worker_address)
    worker.stop()
    server.stop(grace=None)


def test_worker_info_describes_the_worker(setup: Setup):
    info = setup.info()
    assert list(info.llms) == ["other-llm", LLM]
    assert info.model == "tiny-llama"
    assert info.batching == "continuous"
    assert info.max_batch_size == 4
    assert info.device == "cpu" and info.dtype == "float32"


def test_jobs_stream_every_token_and_report_their_outcome(setup: Setup):
    gateway = setup.gateway
    lengths = {"stream-a": 5, "stream-b": 17, "stream-c": 9}
    for job_id, length in lengths.items():
        gateway.enqueue(job_id, f"Tell me about {job_id}.", max_new_tokens=length)
    for job_id, length in lengths.items():
        outcome = gateway.outcome(job_id)
        tokens = gateway.tokens(job_id)
        assert outcome.finish_reason in (
            common_pb2.FINISH_REASON_LENGTH,
            common_pb2.FINISH_REASON_EOS,
        )
        assert [token.index for token in tokens] == list(range(outcome.generated_tokens))
        assert outcome.generated_tokens == length or (
            outcome.finish_reason == common_pb2.FINISH_REASON_EOS
        )
        assert outcome.prompt_tokens > 0
        assert outcome.prefill_s > 0 and outcome.decode_s > 0
        # Tokens arrive step by step, not all at the end.
        entries_with_tokens = [e for e in gateway.progress[job_id] if e.tokens]
        assert len(entries_with_tokens) > 1 or outcome.generated_tokens == 1
        assert all(e.lease_id == f"lease-{job_id}" for e in gateway.progress[job_id])
    assert all(LLM in lease.llms for lease in gateway.leases)
    assert all(1 <= lease.max_jobs <= 4 for lease in gateway.leases)


def test_replay_lengths_are_exact(setup: Setup):
    targets = {"replay-1": 1, "replay-2": 23, "replay-3": 64}
    for job_id, target in targets.items():
        setup.gateway.enqueue(job_id, "Hello", max_new_tokens=3, replay_output_tokens=target)
    for job_id, target in targets.items():
        outcome = setup.gateway.outcome(job_id)
        assert outcome.finish_reason == common_pb2.FINISH_REASON_REPLAY_LENGTH
        assert outcome.generated_tokens == target
        assert [t.index for t in setup.gateway.tokens(job_id)] == list(range(target))


def test_resumed_job_streams_from_the_next_index(setup: Setup):
    gateway = setup.gateway
    gateway.enqueue("first-try", "Resume me.", max_new_tokens=12)
    gateway.outcome("first-try")
    first = gateway.tokens("first-try")
    gateway.enqueue(
        "second-try", "Resume me.", resume=[t.token_id for t in first[:5]], max_new_tokens=12
    )
    outcome = gateway.outcome("second-try")
    resumed = gateway.tokens("second-try")
    assert [t.index for t in resumed] == list(range(5, 12))
    assert [t.token_id for t in resumed] == [t.token_id for t in first[5:]]
    assert outcome.generated_tokens == 12


def test_stop_directive_stops_the_job_and_frees_its_slot(setup: Setup):
    gateway = setup.gateway
    gateway.enqueue("to-cancel", "Talk for a long time.", max_new_tokens=1500)
    gateway.wait_for_tokens("to-cancel", 3)
    gateway.stop("to-cancel")
    deadline = time.monotonic() + 30
    while setup.info().active_jobs and time.monotonic() < deadline:
        time.sleep(0.05)
    assert setup.info().active_jobs == 0
    streamed = len(gateway.tokens("to-cancel"))
    time.sleep(0.3)
    assert len(gateway.tokens("to-cancel")) == streamed, "no progress after the stop"
    assert streamed < 1500
    assert not any(e.HasField("outcome") for e in gateway.progress["to-cancel"])
    # The freed slot takes new work.
    gateway.enqueue("after-cancel", "Next.", max_new_tokens=4)
    assert gateway.outcome("after-cancel").generated_tokens == 4


def test_job_leased_again_restarts_from_its_resume_point(setup: Setup):
    """The worker's old lease lapsed (as the scheduler saw it) while the job still ran here,
    and the job comes back under a new lease: the old run stops, the new one streams from
    the resume point the scheduler gave, so the answer has no gap."""
    gateway = setup.gateway
    gateway.enqueue("again", "Once more.", lease_id="old", max_new_tokens=1000)
    gateway.wait_for_tokens("again", 4)
    accepted = [t.token_id for t in gateway.tokens("again")[:2]]
    gateway.enqueue("again", "Once more.", resume=accepted, lease_id="new", max_new_tokens=12)
    outcome = gateway.outcome("again")
    new_run = [e for e in gateway.progress["again"] if e.lease_id == "new"]
    assert [t.index for e in new_run for t in e.tokens] == list(range(2, 12))
    assert outcome.generated_tokens == 12
    old_run = [e for e in gateway.progress["again"] if e.lease_id == "old"]
    assert not any(e.HasField("outcome") for e in old_run)
    leases = [e.lease_id for e in gateway.progress["again"]]
    assert leases == sorted(leases, key=lambda lease: lease == "new"), "old run reported late"
    assert setup.info().active_jobs == 0


def test_heartbeats_renew_leases_during_a_long_prefill(setup: Setup):
    gateway = setup.gateway
    gateway.enqueue("long-prompt", "word " * 1900, max_new_tokens=2)
    gateway.outcome("long-prompt")
    entries = gateway.progress["long-prompt"]
    heartbeats = [e for e in entries if not e.tokens and not e.HasField("outcome")]
    first_token_at = next(i for i, e in enumerate(entries) if e.tokens)
    assert heartbeats, "an empty JobProgress renews the lease before the first token"
    assert entries.index(heartbeats[0]) < first_token_at


def test_invalid_sampling_fails_the_job_with_a_reason(setup: Setup):
    setup.gateway.enqueue("bad-top-p", "Hello", max_new_tokens=4, top_p=1.5)
    outcome = setup.gateway.outcome("bad-top-p")
    assert outcome.finish_reason == common_pb2.FINISH_REASON_ERROR
    assert "top_p" in outcome.error


def test_sigterm_finishes_held_jobs_then_exits():
    scheduler_port, worker_port = free_port(), free_port()
    server, gateway = start_gateway(scheduler_port, lease_ttl_s=30)
    worker = start_service(
        [
            "worker",
            "--scheduler", f"127.0.0.1:{scheduler_port}",
            "--port", str(worker_port),
            "--batching", "dynamic",
            "--max-batch-size", "2",
            "--model", "tiny-llama",
            "--served-model-name", LLM,
            "--lease-wait-ms", "200",
            "--torch-threads", "1",
        ]
    )  # fmt: skip
    try:
        wait_for_health(f"127.0.0.1:{worker_port}", timeout=180)
        gateway.enqueue("drain-me", "Keep going.", max_new_tokens=200)
        gateway.wait_for_tokens("drain-me", 1)
        worker.process.send_signal(15)
        assert worker.process.wait(60) == 0, worker.log()
        outcome = gateway.outcome("drain-me", timeout=1)
        assert outcome.generated_tokens == 200
        assert [t.index for t in gateway.tokens("drain-me")] == list(range(200))
    finally:
        worker.stop()
        server.stop(grace=None)


@pytest.mark.parametrize(
    "flag", ["--max-prefill-tokens", "--max-batch-size", "--max-batch-total-tokens"]
)
def test_a_non_positive_size_is_refused_before_the_model_loads(flag: str):
    command = [sys.executable, "-m", "services.cli", "worker", "--model", "tiny-llama", flag, "0"]
    command += ["--port", str(free_port()), "--scheduler", f"127.0.0.1:{free_port()}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert f"{flag} must be at least 1, got 0" in result.stderr
