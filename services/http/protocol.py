"""OpenAI request bodies -> the scheduler's GenerateRequest, and answers -> OpenAI objects.

Validation happens here, before any gRPC call, so a malformed request costs no round trip
and its 400 names the offending field (``param``), as OpenAI's own API does. Fields this
server cannot honour (n > 1, tools, logprobs, ...) are refused by name rather than ignored:
silently ignoring them would return something other than what the client asked for.
Unknown fields are ignored, as vLLM does by default.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from services.http.errors import invalid
from services.pb import common_pb2, scheduler_pb2

ROLES = ("system", "user", "assistant", "developer")
MAX_STOP_STRINGS = 16  # the scheduler's limit
MAX_START_TIMEOUT_MS = 24 * 3600 * 1000
# OpenAI's default when a request names no temperature / top_p.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0

# finish_reason per ssjf.v1.FinishReason of a finished job.
FINISH_REASONS = {
    common_pb2.FINISH_REASON_EOS: "stop",
    common_pb2.FINISH_REASON_STOP_SEQUENCE: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_REPLAY_LENGTH: "length",
}

# Fields whose mere presence (with a value other than these) asks for what is not served.
_REFUSED = {
    # field: (values that are fine, why)
    "n": ((None, 1), "only n=1 is supported: send several requests instead"),
    "best_of": ((None, 1), "only best_of=1 is supported"),
    "tools": ((None, []), "tools (function calling) are not supported"),
    "tool_choice": ((None, "none"), "tools (function calling) are not supported"),
    "functions": ((None, []), "functions (function calling) are not supported"),
    "function_call": ((None, "none"), "functions (function calling) are not supported"),
    "logprobs": ((None, False, 0), "logprobs are not supported"),
    "top_logprobs": ((None, 0), "logprobs are not supported"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "echo": ((None, False), "echo is not supported"),
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
}

# OpenAI's penalties, and vLLM's repetition_penalty extra field, map onto SamplingParams
# fields of the same names where this build's protos have them (issue 9 adds them); without
# them only the neutral value is accepted. (field, lowest, highest, neutral)
_PENALTIES = (
    ("presence_penalty", -2.0, 2.0, 0.0),
    ("frequency_penalty", -2.0, 2.0, 0.0),
    ("repetition_penalty", 0.0, 10.0, 1.0),
)
_SAMPLING_FIELDS = frozenset(common_pb2.SamplingParams.DESCRIPTOR.fields_by_name)


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request: what to ask the scheduler, and how to answer the client."""

    model: str
    generate: scheduler_pb2.GenerateRequest
    stream: bool
    include_usage: bool


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise invalid(f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for field, (fine, why) in _REFUSED.items():
        if field in body and body[field] not in fine:
            raise invalid(f"{field}={body[field]!r}: {why}", param=field)
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise invalid("only response_format {'type': 'text'} is supported", "response_format")


def _number(body: dict[str, Any], field: str, low: float, high: float) -> float | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid(f"{field} must be a number", param=field)
    if not low <= value <= high:
        raise invalid(f"{field} must be within [{low:g}, {high:g}], got {value}", param=field)
    return float(value)


def _integer(body: dict[str, Any], field: str, low: int, high: int) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{field} must be an integer", param=field)
    if not low <= value <= high:
        raise invalid(f"{field} must be within [{low}, {high}], got {value}", param=field)
    return value


def _sampling(body: dict[str, Any]) -> common_pb2.SamplingParams:
    sampling = common_pb2.SamplingParams()
    # max_completion_tokens is the newer name; max_tokens stays for older clients.
    limit = _integer(body, "max_completion_tokens", 1, 2**31 - 1)
    if limit is None:
        limit = _integer(body, "max_tokens", 1, 2**31 - 1)
    if limit is not None:
        sampling.max_new_tokens = limit
    temperature = _number(body, "temperature", 0.0, 2.0)
    sampling.temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p == 0.0:
        raise invalid("top_p must be greater than 0", param="top_p")
    sampling.top_p = DEFAULT_TOP_P if top_p is None else top_p
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if (
            not isinstance(stop, list)
            or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(item, str) and item for item in stop)
        ):
            raise invalid(
                f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
                "non-empty strings",
                param="stop",
            )
        sampling.stop.extend(stop)
    seed = _integer(body, "seed", 0, 2**64 - 1)
    if seed is not None:
        sampling.seed = seed
    for field, low, high, neutral in _PENALTIES:
        value = _number(body, field, low, high)
        if value is None:
            continue
        if field not in _SAMPLING_FIELDS:
            if value == neutral:
                continue
            raise invalid(f"{field} is not supported by this server (use {neutral:g})", field)
        # Passed through even when neutral: repetition_penalty 1 turns off the served
        # model's default penalty (0, the proto default, means "the server's default").
        setattr(sampling, field, value)
    return sampling


