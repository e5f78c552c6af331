"""The predictor service's domain core: validation, LLM resolution and micro-batching.

Knows nothing of gRPC; the servicer translates protobuf to these calls and back.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

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


class PredictionCache:
    """Every head's prediction for recently seen prompts, keyed by a hash of the prompt: a
    repeated prompt (retries, templates, benchmarks) is answered without the model. LRU."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._rows: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(prompt: str) -> bytes:
        return hashlib.blake2b(prompt.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def get(self, prompt: str) -> np.ndarray | None:
        if not self.capacity:
            return None
        key = self.key(prompt)
        row = self._rows.get(key)
        if row is None:
            self.misses += 1
            return None
        self._rows.move_to_end(key)
        self.hits += 1
        return row

    def put(self, prompt: str, row: np.ndarray) -> None:
        if not self.capacity:
            return
        self._rows[self.key(prompt)] = row
        self._rows.move_to_end(self.key(prompt))
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)


class LengthPredictor:
    """Answers length predictions from one artifact, batching concurrent callers together."""

    def __init__(
        self,
        runtime: ArtifactRuntime,
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.002,
        max_batch_request: int = 256,
        cache_size: int = 10_000,
    ) -> None:
        self.runtime = runtime
        self.max_batch_request = max_batch_request
        self.cache = PredictionCache(cache_size)
        self.batcher: MicroBatcher[str, np.ndarray] = MicroBatcher(
            self._run_batch, max_batch_size=max_batch_size, max_wait_s=max_wait_s
        )

    def _run_batch(self, prompts: list[str]) -> np.ndarray:
        return self.runtime.predict_all(prompts)

    async def _rows(self, prompts: list[str]) -> list[np.ndarray]:
        """Every head's predictions per prompt: from the cache, else from the batcher."""
        rows: list[np.ndarray | None] = [self.cache.get(prompt) for prompt in prompts]
        missing = [index for index, row in enumerate(rows) if row is None]
        if missing:
            computed = await self.batcher.submit_many([prompts[index] for index in missing])
            for index, row in zip(missing, computed, strict=True):
                self.cache.put(prompts[index], row)
                rows[index] = row
        return rows  # type: ignore[return-value]

    def _answer(self, row: np.ndarray, llm: str) -> Prediction:
        head = self.runtime.resolve_llm(llm)
        return Prediction(float(row[self.runtime.column(head)]), head)

    async def start(self) -> None:
        """Warm the model up (in a thread) and start the batcher; then the service is ready."""
        await asyncio.to_thread(self.runtime.warm_up)
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()

    async def predict(self, request: PredictionRequest) -> Prediction:
        _check(request, index=None)
        (row,) = await self._rows([request.prompt])
        return self._answer(row, request.llm)

    async def predict_batch(self, requests: list[PredictionRequest]) -> list[Prediction]:
        if len(requests) > self.max_batch_request:
            raise ResourceExhausted(
                f"PredictBatch holds {len(requests)} prompts; this server takes at most "
                f"{self.max_batch_request} per call (--max-batch-request): split the call"
            )
        for index, request in enumerate(requests):
            _check(request, index)
        rows = await self._rows([request.prompt for request in requests])
        return [self._answer(row, request.llm) for row, request in zip(rows, requests, strict=True)]

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
