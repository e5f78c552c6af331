"""Prediction off the critical path: queue first, re-score when the proxy model answers.

``SchedulerCore.submit`` queues a job at once with a first-stage score (the hashed n-gram
model of services/common/first_stage.py, microseconds in process) or the fallback score, and
hands the job to :class:`AsyncPredictions`. In the background, that waits a short grace
(``--prediction-grace-ms``), asks the predictor service only if the job is still queued
(lua/prediction_needed.lua), and applies the answer with one atomic script (lua/rescore.lua):
a job still queued moves to its new place; a job a worker already took (an idle worker never
waits for a prediction) keeps everything, and the late prediction is only counted.

Why the grace: a job that finds an idle worker is leased within a few milliseconds, and its
prediction can no longer change anything. Asking for it anyway cost such a job 0.5-1.7 ms of
dispatch on a 2-core host (the predictor's inference and this replica's gRPC call competed
with the lease for the same cores; docs/predictor.md, "Prediction grace") and cost the
predictor one inference per job even at light load, where most jobs never wait. A queued job
gets its prediction a few milliseconds later, which changes next to nothing where waits are
counted in seconds.

Metrics: the ``ssjf_scheduler_prediction_seconds`` histogram (this replica's predictor round
trips, by outcome) and, in Redis beside the other job counters (every replica's): ``rescored``,
``prediction_unneeded`` (dispatched within the grace: never predicted), ``prediction_late``
(dispatched after the predictor was asked, before its answer), ``prediction_fallback``
(the predictor gave no answer) and ``prediction_skipped`` (too many predictions in flight).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from prometheus_client import Histogram
from redis.exceptions import RedisError

from services.common.errors import Unavailable
from services.scheduler.keys import job_key
from services.scheduler.predictor_client import Prediction
from services.scheduler.store import BatchedScript, JobStore, metrics_key

log = logging.getLogger(__name__)

PREDICTION_SECONDS = Histogram(
    "ssjf_scheduler_prediction_seconds",
    "Predictor round trips of this replica's background re-scoring, by outcome",
    ["outcome"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)


class PredictionMode(StrEnum):
    ASYNC = "async"  # queue at once, re-score when the prediction arrives (default)
    SYNC = "sync"  # wait for the prediction before queueing (the old path; for comparison)


class Predicts(Protocol):
    async def predict(self, prompt: str, llm: str) -> Prediction | None: ...


class RescoreOutcome(StrEnum):
    RESCORED = "rescored"
    UNNEEDED = "unneeded"
    LATE = "late"
    FAILED = "failed"
    GONE = "gone"


@dataclass(frozen=True)
class PendingJob:
    job_id: str
    llm: str
    prompt: str
    # The job's new score for a predicted length (the policy's score with the job's own
    # arrival and priority): computed here, so the script needs no policy logic.
    score_for: Callable[[float], float]


DEFAULT_GRACE_S = 0.005


class AsyncPredictions:
    """Background predictions for queued jobs, at most ``max_in_flight`` at a time; each is
    asked ``grace_s`` after its job was queued, and only if the job is still queued then."""

    def __init__(
        self,
        store: JobStore,
        predictor: Predicts,
        *,
        max_in_flight: int = 4096,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        self.store = store
        self.predictor = predictor
        self.max_in_flight = max_in_flight
        self.grace_s = grace_s
        self._needed = BatchedScript(store.redis, "prediction_needed")
        self._rescore = BatchedScript(store.redis, "rescore")
        self._tasks: set[asyncio.Task[RescoreOutcome | None]] = set()
        self._counters: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def schedule(self, job: PendingJob) -> asyncio.Task[RescoreOutcome | None] | None:
        """Predict ``job`` in the background; None when too many predictions are in flight
        (the job keeps its first-stage score: a slow predictor must not pile up tasks)."""
        if len(self._tasks) >= self.max_in_flight:
            counter = asyncio.create_task(self._count_skipped(job.llm))
            self._counters.add(counter)
            counter.add_done_callback(self._counters.discard)
            return None
        task = asyncio.create_task(self._predict_and_rescore(job), name=f"predict-{job.job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _count_skipped(self, llm: str) -> None:
        try:
            await self.store.redis.hincrby(metrics_key(llm), "prediction_skipped", 1)
        except RedisError as error:
            log.warning("prediction_skipped not counted", extra={"error": str(error)})

    async def _predict_and_rescore(self, job: PendingJob) -> RescoreOutcome | None:
        if self.grace_s > 0:
            await asyncio.sleep(self.grace_s)
            try:
                needed = await self._needed(job_key(job.job_id), [job.job_id])
            except (RedisError, Unavailable) as error:
                log.warning("prediction skipped", extra={"job_id": job.job_id, "error": str(error)})
                return None
            if not needed:
                return RescoreOutcome.UNNEEDED
        started = time.monotonic()
        prediction = await self.predictor.predict(job.prompt, job.llm)
        PREDICTION_SECONDS.labels("answered" if prediction else "failed").observe(
            time.monotonic() - started
        )
        if prediction is None:
            args = [job.job_id, "failed", "0", "0", ""]
        else:
            tokens = prediction.output_tokens
            args = [
                job.job_id,
                "predicted",
                repr(job.score_for(tokens)),
                repr(tokens),
                prediction.model_version,
            ]
        try:
            outcome = RescoreOutcome(await self._rescore(job_key(job.job_id), args))
        except (RedisError, Unavailable) as error:
            # The job is queued already with its first-stage score: ordering degrades, nothing
            # is lost.
            log.warning("prediction not applied", extra={"job_id": job.job_id, "error": str(error)})
            return None
        log.debug("prediction applied", extra={"job_id": job.job_id, "outcome": outcome.value})
        return outcome

    async def drain(self, timeout_s: float) -> None:
        """Let predictions in flight finish for up to ``timeout_s``, then cancel the rest
        (their jobs stay queued with their first-stage score)."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
