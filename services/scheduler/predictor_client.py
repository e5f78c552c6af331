"""A thin client of the predictor service: a deadline, no retries, a circuit breaker and a
clamp on what it returns.

The scheduler never waits on a slow or absent predictor for long: after ``timeout_s`` the
prediction is given up (the job keeps its first-stage or fallback score, see
services/scheduler/prediction.py). When the predictor fails ``failure_threshold`` times in a
row, the breaker opens: for ``open_s`` no call is made at all (a hung predictor would
otherwise cost every job a full timeout), then one probe call decides whether it closes again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import grpc

from services.common.channels import dial_aio
from services.common.tls import ChannelSecurity
from services.pb import predictor_pb2, predictor_pb2_grpc
from services.scheduler.policies import PRIORITY_STRIDE
from services.scheduler.registry import PredictorInfo

log = logging.getLogger(__name__)

# Largest prediction a job may be scored with. A prediction is one term of a score that also
# holds ``priority * PRIORITY_STRIDE`` and an aging term below 1e10 (policies.py): keeping
# predictions far below the stride means no prediction can move a job across a priority class.
MAX_PREDICTED_TOKENS = 1e6
assert MAX_PREDICTED_TOKENS * 100 < PRIORITY_STRIDE
MIN_PREDICTED_TOKENS = 1.0

# The proxy model changes only when the predictor restarts with another artifact.
_MODEL_INFO_TTL_S = 30.0


@dataclass(frozen=True)
class Prediction:
    output_tokens: float
    model_version: str


def clamp_prediction(tokens: float, high: float = MAX_PREDICTED_TOKENS) -> float:
    """A finite prediction forced into ``[MIN_PREDICTED_TOKENS, high]``."""
    return min(max(tokens, MIN_PREDICTED_TOKENS), high)


class BreakerState(StrEnum):
    CLOSED = "closed"  # calls go through
    OPEN = "open"  # calls are refused without trying
    HALF_OPEN = "half-open"  # one probe call is in flight; others are refused


class CircuitBreaker:
    """Consecutive-failure circuit breaker (pure logic; the clock is injectable for tests)."""

    def __init__(
        self,
        failure_threshold: int = 3,
        open_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or open_s <= 0:
            raise ValueError("failure_threshold must be >= 1 and open_s > 0")
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._state = BreakerState.CLOSED
        self.times_opened = 0

    @property
    def state(self) -> BreakerState:
        return self._state

    def allow(self) -> bool:
        """Whether a call may go out now (a True in the open state starts the probe)."""
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.open_s:
            self._state = BreakerState.HALF_OPEN
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._state = BreakerState.CLOSED

    def record_failure(self) -> None:
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            if self._state is not BreakerState.OPEN:
                self.times_opened += 1
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()


class PredictorClient:
    """Predicts output lengths over gRPC; returns None when the predictor cannot answer."""

    def __init__(
        self,
        address: str,
        timeout_s: float,
        security: ChannelSecurity | None = None,
        *,
        max_predicted_tokens: float = MAX_PREDICTED_TOKENS,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        if not MIN_PREDICTED_TOKENS <= max_predicted_tokens <= MAX_PREDICTED_TOKENS:
            raise ValueError(
                f"max_predicted_tokens must be within [{MIN_PREDICTED_TOKENS:g}, "
                f"{MAX_PREDICTED_TOKENS:g}]"
            )
        self.address = address
        self.timeout_s = timeout_s
        self.max_predicted_tokens = max_predicted_tokens
        self.breaker = breaker or CircuitBreaker()
        self._channel = dial_aio(address, security)
        self._stub = predictor_pb2_grpc.PredictorStub(self._channel)
        # Logged on each change only: a predictor outage must not flood the log.
        self._healthy = True
        self._model_info: tuple[float, PredictorInfo | None] = (0.0, None)

    async def predict(self, prompt: str, llm: str) -> Prediction | None:
        if not self.breaker.allow():
            return None
        try:
            reply = await self._stub.Predict(
                predictor_pb2.PredictRequest(prompt=prompt, llm=llm), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as error:
            self._failed(f"{error.code().name}: {error.details()}")
            return None
        tokens = reply.predicted_output_tokens
        if not math.isfinite(tokens) or tokens < 0:
            self._failed(f"invalid prediction {tokens}")
            return None
        self.breaker.record_success()
        self._set_health(True, "")
        return Prediction(clamp_prediction(tokens, self.max_predicted_tokens), reply.model_version)

    def _failed(self, reason: str) -> None:
        self.breaker.record_failure()
        self._set_health(False, reason)

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
                "predictor not answering, keeping first-stage or fallback scores",
                extra={
                    "predictor": self.address,
                    "reason": reason,
                    "breaker": self.breaker.state.value,
                },
            )

    async def close(self) -> None:
        await self._channel.close()
