from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetWorkerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "llms", "model", "batching", "max_batch_size", "device", "dtype", "active_jobs", "completed_jobs", "generated_tokens")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LLMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_JOBS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_JOBS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    llms: _containers.RepeatedScalarFieldContainer[str]
    model: str
    batching: str
    max_batch_size: int
    device: str
    dtype: str
    active_jobs: int
    completed_jobs: int
    generated_tokens: int
    def __init__(self, worker_id: _Optional[str] = ..., llms: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., batching: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., active_jobs: _Optional[int] = ..., completed_jobs: _Optional[int] = ..., generated_tokens: _Optional[int] = ...) -> None: ...
