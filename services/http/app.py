"""The HTTP front: OpenAI's ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``
over the scheduler's gRPC API (Starlette on uvicorn).

A request becomes one ``Scheduler.Generate`` call: the scheduler queues, orders and leases
the job exactly as for a gRPC client, and closing that call cancels the job, so a client that
disconnects from the front frees its worker the same way. The response headers carry the job
id (``x-ssjf-job-id``): a client whose connection broke can read the rest of the answer with
the gRPC ``Stream(job_id, from_index)``.

Headers go out once the scheduler accepted the job (its id is known and validation, a full
queue or an unknown model have become proper HTTP statuses). A request with a start deadline
waits further, until its job starts or ends, so a missed deadline is a real 504.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from services.http.backend import Metadata, SchedulerBackend
from services.http.errors import ApiError, from_grpc, start_deadline
from services.http.protocol import (
    FINISH_REASONS,
    ParsedRequest,
    parse_body,
    parse_chat,
    parse_completion,
    usage,
)
from services.pb import common_pb2, scheduler_pb2

log = logging.getLogger(__name__)

JOB_ID_HEADER = "x-ssjf-job-id"
_T = TypeVar("_T")
_SSE_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class FrontConfig:
    # Start deadline for requests that name none (their start_timeout_ms field); 0: none.
    start_timeout_ms: int = 0
    max_body_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class _Kind:
    """What differs between chat and plain completions."""

    parse: Callable[..., ParsedRequest]
    id_prefix: str
    object: str
    chunk_object: str
    chat: bool


CHAT = _Kind(parse_chat, "chatcmpl-", "chat.completion", "chat.completion.chunk", chat=True)
COMPLETION = _Kind(parse_completion, "cmpl-", "text_completion", "text_completion", chat=False)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


@dataclass
class _Opened:
    """A Generate call whose job the scheduler accepted."""

    call: Any  # grpc.aio.UnaryStreamCall
    job_id: str
    buffered: list[scheduler_pb2.JobEvent]

    async def events(self) -> AsyncIterator[scheduler_pb2.JobEvent]:
        for event in self.buffered:
            yield event
        while True:
            event = await self.call.read()
            if event is grpc.aio.EOF:
                return
            yield event


def _metadata(request: Request) -> Metadata:
    """gRPC metadata for the scheduler: the client's credentials travel unchanged, so the
    scheduler's own authentication interceptor decides (issue 14)."""
    authorization = request.headers.get("authorization")
    return (("authorization", authorization),) if authorization else ()


def error_response(error: ApiError) -> Response:
    return Response(
        error.json(),
        status_code=error.status,
        media_type="application/json",
        headers=error.headers(),
    )


def _summary_error(summary: scheduler_pb2.JobSummary) -> ApiError | None:
    """The error a finished job's summary stands for, if it did not end normally."""
    if summary.state == common_pb2.JOB_STATE_DONE:
        return None
    if summary.finish_reason == common_pb2.FINISH_REASON_DEADLINE:
        return start_deadline(summary.error or "no worker started the job before its deadline")
    if summary.state == common_pb2.JOB_STATE_CANCELLED:
        return ApiError(409, "the job was cancelled (Cancel RPC)", type="cancelled")
    return ApiError(500, summary.error or "the job failed", type="server_error")


