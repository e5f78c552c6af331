"""Errors in OpenAI's format, and the one place gRPC statuses become HTTP status codes.

OpenAI clients (the ``openai`` SDK, LangChain, curl scripts) read ``{"error": {"message",
"type", "param", "code"}}`` and the HTTP status; the SDK raises a typed exception per status
(BadRequestError, AuthenticationError, NotFoundError, RateLimitError, ...).
"""

from __future__ import annotations

import json
import math

import grpc

from services.common.errors import (
    LIMIT_MAX_QUEUE_DEPTH,
    LIMIT_MAX_QUEUED_JOBS,
    LIMIT_MAX_STREAMS,
    LIMIT_REQUESTS_PER_S,
    LIMIT_TRAILER,
    RETRY_AFTER_TRAILER,
)

# Seconds a client should wait before retrying, when the scheduler gave no hint (an
# unavailable scheduler, a missing worker, a scheduler that sends none).
RETRY_AFTER_S = 1


class ApiError(Exception):
    """An error answered in OpenAI's format with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def json(self) -> bytes:
        return json.dumps(self.body(), ensure_ascii=False).encode()

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after_s)} if self.retry_after_s is not None else {}


def invalid(message: str, param: str | None = None) -> ApiError:
    """400: the request is malformed; ``param`` names the offending field."""
    return ApiError(400, message, type="invalid_request_error", param=param)


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model {model!r} does not exist: no worker serves it (GET /v1/models lists "
        "the models served now)",
        type="invalid_request_error",
        param="model",
        code="model_not_found",
    )


def no_worker(model: str) -> ApiError:
    return ApiError(
        503,
        f"No worker serves the model {model!r} now; retry when one is up",
        type="service_unavailable",
        param="model",
        code="no_worker",
        retry_after_s=RETRY_AFTER_S,
    )


def start_deadline(message: str) -> ApiError:
    return ApiError(504, message, type="timeout", code="start_deadline")


# (HTTP status, OpenAI error type, code) per gRPC status the scheduler answers with.
_FROM_GRPC: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", None),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    # An Idempotency-Key reused with a different request.
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", "conflict"),
    # The code when the scheduler names no limit (see _LIMIT_CODES).
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "queue_full"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", "scheduler_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", None),
}


# The 429's code per limit the scheduler names (its ``ssjf-limit`` trailer): OpenAI's own
# code for a rate limit, ours for the others, so a client can tell "slow down" from "too
# much at once" and from "the service is full".
_LIMIT_CODES = {
    LIMIT_REQUESTS_PER_S: "rate_limit_exceeded",
    LIMIT_MAX_STREAMS: "too_many_streams",
    LIMIT_MAX_QUEUED_JOBS: "too_many_queued_jobs",
    LIMIT_MAX_QUEUE_DEPTH: "queue_full",
}


def _retry_after_s(trailers: dict[str, str]) -> int:
    """The scheduler's ``retry-after-ms`` hint in whole seconds (Retry-After has no
    fractions), rounded up so that a client retrying then is not refused again; at least
    1; RETRY_AFTER_S without a hint."""
    try:
        wait_ms = float(trailers[RETRY_AFTER_TRAILER])
    except (KeyError, ValueError):
        return RETRY_AFTER_S
    return max(1, math.ceil(wait_ms / 1e3)) if math.isfinite(wait_ms) else RETRY_AFTER_S


def from_grpc(error: grpc.aio.AioRpcError) -> ApiError:
    """The HTTP answer to a scheduler error; busy answers carry Retry-After, the
    scheduler's own hint where it sent one."""
    status, type_, code = _FROM_GRPC.get(error.code(), (500, "server_error", None))
    trailers = {key: str(value) for key, value in error.trailing_metadata() or ()}
    retry = _retry_after_s(trailers) if status in (429, 503) else None
    if status == 429:
        code = _LIMIT_CODES.get(trailers.get(LIMIT_TRAILER, ""), code)
    details = error.details() or error.code().name
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        details = f"the scheduler is unavailable ({details}); retry shortly"
    return ApiError(status, details, type=type_, code=code, retry_after_s=retry)
