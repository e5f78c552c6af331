from . import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("client_request_id", "llm", "prompt", "sampling", "priority", "oracle_output_tokens", "start_timeout_ms", "messages")
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LLM_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ORACLE_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    START_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    client_request_id: str
    llm: str
    prompt: str
    sampling: _common_pb2.SamplingParams
    priority: int
    oracle_output_tokens: int
    start_timeout_ms: int
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    def __init__(self, client_request_id: _Optional[str] = ..., llm: _Optional[str] = ..., prompt: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., priority: _Optional[int] = ..., oracle_output_tokens: _Optional[int] = ..., start_timeout_ms: _Optional[int] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("job_id", "deduplicated", "job")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    deduplicated: bool
    job: Job
    def __init__(self, job_id: _Optional[str] = ..., deduplicated: _Optional[bool] = ..., job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("job_id", "from_index")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_INDEX_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    from_index: int
    def __init__(self, job_id: _Optional[str] = ..., from_index: _Optional[int] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "accepted", "token", "summary")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    accepted: JobAccepted
    token: _common_pb2.Token
    summary: JobSummary
    def __init__(self, job_id: _Optional[str] = ..., accepted: _Optional[_Union[JobAccepted, _Mapping]] = ..., token: _Optional[_Union[_common_pb2.Token, _Mapping]] = ..., summary: _Optional[_Union[JobSummary, _Mapping]] = ...) -> None: ...

class JobAccepted(_message.Message):
    __slots__ = ("predicted_output_tokens", "prediction_fallback", "deduplicated")
    PREDICTED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    DEDUPLICATED_FIELD_NUMBER: _ClassVar[int]
    predicted_output_tokens: float
    prediction_fallback: bool
    deduplicated: bool
    def __init__(self, predicted_output_tokens: _Optional[float] = ..., prediction_fallback: _Optional[bool] = ..., deduplicated: _Optional[bool] = ...) -> None: ...

class JobSummary(_message.Message):
    __slots__ = ("state", "finish_reason", "error", "queue_wait_s", "time_to_first_token_s", "completion_s", "predicted_output_tokens", "generated_tokens", "attempts", "prediction_fallback", "prompt_tokens")
    STATE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_S_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.JobState
    finish_reason: _common_pb2.FinishReason
    error: str
    queue_wait_s: float
    time_to_first_token_s: float
    completion_s: float
    predicted_output_tokens: float
    generated_tokens: int
    attempts: int
    prediction_fallback: bool
    prompt_tokens: int
    def __init__(self, state: _Optional[_Union[_common_pb2.JobState, str]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., error: _Optional[str] = ..., queue_wait_s: _Optional[float] = ..., time_to_first_token_s: _Optional[float] = ..., completion_s: _Optional[float] = ..., predicted_output_tokens: _Optional[float] = ..., generated_tokens: _Optional[int] = ..., attempts: _Optional[int] = ..., prediction_fallback: _Optional[bool] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("state", "cancelled")
    STATE_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.JobState
    cancelled: bool
    def __init__(self, state: _Optional[_Union[_common_pb2.JobState, str]] = ..., cancelled: _Optional[bool] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "client_request_id", "llm", "state", "priority", "predicted_output_tokens", "prediction_fallback", "predictor_version", "submitted_at", "queued_at", "leased_at", "first_token_at", "finished_at", "worker_id", "attempts", "generated_tokens", "finish_reason", "error", "policy", "sampling", "prompt_chars")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LLM_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_AT_FIELD_NUMBER: _ClassVar[int]
    LEASED_AT_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    client_request_id: str
    llm: str
    state: _common_pb2.JobState
    priority: int
    predicted_output_tokens: float
    prediction_fallback: bool
    predictor_version: str
    submitted_at: float
    queued_at: float
    leased_at: float
    first_token_at: float
    finished_at: float
    worker_id: str
    attempts: int
    generated_tokens: int
    finish_reason: _common_pb2.FinishReason
    error: str
    policy: str
    sampling: _common_pb2.SamplingParams
    prompt_chars: int
    def __init__(self, job_id: _Optional[str] = ..., client_request_id: _Optional[str] = ..., llm: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.JobState, str]] = ..., priority: _Optional[int] = ..., predicted_output_tokens: _Optional[float] = ..., prediction_fallback: _Optional[bool] = ..., predictor_version: _Optional[str] = ..., submitted_at: _Optional[float] = ..., queued_at: _Optional[float] = ..., leased_at: _Optional[float] = ..., first_token_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., worker_id: _Optional[str] = ..., attempts: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., error: _Optional[str] = ..., policy: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., prompt_chars: _Optional[int] = ...) -> None: ...

class QueueStatsRequest(_message.Message):
    __slots__ = ("llm",)
    LLM_FIELD_NUMBER: _ClassVar[int]
    llm: str
    def __init__(self, llm: _Optional[str] = ...) -> None: ...

class QueueStats(_message.Message):
    __slots__ = ("llm", "queued", "running", "oldest_wait_s", "counters")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    LLM_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    OLDEST_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    llm: str
    queued: int
    running: int
    oldest_wait_s: float
    counters: _containers.ScalarMap[str, int]
    def __init__(self, llm: _Optional[str] = ..., queued: _Optional[int] = ..., running: _Optional[int] = ..., oldest_wait_s: _Optional[float] = ..., counters: _Optional[_Mapping[str, int]] = ...) -> None: ...

class QueueStatsResponse(_message.Message):
    __slots__ = ("queues", "policy")
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    queues: _containers.RepeatedCompositeFieldContainer[QueueStats]
    policy: str
    def __init__(self, queues: _Optional[_Iterable[_Union[QueueStats, _Mapping]]] = ..., policy: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("include_offline",)
    INCLUDE_OFFLINE_FIELD_NUMBER: _ClassVar[int]
    include_offline: bool
    def __init__(self, include_offline: _Optional[bool] = ...) -> None: ...

class ServedModel(_message.Message):
    __slots__ = ("llm", "workers", "predictor_head", "predictor_version")
    LLM_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_HEAD_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    llm: str
    workers: int
    predictor_head: str
    predictor_version: str
    def __init__(self, llm: _Optional[str] = ..., workers: _Optional[int] = ..., predictor_head: _Optional[str] = ..., predictor_version: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ServedModel]
    def __init__(self, models: _Optional[_Iterable[_Union[ServedModel, _Mapping]]] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("worker_id", "llms", "max_jobs", "wait_ms")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LLMS_FIELD_NUMBER: _ClassVar[int]
    MAX_JOBS_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    llms: _containers.RepeatedScalarFieldContainer[str]
    max_jobs: int
    wait_ms: int
    def __init__(self, worker_id: _Optional[str] = ..., llms: _Optional[_Iterable[str]] = ..., max_jobs: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class LeasedJob(_message.Message):
    __slots__ = ("job_id", "lease_id", "llm", "prompt", "sampling", "resume_token_ids", "attempt", "predicted_output_tokens", "messages")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LLM_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    lease_id: str
    llm: str
    prompt: str
    sampling: _common_pb2.SamplingParams
    resume_token_ids: _containers.RepeatedScalarFieldContainer[int]
    attempt: int
    predicted_output_tokens: float
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    def __init__(self, job_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., llm: _Optional[str] = ..., prompt: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., resume_token_ids: _Optional[_Iterable[int]] = ..., attempt: _Optional[int] = ..., predicted_output_tokens: _Optional[float] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ...) -> None: ...

class LeaseResponse(_message.Message):
    __slots__ = ("jobs", "lease_ttl_s")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[LeasedJob]
    lease_ttl_s: float
    def __init__(self, jobs: _Optional[_Iterable[_Union[LeasedJob, _Mapping]]] = ..., lease_ttl_s: _Optional[float] = ...) -> None: ...

class WorkerReport(_message.Message):
    __slots__ = ("worker_id", "progress", "sequence")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    progress: _containers.RepeatedCompositeFieldContainer[JobProgress]
    sequence: int
    def __init__(self, worker_id: _Optional[str] = ..., progress: _Optional[_Iterable[_Union[JobProgress, _Mapping]]] = ..., sequence: _Optional[int] = ...) -> None: ...

class JobProgress(_message.Message):
    __slots__ = ("job_id", "lease_id", "tokens", "outcome")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    lease_id: str
    tokens: _containers.RepeatedCompositeFieldContainer[_common_pb2.Token]
    outcome: JobOutcome
    def __init__(self, job_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., tokens: _Optional[_Iterable[_Union[_common_pb2.Token, _Mapping]]] = ..., outcome: _Optional[_Union[JobOutcome, _Mapping]] = ...) -> None: ...

class JobOutcome(_message.Message):
    __slots__ = ("finish_reason", "error", "generated_tokens", "prompt_tokens", "prefill_s", "decode_s")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    finish_reason: _common_pb2.FinishReason
    error: str
    generated_tokens: int
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    def __init__(self, finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., error: _Optional[str] = ..., generated_tokens: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., prefill_s: _Optional[float] = ..., decode_s: _Optional[float] = ...) -> None: ...

class WorkerDirective(_message.Message):
    __slots__ = ("stop", "ack_sequence")
    STOP_FIELD_NUMBER: _ClassVar[int]
    ACK_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    stop: _containers.RepeatedCompositeFieldContainer[StopJob]
    ack_sequence: int
    def __init__(self, stop: _Optional[_Iterable[_Union[StopJob, _Mapping]]] = ..., ack_sequence: _Optional[int] = ...) -> None: ...

class StopJob(_message.Message):
    __slots__ = ("job_id", "reason", "lease_id")
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_UNSPECIFIED: _ClassVar[StopJob.Reason]
        REASON_CANCELLED: _ClassVar[StopJob.Reason]
        REASON_LEASE_LOST: _ClassVar[StopJob.Reason]
        REASON_FINISHED: _ClassVar[StopJob.Reason]
    REASON_UNSPECIFIED: StopJob.Reason
    REASON_CANCELLED: StopJob.Reason
    REASON_LEASE_LOST: StopJob.Reason
    REASON_FINISHED: StopJob.Reason
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    reason: StopJob.Reason
    lease_id: str
    def __init__(self, job_id: _Optional[str] = ..., reason: _Optional[_Union[StopJob.Reason, str]] = ..., lease_id: _Optional[str] = ...) -> None: ...