def _common(body: dict[str, Any], *, start_timeout_ms: int, client_request_id: str) -> tuple:
    """Fields chat and completions share: (model, GenerateRequest fields, stream, usage)."""
    _refuse_unsupported(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model is required: the name of a served model (GET /v1/models)", "model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise invalid("stream must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("stream_options must be an object", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise invalid("stream_options.include_usage must be a boolean", "stream_options")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user must be a string", param="user")
    priority = _integer(body, "priority", -100, 100)  # vLLM's extra field
    timeout = _integer(body, "start_timeout_ms", 0, MAX_START_TIMEOUT_MS)  # ours
    fields = {
        "llm": model,
        "sampling": _sampling(body),
        "priority": priority or 0,
        "start_timeout_ms": start_timeout_ms if timeout is None else timeout,
        "client_request_id": client_request_id,
    }
    return model, fields, bool(stream), include_usage


def _content(message: dict[str, Any], position: int) -> str:
    """A message's text: a string, or OpenAI's list of content parts (text parts only)."""
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise invalid(
                    f"messages[{position}].content: only text parts are supported",
                    param=f"messages[{position}].content",
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise invalid(
        f"messages[{position}].content must be a string or a list of text parts",
        param=f"messages[{position}].content",
    )


def parse_chat(
    body: dict[str, Any], *, start_timeout_ms: int = 0, client_request_id: str = ""
) -> ParsedRequest:
    model, fields, stream, include_usage = _common(
        body, start_timeout_ms=start_timeout_ms, client_request_id=client_request_id
    )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list of chat messages", param="messages")
    turns = []
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{position}] must be an object", param="messages")
        role = message.get("role")
        if role not in ROLES:
            raise invalid(
                f"messages[{position}].role must be one of system, user, assistant; "
                f"got {role!r} (tool messages are not supported)",
                param=f"messages[{position}].role",
            )
        if message.get("tool_calls"):
            raise invalid("tool calls are not supported", param=f"messages[{position}]")
        # "developer" is OpenAI's newer name for the system role.
        turns.append(
            common_pb2.ChatMessage(
                role="system" if role == "developer" else role,
                content=_content(message, position),
            )
        )
    generate = scheduler_pb2.GenerateRequest(messages=turns, **fields)
    return ParsedRequest(model, generate, stream, include_usage)


def parse_completion(
    body: dict[str, Any], *, start_timeout_ms: int = 0, client_request_id: str = ""
) -> ParsedRequest:
    model, fields, stream, include_usage = _common(
        body, start_timeout_ms=start_timeout_ms, client_request_id=client_request_id
    )
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid(
            "prompt must be one string (lists of several prompts and token ids are not "
            "supported: send one request per prompt)",
            param="prompt",
        )
    generate = scheduler_pb2.GenerateRequest(prompt=prompt, **fields)
    return ParsedRequest(model, generate, stream, include_usage)


def usage(summary: scheduler_pb2.JobSummary) -> dict[str, int]:
    return {
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.generated_tokens,
        "total_tokens": summary.prompt_tokens + summary.generated_tokens,
    }