async def _until_disconnect(request: Request, work: Awaitable[_T]) -> _T:
    """Await ``work`` unless the client disconnects first: then cancel it (cancelling its
    Generate call, which cancels the job) and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise ClientGone
    return task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream:
    """An SSE response that stops its event source the moment the client disconnects, even
    while no event is due (a job waiting in the queue), and always closes the source, whose
    ``finally`` cancels the Generate call."""

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        self.events = events
        self.headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
            *((name.encode(), value.encode()) for name, value in headers.items()),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The events are pumped in this task; one watcher task cancels it on a disconnect
        # (one task per response, not two: this is the front's hot path).
        pumping = asyncio.current_task()
        assert pumping is not None
        state = {"finished": False, "gone": False}

        async def watch() -> None:
            await _disconnected(receive)
            if not state["finished"]:
                state["gone"] = True
                pumping.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            state["finished"] = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not state["gone"]:
                raise
            pumping.uncancel()  # the client left: nothing more to do, the source closes below
        except OSError:
            pass  # the connection broke while sending
        finally:
            state["finished"] = True
            watcher.cancel()
            await self.events.aclose()  # type: ignore[attr-defined]


class Front:
    """The OpenAI routes over one SchedulerBackend."""

    def __init__(self, backend: SchedulerBackend, config: FrontConfig | None = None) -> None:
        self.backend = backend
        self.config = config or FrontConfig()

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.backend.start()
        yield
        await self.backend.close()

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        try:
            catalog = await self.backend.fresh_catalog(_metadata(request))
        except ApiError as error:
            return error_response(error)
        live = catalog.live if catalog is not None else []
        return JSONResponse({"object": "list", "data": [_model_card(m) for m in live]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        try:
            catalog = await self.backend.fresh_catalog(_metadata(request))
        except ApiError as error:
            return error_response(error)
        for served in catalog.live if catalog is not None else []:
            if served.llm == name:
                return JSONResponse(_model_card(served))
        return error_response(
            ApiError(
                404,
                f"no live worker serves {name!r}",
                type="invalid_request_error",
                code="model_not_found",
            )
        )

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, CHAT)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, COMPLETION)

    async def _generate(self, request: Request, kind: _Kind) -> Response:
        try:
            too_large = ApiError(
                413,
                f"the request body has more than {self.config.max_body_bytes} bytes "
                "(--max-body-bytes)",
                type="invalid_request_error",
            )
            declared = request.headers.get("content-length", "0")
            if not declared.isdigit() or int(declared) > self.config.max_body_bytes:
                raise too_large  # refused before reading it
            # Read with the limit applied as it arrives (a chunked upload declares no length).
            parts: list[bytes] = []
            size = 0
            async for part in request.stream():
                size += len(part)
                if size > self.config.max_body_bytes:
                    raise too_large
                parts.append(part)
            body = b"".join(parts)
            parsed = kind.parse(
                parse_body(body),
                start_timeout_ms=self.config.start_timeout_ms,
                client_request_id=request.headers.get("idempotency-key", "")[:256],
            )
            metadata = _metadata(request)
            await self.backend.check_served(parsed.model, metadata)
            opening = self._open(parsed, metadata)
            # Acceptance is quick; waiting for a job's start (start deadline) may be long
            # enough for the client to give up, which must cancel the job.
            opened = await (
                _until_disconnect(request, opening) if parsed.generate.start_timeout_ms else opening
            )
            headers = {JOB_ID_HEADER: opened.job_id}
            if parsed.stream:
                return EventStream(self._sse(opened, parsed, kind), headers)  # type: ignore[return-value]
            answer = await _until_disconnect(request, self._collect(opened, parsed, kind))
            return JSONResponse(answer, headers=headers)
        except ApiError as error:
            return error_response(error)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the job was cancelled

    async def _open(self, parsed: ParsedRequest, metadata: Metadata) -> _Opened:
        """Start Generate and read up to the acceptance (or, with a start deadline, up to the
        job's start or end). Any failure or cancellation cancels the call."""
        call = self.backend.stub.Generate(parsed.generate, metadata=metadata)
        try:
            accepted = await call.read()
            if accepted is grpc.aio.EOF:
                raise ApiError(
                    502, "the scheduler ended the call without an answer", type="server_error"
                )
            buffered: list[scheduler_pb2.JobEvent] = []
            if parsed.generate.start_timeout_ms:
                while True:
                    event = await call.read()
                    if event is grpc.aio.EOF:
                        break
                    buffered.append(event)
                    if event.HasField("summary"):
                        failed = _summary_error(event.summary)
                        if failed is not None and not any(e.HasField("token") for e in buffered):
                            raise failed
                        break
                    if event.HasField("token"):
                        break
            return _Opened(call, accepted.job_id, buffered)
        except grpc.aio.AioRpcError as error:
            call.cancel()
            if error.code() == grpc.StatusCode.NOT_FOUND:
                # A scheduler that refuses LLMs no live worker serves: 404 or 503?
                await self.backend.check_served(parsed.model, metadata)
            raise from_grpc(error) from None
        except BaseException:
            call.cancel()
            raise

    async def _collect(self, opened: _Opened, parsed: ParsedRequest, kind: _Kind) -> dict[str, Any]:
        texts: list[str] = []
        summary = None
        try:
            async for event in opened.events():
                if event.HasField("token"):
                    texts.append(event.token.text)
                elif event.HasField("summary"):
                    summary = event.summary
        except grpc.aio.AioRpcError as error:
            raise from_grpc(error) from None
        finally:
            opened.call.cancel()  # a no-op once it ended; cancels the job otherwise
        if summary is None:
            raise ApiError(
                502, "the scheduler's stream ended without a summary", type="server_error"
            )
        failed = _summary_error(summary)
        if failed is not None:
            raise failed
        text = "".join(texts)
        finish_reason = FINISH_REASONS.get(summary.finish_reason, "stop")
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if kind.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {
            "id": kind.id_prefix + opened.job_id,
            "object": kind.object,
            "created": int(time.time()),
            "model": parsed.model,
            "choices": [choice],
            "usage": usage(summary),
        }

    async def _sse(
        self, opened: _Opened, parsed: ParsedRequest, kind: _Kind
    ) -> AsyncIterator[bytes]:
        """The answer as OpenAI's SSE chunks; closing this generator cancels the call."""
        job = json.dumps(kind.id_prefix + opened.job_id)
        model = json.dumps(parsed.model, ensure_ascii=False)
        head = (
            f'{{"id":{job},"object":"{kind.chunk_object}","created":{int(time.time())},'
            f'"model":{model},"choices":'
        ).encode()
        field = b'"delta":{"content":' if kind.chat else b'"text":'
        close = b"}" if kind.chat else b""
        ended = False
        try:
            if kind.chat:
                yield (
                    b"data: "
                    + head
                    + (
                        b'[{"index":0,"delta":{"role":"assistant","content":""},'
                        b'"logprobs":null,"finish_reason":null}]}\n\n'
                    )
                )
            async for event in opened.events():
                if event.HasField("token"):
                    if not event.token.text:
                        continue
                    yield b"".join(
                        (
                            b"data: ",
                            head,
                            b'[{"index":0,',
                            field,
                            json.dumps(event.token.text, ensure_ascii=False).encode(),
                            close,
                            b',"logprobs":null,"finish_reason":null}]}\n\n',
                        )
                    )
                elif event.HasField("summary"):
                    ended = True
                    failed = _summary_error(event.summary)
                    if failed is not None:
                        yield b"data: " + failed.json() + b"\n\n"
                        break
                    reason = FINISH_REASONS.get(event.summary.finish_reason, "stop")
                    empty = b'"delta":{}' if kind.chat else b'"text":""'
                    yield b"".join(
                        (
                            b"data: ",
                            head,
                            b'[{"index":0,',
                            empty,
                            b',"logprobs":null,"finish_reason":"',
                            reason.encode(),
                            b'"}]}\n\n',
                        )
                    )
                    if parsed.include_usage:
                        counts = json.dumps(usage(event.summary), separators=(",", ":")).encode()
                        yield b"data: " + head + b'[],"usage":' + counts + b"}\n\n"
            if not ended:
                # The scheduler's stream ended without the job's end (a replica draining):
                # the job goes on; the client can resume it by id.
                gone = ApiError(
                    503,
                    f"the scheduler ended the stream early; resume job {opened.job_id} with "
                    "the gRPC Stream(job_id, from_index)",
                    type="service_unavailable",
                    code="scheduler_unavailable",
                )
                yield b"data: " + gone.json() + b"\n\n"
            yield _SSE_DONE
        except grpc.aio.AioRpcError as error:
            yield b"data: " + from_grpc(error).json() + b"\n\n" + _SSE_DONE
        finally:
            opened.call.cancel()  # a no-op once it ended; cancels the job otherwise


def _model_card(served: scheduler_pb2.ServedModel) -> dict[str, Any]:
    return {
        "id": served.llm,
        "object": "model",
        "created": 0,
        "owned_by": "ssjf",
        # Extra fields: how many workers serve it and which predictor head orders its queue.
        "workers": served.workers,
        "predictor_head": served.predictor_head,
        "predictor_version": served.predictor_version,
    }
