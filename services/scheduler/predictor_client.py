"""A thin client of the predictor service, with a deadline and no retries.

The scheduler never waits on a slow or absent predictor for long: after ``timeout_s`` the job
is queued with the fallback score instead (see SchedulerCore.submit).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import grpc

from services.common.channels import dial_aio
from services.common.tls import ChannelSecurity
from services.pb import predictor_pb2, predictor_pb2_grpc
from services.scheduler.registry import PredictorInfo

log = logging.getLogger(__name__)

# The proxy model changes only when the predictor restarts with another artifact.
_MODEL_INFO_TTL_S = 30.0


@dataclass(frozen=True)
class Prediction:
    output_tokens: float
    model_version: str


class PredictorClient:
    """Predicts output lengths over gRPC; returns None when the predictor cannot answer."""

    def __init__(
        self, address: str, timeout_s: float, security: ChannelSecurity | None = None
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = dial_aio(address, security)
        self._stub = predictor_pb2_grpc.PredictorStub(self._channel)
        # Logged on each change only: a predictor outage must not flood the log.
        self._healthy = True
        self._model_info: tuple[float, PredictorInfo | None] = (0.0, None)

    async def predict(self, prompt: str, llm: str) -> Prediction | None:
        try:
            reply = await self._stub.Predict(
                predictor_pb2.PredictRequest(prompt=prompt, llm=llm), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as error:
            self._set_health(False, f"{error.code().name}: {error.details()}")
            return None
        if not math.isfinite(reply.predicted_output_tokens) or reply.predicted_output_tokens < 0:
            self._set_health(False, f"invalid prediction {reply.predicted_output_tokens}")
            return None
        self._set_health(True, "")
        return Prediction(reply.predicted_output_tokens, reply.model_version)

    async def model_info(self) -> PredictorInfo | None:
        """The proxy model's version and heads (cached for a while); None when the predictor
        cannot answer."""
        fetched_at, info = self._model_info
        if info is not None and time.monotonic() - fetched_at < _MODEL_INFO_TTL_S:
            return info
        try:
            reply = await self._stub.GetModelInfo(
                predictor_pb2.GetModelInfoRequest(), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError:
            return None
        info = PredictorInfo(version=reply.model_version, heads=tuple(reply.llms))
        self._model_info = (time.monotonic(), info)
        return info

    def _set_health(self, healthy: bool, reason: str) -> None:
        if healthy == self._healthy:
            return
        self._healthy = healthy
        if healthy:
            log.info("predictor answering again", extra={"predictor": self.address})
        else:
            log.warning(
                "predictor not answering, queueing with fallback scores",
                extra={"predictor": self.address, "reason": reason},
            )

    async def close(self) -> None:
        await self._channel.close()
