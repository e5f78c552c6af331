"""The OpenAI-compatible HTTP front against the real stack: redis-server, the predictor with
the shipped artifact, a scheduler, a worker generating with the tiny transformers model, and
``ssjf http``, each its own process. Clients: the official ``openai`` package, ``curl -N``
and raw sockets (to disconnect at a chosen moment)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import openai
import pytest
import redis
from transformers import AutoTokenizer

from services.common.grpc_server import CHANNEL_OPTIONS
from services.common.health import wait_for_http
from services.common.net import free_port
from services.pb import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.worker.tiny_model import ensure_tiny_model
from tests.helpers import Service, start_service, wait_for_health
from tests.redis_server import RedisServerProcess

pytestmark = pytest.mark.slow

MODEL = "tiny"
PARKED = "parked"  # an LLM whose only "worker" is the test itself: its jobs stay queued
LEASE_TTL_S = 2.0


@dataclass
class HttpStack:
    base_url: str
    port: int
    scheduler: scheduler_pb2_grpc.SchedulerStub
    gateway: scheduler_pb2_grpc.WorkerGatewayStub
    worker: Service
    front: Service

    def client(self, **options: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, **options)

    def post(self, path: str, body: object, headers: dict[str, str] | None = None):
        """(status, headers, JSON body) of a plain POST."""
        request = urllib.request.Request(
            self.base_url.removesuffix("/v1") + path,
            data=body if isinstance(body, bytes) else json.dumps(body).encode(),
            headers={"content-type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, dict(response.headers), json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), json.loads(error.read())

    def park(self) -> None:
        """Register a worker for PARKED that takes no job (its queue must be empty), and wait
        until the front lists it (GET /v1/models also refreshes the front's cached list)."""
        self.gateway.Lease(
            scheduler_pb2.LeaseRequest(worker_id="parking", llms=[PARKED], max_jobs=1)
        )
        listed = urllib.request.urlopen(f"{self.base_url}/models", timeout=30).read()
        assert PARKED in [model["id"] for model in json.loads(listed)["data"]]

    def stats(self, llm: str) -> scheduler_pb2.QueueStats:
        reply = self.scheduler.QueueStats(scheduler_pb2.QueueStatsRequest(llm=llm))
        return reply.queues[0]


def wait_for_front(port: int, service: Service, timeout: float = 60) -> None:
    try:
        wait_for_http(
            f"http://127.0.0.1:{port}/health", timeout, alive=lambda: service.process.poll() is None
        )
    except (RuntimeError, TimeoutError) as error:
        raise AssertionError(f"the HTTP front did not start ({error}):\n{service.log()}") from None


def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stack(redis_server: RedisServerProcess) -> Iterator[HttpStack]:
    redis.Redis.from_url(redis_server.url).flushall()
    predictor, scheduler, worker, http = (f"127.0.0.1:{free_port()}" for _ in range(4))
    port = lambda address: address.rsplit(":", 1)[1]  # noqa: E731
    services = [
        start_service(["predictor", "--port", port(predictor)]),
        start_service(
            [
                "scheduler", "--port", port(scheduler), "--redis-url", redis_server.url,
                "--predictor", predictor, "--policy", "ssjf",
                "--lease-ttl-s", str(LEASE_TTL_S), "--reap-interval-s", "0.2",
                "--max-queue-depth", "2",
            ]
        ),
        start_service(
            [
                "worker", "--port", port(worker), "--scheduler", scheduler,
                "--model", "tiny-llama", "--served-model-name", MODEL,
                "--batching", "continuous", "--max-batch-size", "4",
            ]
        ),
        start_service(["http", "--port", port(http), "--host", "127.0.0.1",
                       "--scheduler", scheduler]),
    ]  # fmt: skip
    channel = grpc.insecure_channel(scheduler, options=CHANNEL_OPTIONS)
    try:
        for address in (predictor, scheduler, worker):
            wait_for_health(address, timeout=180)
        wait_for_front(int(port(http)), services[3])
        yield HttpStack(
            base_url=f"http://{http}/v1",
            port=int(port(http)),
            scheduler=scheduler_pb2_grpc.SchedulerStub(channel),
            gateway=scheduler_pb2_grpc.WorkerGatewayStub(channel),
            worker=services[2],
            front=services[3],
        )
    finally:
        channel.close()
        for service in reversed(services):
            service.stop()


CHAT = [{"role": "user", "content": "Name three colours."}]


def test_openai_client_chat_sync_and_streaming_agree(stack: HttpStack) -> None:
    client = stack.client()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=CHAT, max_tokens=12, temperature=0
    )
    answer = raw.parse()
    job_id = raw.headers["x-ssjf-job-id"]
    assert answer.id == f"chatcmpl-{job_id}"
    assert answer.object == "chat.completion" and answer.model == MODEL
    [choice] = answer.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < answer.usage.completion_tokens <= 12
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    job = stack.scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id))
    assert job.state == common_pb2.JOB_STATE_DONE

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_completion_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    # Greedy decoding: the streamed answer is the same text as the whole one.
    assert text == choice.message.content
    finish = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finish[-1] == choice.finish_reason and not any(finish[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage


def test_openai_client_completions_sync_and_streaming(stack: HttpStack) -> None:
    client = stack.client()
    whole = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, seed=7
    )
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].text and whole.usage.completion_tokens <= 8
    streamed = list(
        client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == whole.choices[0].text
    assert streamed[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_models_lists_live_workers_with_their_predictor_head(stack: HttpStack) -> None:
    models = {model.id: model for model in stack.client().models.list()}
    assert MODEL in models
    card = models[MODEL].model_dump()
    assert card["workers"] == 1
    # The shipped proxy model has no head of its own for "tiny": the all-LLM head orders it.
    assert card["predictor_head"] == "*" and card["predictor_version"]
    assert stack.client().models.retrieve(MODEL).id == MODEL


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_sees_well_framed_server_sent_events(stack: HttpStack) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 6, "stream": True}
    result = subprocess.run(
        ["curl", "-sN", "-D", "-", f"{stack.base_url}/chat/completions",
         "-H", "content-type: application/json", "-d", json.dumps(body)],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    head, _, stream = result.stdout.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200")
    assert "content-type: text/event-stream" in head.lower()
    assert "x-ssjf-job-id:" in head.lower()
    events = stream.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event
        chunk = json.loads(event.removeprefix("data: "))
        assert chunk["object"] == "chat.completion.chunk"


def test_a_system_prompt_and_earlier_turns_reach_the_model(stack: HttpStack) -> None:
    marker = f"You are pirate number {time.time_ns()}."
    messages = [
        {"role": "system", "content": marker},
        {"role": "user", "content": "What is the sea?"},
        {"role": "assistant", "content": "Home."},
        {"role": "user", "content": "And the sky?"},
    ]
    answer = stack.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    # The worker rendered every turn with its model's chat template (it logs the rendered
    # prompt at debug level) ...
    rendered = (
        f"### system: {marker}\n### user: What is the sea?\n### assistant: Home.\n"
        "### user: And the sky?\n### assistant:"
    )
    wait_until(lambda: f"prompt={rendered}" in stack.worker.log(), timeout=30)
    # ... and the model read exactly that many tokens.
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_tiny_model()))
    expected = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert answer.usage.prompt_tokens == len(expected["input_ids"])


