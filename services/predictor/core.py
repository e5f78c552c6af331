"""The predictor service's domain core: validation, LLM resolution and micro-batching.

Knows nothing of gRPC; the servicer translates protobuf to these calls and back.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from services.common.errors import InvalidArgument, ResourceExhausted
from services.predictor.batcher import MicroBatcher
from services.predictor.runtime import ArtifactRuntime, Prediction


@dataclass(frozen=True)
class PredictionRequest:
    prompt: str
    llm: str = ""


@dataclass(frozen=True)
class ModelDescription:
    version: str
    llms: list[str]
    default_llm: str
    formulation: str
    execution_provider: str
    max_prompt_tokens: int


class LengthPredictor:
    """Answers length predictions from one artifact, batching concurrent callers together."""

    def __init__(
        self,
        runtime: ArtifactRuntime,
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.002,
        max_batch_request: int = 256,
    ) -> None:
        self.runtime = runtime
        self.max_batch_request = max_batch_request
        self.batcher: MicroBatcher[PredictionRequest, Prediction] = MicroBatcher(
            self._run_batch, max_batch_size=max_batch_size, max_wait_s=max_wait_s
        )

    def _run_batch(self, requests: list[PredictionRequest]) -> list[Prediction]:
        return self.runtime.predict(
            [request.prompt for request in requests], [request.llm for request in requests]
        )

    async def start(self) -> None:
        """Warm the model up (in a thread) and start the batcher; then the service is ready."""
        await asyncio.to_thread(self.runtime.warm_up)
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    async def predict(self, request: PredictionRequest) -> Prediction:
        _check(request, index=None)
        return await self.batcher.submit(request)

    async def predict_batch(self, requests: list[PredictionRequest]) -> list[Prediction]:
        if len(requests) > self.max_batch_request:
            raise ResourceExhausted(
                f"PredictBatch holds {len(requests)} prompts; this server takes at most "
                f"{self.max_batch_request} per call (--max-batch-request): split the call"
            )
        for index, request in enumerate(requests):
            _check(request, index)
        return await self.batcher.submit_many(requests)

    def describe(self) -> ModelDescription:
        runtime = self.runtime
        return ModelDescription(
            version=runtime.version,
            llms=runtime.llms,
            default_llm=runtime.default_llm,
            formulation=runtime.formulation,
            execution_provider=runtime.execution_provider,
            max_prompt_tokens=runtime.max_prompt_tokens,
        )


def _check(request: PredictionRequest, index: int | None) -> None:
    if not request.prompt.strip():
        where = "" if index is None else f" (request {index} of the batch)"
        raise InvalidArgument(f"prompt is empty{where}: send the prompt text to predict for")
