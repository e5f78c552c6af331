"""Helpers for the scheduler's tests: scheduler processes, probe workers, gRPC stubs."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from services.common.grpc_server import CHANNEL_OPTIONS
from services.common.net import free_port
from services.pb import (
    common_pb2,
    predictor_pb2,
    predictor_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from tests.helpers import REPO_ROOT, Service, start_service, wait_for_health

PROBE_WORKER = Path(__file__).with_name("scheduler_probe_worker.py")


@dataclass
class SchedulerProcess:
    service: Service
    address: str
    channel: grpc.Channel
    scheduler: scheduler_pb2_grpc.SchedulerStub
    gateway: scheduler_pb2_grpc.WorkerGatewayStub


@pytest.fixture
def start_scheduler(redis_url: str) -> Iterator[Callable[..., SchedulerProcess]]:
    """Starts ``ssjf scheduler`` processes on the test Redis; stops them after the test."""
    started: list[SchedulerProcess] = []

    def start(*flags: str) -> SchedulerProcess:
        port = free_port()
        service = start_service(
            [
                "scheduler",
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--redis-url",
                redis_url,
                *flags,
            ]
        )
        address = f"127.0.0.1:{port}"
        try:
            wait_for_health(address, timeout=30)
        except TimeoutError:
            service.stop()
            raise AssertionError(f"scheduler did not start:\n{service.log()}") from None
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        process = SchedulerProcess(
            service,
            address,
            channel,
            scheduler_pb2_grpc.SchedulerStub(channel),
            scheduler_pb2_grpc.WorkerGatewayStub(channel),
        )
        started.append(process)
        return process

    yield start
    for process in started:
        process.channel.close()
        process.service.stop()


@dataclass
class ProbeWorker:
    """tests/scheduler_probe_worker.py as a process; its JSON events are collected live."""

    process: subprocess.Popen[str]
    events: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                self.events.append(json.loads(line))

    def of(self, kind: str) -> list[dict]:
        return [event for event in list(self.events) if event["event"] == kind]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"condition not met; worker events: {self.events}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(10)
        self._reader.join(5)


def start_probe_worker(address: str, worker_id: str, *flags: str) -> ProbeWorker:
    process = subprocess.Popen(
        [
            sys.executable,
            str(PROBE_WORKER),
            "--scheduler",
            address,
            "--worker-id",
            worker_id,
            *flags,
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        text=True,
    )
    return ProbeWorker(process)


def request(prompt: str = "Tell me a joke.", **fields: object) -> scheduler_pb2.GenerateRequest:
    return scheduler_pb2.GenerateRequest(prompt=prompt, **fields)


def replay(tokens: int) -> common_pb2.SamplingParams:
    """Sampling that makes a probe worker produce exactly ``tokens`` tokens."""
    return common_pb2.SamplingParams(replay_output_tokens=tokens)


def wait_for_state(
    scheduler: scheduler_pb2_grpc.SchedulerStub, job_id: str, state: int, timeout: float = 20.0
) -> scheduler_pb2.Job:
    deadline = time.monotonic() + timeout
    while True:
        job = scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id))
        if job.state == state or time.monotonic() > deadline:
            assert job.state == state, job
            return job
        time.sleep(0.05)


def collect(events: Iterator[scheduler_pb2.JobEvent]) -> tuple[list[int], scheduler_pb2.JobEvent]:
    """Token indexes of a stream, and its last event (the summary)."""
    indexes = []
    last = None
    for event in events:
        if event.HasField("token"):
            indexes.append(event.token.index)
        last = event
    assert last is not None and last.HasField("summary"), last
    return indexes, last


class WordCountPredictor(predictor_pb2_grpc.PredictorServicer):
    """A real gRPC predictor server whose "model" predicts the prompt's word count times ten,
    answering after ``delay_s``: enough to test ordering and timeouts without ONNX."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls = 0

    def Predict(self, request, context):
        self.calls += 1
        time.sleep(self.delay_s)
        return predictor_pb2.PredictResponse(
            predicted_output_tokens=10.0 * len(request.prompt.split()),
            model_version="word-count-test",
            llm=request.llm,
        )


@pytest.fixture
def start_predictor() -> Iterator[Callable[[float], tuple[str, WordCountPredictor]]]:
    servers: list[grpc.Server] = []

    def start(delay_s: float = 0.0) -> tuple[str, WordCountPredictor]:
        servicer = WordCountPredictor(delay_s)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        predictor_pb2_grpc.add_PredictorServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", servicer

    yield start
    for server in servers:
        server.stop(grace=None)


class ReportSession:
    """A WorkerGateway.Report stream driven step by step: send a report, read its directive."""

    _END = object()

    def __init__(self, gateway: scheduler_pb2_grpc.WorkerGatewayStub, worker_id: str) -> None:
        self.worker_id = worker_id
        self._outbox: queue.Queue[object] = queue.Queue()
        self._replies = gateway.Report(iter(self._outbox.get, self._END))

    def send(self, *progress: scheduler_pb2.JobProgress) -> scheduler_pb2.WorkerDirective:
        self._outbox.put(scheduler_pb2.WorkerReport(worker_id=self.worker_id, progress=progress))
        return next(self._replies)

    def close(self) -> None:
        self._outbox.put(self._END)


def progress(
    job: scheduler_pb2.LeasedJob,
    indexes: range | list[int] = (),
    finish: int | None = None,
) -> scheduler_pb2.JobProgress:
    """A JobProgress for ``job`` with probe-style tokens, and an outcome when ``finish``."""
    item = scheduler_pb2.JobProgress(
        job_id=job.job_id,
        lease_id=job.lease_id,
        tokens=[common_pb2.Token(index=i, text=f"t{i} ", token_id=1000 + i) for i in indexes],
    )
    if finish is not None:
        item.outcome.CopyFrom(scheduler_pb2.JobOutcome(finish_reason=finish))
    return item