def open_stream(stack: HttpStack, body: dict) -> tuple[socket.socket, str, bytes]:
    """POST ``body`` on a raw socket; returns it with the response head and what followed."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", stack.port), timeout=120)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(data)}\r\n\r\n".encode()
        + data
    )
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, rest = received.partition(b"\r\n\r\n")
    return sock, head.decode(), rest


def job_id_of(head: str) -> str:
    for line in head.split("\r\n"):
        name, _, value = line.partition(":")
        if name.lower() == "x-ssjf-job-id":
            return value.strip()
    raise AssertionError(f"no job id header in {head!r}")


def test_a_client_disconnecting_mid_stream_cancels_its_job(stack: HttpStack) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 30_000, "stream": True,
            "stop": ["\u2603never\u2603"]}  # fmt: skip
    sock, head, received = open_stream(stack, body)
    job_id = job_id_of(head)
    while received.count(b"data: ") < 3:  # the role chunk and two tokens
        received += sock.recv(65536)
    sock.close()
    wait_until(
        lambda: (
            stack.scheduler.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id)).state
            == common_pb2.JOB_STATE_CANCELLED
        ),
        timeout=60,
    )


def test_a_client_disconnecting_from_a_whole_answer_cancels_its_job(stack: HttpStack) -> None:
    cancelled_before = stack.stats(MODEL).counters.get("cancelled", 0)
    data = json.dumps({"model": MODEL, "messages": CHAT, "max_tokens": 30_000}).encode()
    sock = socket.create_connection(("127.0.0.1", stack.port), timeout=60)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(data)}\r\n\r\n".encode()
        + data
    )
    wait_until(lambda: stack.stats(MODEL).running == 1, timeout=60)
    sock.close()
    wait_until(lambda: stack.stats(MODEL).counters.get("cancelled", 0) == cancelled_before + 1)
    wait_until(lambda: stack.stats(MODEL).running == 0)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": "high"}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"priority": 1000}, "priority"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"model": ""}, "model"),
        ({"stop": ["a"] * 17}, "stop"),
    ],
)
def test_validation_errors_are_400_naming_the_field(
    stack: HttpStack, change: dict, param: str
) -> None:
    status, _, body = stack.post(
        "/v1/chat/completions", {"model": MODEL, "messages": CHAT, **change}
    )
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param and body["error"]["message"]


def test_malformed_json_and_scheduler_refusals_are_400(stack: HttpStack) -> None:
    status, _, body = stack.post("/v1/chat/completions", b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    # The conversation must end with a user turn: the scheduler's INVALID_ARGUMENT.
    status, _, body = stack.post(
        "/v1/chat/completions",
        {"model": MODEL, "messages": [*CHAT, {"role": "assistant", "content": "Red."}]},
    )
    assert status == 400 and "user turn" in body["error"]["message"]


def test_the_openai_client_raises_its_typed_errors(stack: HttpStack) -> None:
    client = stack.client()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, n=3)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert missing.value.body["code"] == "model_not_found"


def test_unknown_model_is_404_and_a_model_without_live_worker_503(stack: HttpStack) -> None:
    status, _, body = stack.post("/v1/completions", {"model": "never-served", "prompt": "hi"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    stack.park()  # PARKED is now known ...
    models = stack.scheduler.ListModels(scheduler_pb2.ListModelsRequest())
    assert PARKED in [model.llm for model in models.models]
    # ... and once its worker's registration lapsed, no live worker serves it.
    wait_until(
        lambda: (
            PARKED
            not in [
                m.llm for m in stack.scheduler.ListModels(scheduler_pb2.ListModelsRequest()).models
            ]
        ),
        timeout=30,
    )
    status, headers, body = stack.post("/v1/completions", {"model": PARKED, "prompt": "hi"})
    assert status == 503 and body["error"]["code"] == "no_worker"
    assert int(headers["retry-after"]) >= 1


def test_a_full_queue_is_429_with_retry_after(stack: HttpStack) -> None:
    stack.park()
    body = {"model": PARKED, "messages": CHAT, "stream": True}
    held = []
    try:
        # The queue holds two (--max-queue-depth 2); the third is refused.
        for _ in range(2):
            sock, head, _ = open_stream(stack, body)
            assert head.startswith("HTTP/1.1 200"), head
            held.append(sock)
        status, headers, error = stack.post("/v1/chat/completions", body)
        assert status == 429 and error["error"]["code"] == "queue_full"
        assert int(headers["retry-after"]) >= 1
    finally:
        for sock in held:
            sock.close()
    # Their clients left, so the queued jobs were cancelled, and the queue is empty again.
    wait_until(lambda: stack.stats(PARKED).queued == 0, timeout=30)


@pytest.mark.parametrize("stream", [False, True])
def test_a_missed_start_deadline_is_504(stack: HttpStack, stream: bool) -> None:
    stack.park()
    status, _, body = stack.post(
        "/v1/chat/completions",
        {"model": PARKED, "messages": CHAT, "start_timeout_ms": 300, "stream": stream},
    )
    assert status == 504 and body["error"]["code"] == "start_deadline"
