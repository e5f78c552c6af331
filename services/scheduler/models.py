"""Domain objects of the scheduler: plain data, no gRPC, no Redis."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum


class JobState(StrEnum):
    """Stored as these names; the servicer maps them onto ssjf.v1.JobState."""

    QUEUED = "QUEUED"
    LEASED = "LEASED"
    STREAMING = "STREAMING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class FinishReason(StrEnum):
    """Stored as these names; the servicer maps them onto ssjf.v1.FinishReason."""

    UNSPECIFIED = ""
    LENGTH = "LENGTH"
    EOS = "EOS"
    STOP_SEQUENCE = "STOP_SEQUENCE"
    REPLAY_LENGTH = "REPLAY_LENGTH"
    CANCELLED = "CANCELLED"
    ERROR = "ERROR"
    DEADLINE = "DEADLINE"


class StopReason(StrEnum):
    """Why a worker must stop a job (ssjf.v1.StopJob.Reason)."""

    CANCELLED = "CANCELLED"
    LEASE_LOST = "LEASE_LOST"
    FINISHED = "FINISHED"


@dataclass(frozen=True)
class SamplingParams:
    """How the LLM samples; zero values mean the worker's defaults (see common.proto)."""

    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    replay_output_tokens: int = 0
    repetition_penalty: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def to_json(self) -> str:
        """Only the fields that differ from their defaults (usually none: ``{}``), so most
        job records stay small. Spelled out, not dataclasses.asdict: it runs per submit."""
        fields = {
            name: value
            for name, value, default in (
                ("max_new_tokens", self.max_new_tokens, 0),
                ("temperature", self.temperature, 0.0),
                ("top_p", self.top_p, 0.0),
                ("stop", self.stop, ()),
                ("seed", self.seed, None),
                ("replay_output_tokens", self.replay_output_tokens, 0),
                ("repetition_penalty", self.repetition_penalty, 0.0),
                ("presence_penalty", self.presence_penalty, 0.0),
                ("frequency_penalty", self.frequency_penalty, 0.0),
            )
            if value != default
        }
        return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SamplingParams:
        fields = json.loads(text)
        fields["stop"] = tuple(fields.get("stop", ()))
        return cls(**fields)


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation: role is system, user or assistant."""

    role: str
    content: str


def messages_to_json(messages: tuple[ChatMessage, ...]) -> str:
    """A conversation as stored in a job record ('' for a prompt job, keeping those small)."""
    if not messages:
        return ""
    return json.dumps([[m.role, m.content] for m in messages], ensure_ascii=False)


def messages_from_json(text: str | None) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(role, content) for role, content in json.loads(text)) if text else ()


@dataclass(frozen=True)
class JobRequest:
    """A client's request, before validation."""

    prompt: str
    llm: str = ""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    client_request_id: str = ""
    priority: int = 0
    oracle_output_tokens: int = 0
    start_timeout_ms: int = 0
    # A conversation instead of a prompt (see services/scheduler/conversation.py).
    messages: tuple[ChatMessage, ...] = ()
    # The submitting tenant ("" without auth): owns the job and scopes client_request_id.
    tenant: str = ""


def request_digest(request: JobRequest, llm: str) -> str:
    """What makes two requests "the same" for idempotency: everything the client chose."""
    payload = json.dumps(
        [
            llm,
            request.prompt,
            request.sampling.to_json(),
            request.priority,
            request.oracle_output_tokens,
            request.start_timeout_ms,
            [[message.role, message.content] for message in request.messages],
        ],
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class JobRecord:
    """A job as kept in Redis (the hash at keys.job_key(job_id), ``ssjf:job:{<tag>}<id rest>``)."""

    job_id: str
    client_request_id: str
    llm: str
    state: JobState
    priority: int
    predicted_output_tokens: float
    prediction_fallback: bool
    predictor_version: str
    policy: str
    score: float
    sampling: SamplingParams
    prompt: str
    submitted_at: float
    queued_at: float
    # Lifecycle fields: a job starts with none of them reached.
    leased_at: float = 0.0
    first_token_at: float = 0.0
    finished_at: float = 0.0
    worker_id: str = ""
    attempts: int = 0
    generated_tokens: int = 0
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    error: str = ""
    # Digest of what the client asked (request_digest): a client_request_id reused with a
    # different request is refused instead of silently returning this job.
    request_hash: str = ""
    # A chat job's conversation (prompt then holds its last user turn, what was predicted).
    messages: tuple[ChatMessage, ...] = ()
    prompt_tokens: int = 0  # after the worker's chat template, once a worker reported it
    tenant: str = ""  # the owner: other tenants are told the job does not exist

    @property
    def queue_wait_s(self) -> float:
        return self.leased_at - self.submitted_at if self.leased_at else 0.0

    @property
    def time_to_first_token_s(self) -> float:
        return self.first_token_at - self.submitted_at if self.first_token_at else 0.0

    @property
    def completion_s(self) -> float:
        return self.finished_at - self.submitted_at if self.finished_at else 0.0


def scoped_request_id(tenant: str, client_request_id: str) -> str:
    """The idempotency key of ``client_request_id`` within ``tenant``: two tenants using the
    same id get two jobs. Tenant names hold no "/", so the pair is unambiguous; without auth
    (tenant "") the key is the id itself, as before tenants existed."""
    if not client_request_id or not tenant:
        return client_request_id
    return f"{tenant}/{client_request_id}"


@dataclass(frozen=True)
class Submission:
    record: JobRecord
    deduplicated: bool


@dataclass(frozen=True)
class Token:
    index: int
    text: str
    token_id: int


@dataclass(frozen=True)
class JobEnd:
    """The last event of a job's stream; carries its final record."""

    record: JobRecord


@dataclass(frozen=True)
class LeasedJob:
    job_id: str
    lease_id: str
    llm: str
    prompt: str
    sampling: SamplingParams
    attempt: int
    predicted_output_tokens: float
    # Tokens earlier attempts already streamed: the worker resumes after them.
    resume_token_ids: list[int]
    messages: tuple[ChatMessage, ...] = ()


@dataclass(frozen=True)
class Outcome:
    finish_reason: FinishReason
    error: str = ""
    generated_tokens: int = 0
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0


@dataclass(frozen=True)
class Progress:
    """One job's part of a worker report; no tokens and no outcome is a heartbeat."""

    job_id: str
    lease_id: str
    tokens: list[Token] = field(default_factory=list)
    outcome: Outcome | None = None


@dataclass(frozen=True)
class Stop:
    job_id: str
    reason: StopReason
    lease_id: str = ""  # the lease stopped (a newer lease of the same job keeps running)


@dataclass(frozen=True)
class QueueStats:
    llm: str
    queued: int
    running: int
    oldest_wait_s: float
    counters: dict[str, int]
