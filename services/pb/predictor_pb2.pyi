from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("prompt", "llm")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    LLM_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    llm: str
    def __init__(self, prompt: _Optional[str] = ..., llm: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predicted_output_tokens", "model_version", "llm")
    PREDICTED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LLM_FIELD_NUMBER: _ClassVar[int]
    predicted_output_tokens: float
    model_version: str
    llm: str
    def __init__(self, predicted_output_tokens: _Optional[float] = ..., model_version: _Optional[str] = ..., llm: _Optional[str] = ...) -> None: ...

class PredictBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[PredictRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[PredictRequest, _Mapping]]] = ...) -> None: ...

class PredictBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[PredictResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[PredictResponse, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_version", "llms", "default_llm", "formulation", "execution_provider", "max_prompt_tokens")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LLMS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LLM_FIELD_NUMBER: _ClassVar[int]
    FORMULATION_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    llms: _containers.RepeatedScalarFieldContainer[str]
    default_llm: str
    formulation: str
    execution_provider: str
    max_prompt_tokens: int
    def __init__(self, model_version: _Optional[str] = ..., llms: _Optional[_Iterable[str]] = ..., default_llm: _Optional[str] = ..., formulation: _Optional[str] = ..., execution_provider: _Optional[str] = ..., max_prompt_tokens: _Optional[int] = ...) -> None: ...
