"""The HTTP front in front of an instant stand-in scheduler (a real gRPC server process):
credentials forwarded as gRPC metadata, UNAUTHENTICATED/PERMISSION_DENIED as 401/403,
and the request translation as pure functions."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from services.common.net import free_port
from services.http.bench import MODEL
from services.http.errors import ApiError, from_grpc
from services.http.protocol import parse_chat, parse_completion
from tests.helpers import REPO_ROOT, Service, start_service, wait_for_health
from tests.test_http_api import wait_for_front

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def front_port() -> Iterator[int]:
    """An authenticating instant stand-in scheduler and a front before it, as processes."""
    standin_port, http_port = free_port(), free_port()
    standin = subprocess.Popen(
        [sys.executable, "-m", "services.http.bench", "--role", "standin",
         "--port", str(standin_port), "--tokens", "3", "--require-token", TOKEN],
        cwd=REPO_ROOT,
    )  # fmt: skip
    front: Service = start_service(
        ["http", "--port", str(http_port), "--host", "127.0.0.1",
         "--scheduler", f"127.0.0.1:{standin_port}"]
    )  # fmt: skip
    try:
        wait_for_health(f"127.0.0.1:{standin_port}", timeout=60)
        wait_for_front(http_port, front)
        yield http_port
    finally:
        front.stop()
        standin.terminate()
        standin.wait(30)


def post(port: int, headers: dict[str, str], body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def test_credentials_reach_the_scheduler_and_its_refusals_are_401_and_403(front_port) -> None:
    port = front_port
    status, body = post(port, {}, CHAT)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, body = post(port, {"authorization": "Bearer wrong"}, CHAT)
    assert status == 403 and body["error"]["type"] == "permission_error"
    status, body = post(port, {"authorization": f"Bearer {TOKEN}"}, CHAT)
    # The stand-in accepts only this exact header value: it was forwarded verbatim.
    assert status == 200 and body["choices"][0]["message"]["content"] == " w0 w1 w2"


def test_request_fields_become_the_schedulers_generate_request() -> None:
    parsed = parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                             {"type": "text", "text": "there"}]},
            ],
            "max_tokens": 5,
            "max_completion_tokens": 9,
            "stop": "END",
            "seed": 42,
            "top_p": 0.5,
            "priority": -3,
            "user": "someone",
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        start_timeout_ms=1500,
        client_request_id="key-1",
    )  # fmt: skip
    request = parsed.generate
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "Be brief."),
        ("user", "Hi there"),
    ]
    assert request.sampling.max_new_tokens == 9  # max_completion_tokens wins
    assert list(request.sampling.stop) == ["END"] and request.sampling.seed == 42
    assert request.sampling.top_p == 0.5
    assert request.sampling.temperature == 1.0  # OpenAI's default, not greedy
    assert request.priority == -3 and request.start_timeout_ms == 1500
    assert request.client_request_id == "key-1" and request.llm == "m"
    assert parsed.stream and parsed.include_usage
    plain = parse_completion({"model": "m", "prompt": ["one prompt"], "temperature": 0})
    assert plain.generate.prompt == "one prompt" and plain.generate.sampling.temperature == 0
    with pytest.raises(ApiError) as several:
        parse_completion({"model": "m", "prompt": ["a", "b"]})
    assert several.value.param == "prompt"


def test_penalties_map_to_sampling() -> None:
    body = {"model": "m", "prompt": "p", "presence_penalty": 0.5, "frequency_penalty": -1}
    sampling = parse_completion(body).generate.sampling
    assert sampling.presence_penalty == 0.5 and sampling.frequency_penalty == -1
    # repetition_penalty 1 is passed through: it turns off the served model's default (1.2),
    # which an unset field (0) would keep.
    off = parse_completion({"model": "m", "prompt": "p", "repetition_penalty": 1})
    assert off.generate.sampling.repetition_penalty == 1.0
    assert parse_completion({"model": "m", "prompt": "p"}).generate.sampling.repetition_penalty == 0
    # The neutral values are always fine; out of range never is.
    parse_completion({"model": "m", "prompt": "p", "presence_penalty": 0})
    with pytest.raises(ApiError):
        parse_completion({"model": "m", "prompt": "p", "frequency_penalty": 3})


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.ALREADY_EXISTS, 409),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.INTERNAL, 500),
    ],
)
def test_grpc_statuses_map_to_http_statuses(code: grpc.StatusCode, status: int) -> None:
    error = from_grpc(grpc.aio.AioRpcError(code, None, None, details="why"))
    assert error.status == status and "why" in error.message
    assert ("retry-after" in error.headers()) == (status in (429, 503))


@pytest.mark.parametrize(
    ("retry_after_ms", "limit", "retry_after", "code"),
    [
        # A tenant's request rate: the scheduler's wait, rounded up to whole seconds.
        ("4200", "requests_per_s", "5", "rate_limit_exceeded"),
        ("2000", "max_queued_jobs", "2", "too_many_queued_jobs"),
        ("1000", "max_streams", "1", "too_many_streams"),
        ("1000", "max_queue_depth", "1", "queue_full"),
        # Never under a second, which a client would read as "now".
        ("30", "", "1", "queue_full"),
        # No hint, or one that is not a number, and a limit the front does not know.
        ("", "", "1", "queue_full"),
        ("soon", "something-new", "1", "queue_full"),
    ],
)
def test_a_429_carries_the_schedulers_retry_hint_and_names_the_limit(
    retry_after_ms: str, limit: str, retry_after: str, code: str
) -> None:
    sent = {"retry-after-ms": retry_after_ms, "ssjf-limit": limit}
    trailers = grpc.aio.Metadata(*[(key, value) for key, value in sent.items() if value])
    error = from_grpc(
        grpc.aio.AioRpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), trailers, details="over"
        )
    )
    assert error.status == 429 and error.headers() == {"retry-after": retry_after}
    assert error.body()["error"]["code"] == code


@pytest.mark.parametrize("chunked", [False, True])
def test_an_oversized_body_is_413_also_when_sent_in_chunks(front_port, chunked: bool) -> None:
    import http.client

    body = b'{"model": "x", "prompt": "' + b"a" * (5 * 1024 * 1024) + b'"}'
    connection = http.client.HTTPConnection("127.0.0.1", front_port, timeout=60)
    try:
        if chunked:
            parts = (body[i : i + 65536] for i in range(0, len(body), 65536))
            connection.request(
                "POST", "/v1/completions", body=parts, encode_chunked=True,
                headers={"content-type": "application/json"},
            )  # fmt: skip
        else:
            connection.request("POST", "/v1/completions", body=body)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the front answered before the whole body was sent: its answer is readable
    try:
        response = connection.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"]["type"] == "invalid_request_error"
    finally:
        connection.close()
