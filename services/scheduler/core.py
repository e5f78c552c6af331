"""The scheduler's domain core: validation, prediction with fallback, scoring, leases.

Knows nothing of gRPC (servicer.py translates); all state lives in the JobStore (Redis), so
this object holds only configuration and may run in any number of replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from redis.exceptions import RedisError

from services.common.errors import (
    LIMIT_MAX_QUEUE_DEPTH,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from services.common.penalties import check_penalties
from services.common.principals import UNLIMITED, TenantLimits
from services.scheduler.conversation import last_user_turn, validate_messages
from services.scheduler.keys import llm_tag
from services.scheduler.metrics import observe_finished_jobs
from services.scheduler.models import (
    JobEnd,
    JobRecord,
    JobRequest,
    JobState,
    LeasedJob,
    Progress,
    QueueStats,
    Stop,
    Submission,
    Token,
    request_digest,
    scoped_request_id,
)
from services.scheduler.policies import PRIORITY_RANGE, JobFeatures, Policy
from services.scheduler.prediction import (
    DEFAULT_GRACE_S,
    AsyncPredictions,
    PendingJob,
    PredictionMode,
)
from services.scheduler.predictor_client import Prediction, clamp_prediction
from services.scheduler.registry import (
    KNOWN_LLM_MEMORY_S,
    MAX_WORKER_ID_CHARS,
    PredictorInfo,
    RegistrationCache,
    ServedModel,
)
from services.scheduler.store import JobStore, KeyReused, Rejected
from services.scheduler.tenants import TenantJobs

if TYPE_CHECKING:
    from services.common.first_stage import FirstStageModel

log = logging.getLogger(__name__)

# LLM names become part of Redis keys: keep them to plain characters.
_LLM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
MAX_CLIENT_REQUEST_ID_CHARS = 256
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # per stop string: they are matched against the tail of the answer
# Largest answer a job may ask for (max_new_tokens or replay_output_tokens); a worker also
# ends a job when its model's context is full.
MAX_OUTPUT_TOKENS = 32_768
MAX_JOB_ID_CHARS = 128
MAX_LEASE_JOBS = 256
MAX_LEASE_WAIT_MS = 60_000


class LengthPredictor(Protocol):
    async def predict(self, prompt: str, llm: str) -> Prediction | None: ...

    async def model_info(self) -> PredictorInfo | None: ...


@dataclass(frozen=True)
class SchedulerConfig:
    default_llm: str = "vicuna-13b"
    max_prompt_chars: int = 100_000
    max_queue_depth: int = 100_000  # per LLM; 0: unbounded
    max_wait_s: float = 300.0  # starvation guard; 0: off
    # Predicted tokens used to score a job the predictor could not answer for: near the
    # median, so such jobs neither jump the queue nor starve; equal fallback scores are
    # ordered by arrival, so a predictor outage degrades the queue to FCFS.
    fallback_tokens: float = 256.0
    allow_oracle: bool = False
    reap_interval_s: float = 1.0
    # Start deadline of jobs that set none: a job for an LLM no worker serves (a typo, a
    # retired model) fails with DEADLINE instead of waiting, and its Generate hanging, forever.
    default_start_timeout_s: float = 600.0
    # async: queue at once (first-stage or fallback score), re-score when the prediction
    # arrives; sync: wait for the prediction before queueing.
    prediction_mode: PredictionMode = PredictionMode.ASYNC
    max_predictions_in_flight: int = 4096
    # async mode: how long after queueing a job's prediction is asked for, and only if the
    # job is still queued then (prediction.py: a job an idle worker took needs none).
    prediction_grace_s: float = DEFAULT_GRACE_S


def shown(value: str, limit: int = 64) -> str:
    """A client's value quoted in an error message, cut short: a message echoing a huge
    value would itself exceed gRPC's metadata limit (and become RESOURCE_EXHAUSTED)."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} chars)"


def check_llm_name(llm: str) -> None:
    # fullmatch: with match and $, "vicuna-13b\n" passed ($ matches before a final newline).
    if not _LLM_NAME.fullmatch(llm):
        raise InvalidArgument(
            f"llm {shown(llm)} is not a valid name (letters, digits and ._:/@+- only, "
            "at most 128 characters)"
        )


def check_job_id(job_id: str) -> None:
    if not job_id:
        raise InvalidArgument("job_id must not be empty")
    if len(job_id) > MAX_JOB_ID_CHARS:
        raise InvalidArgument(
            f"job_id has {len(job_id)} characters; job ids have at most {MAX_JOB_ID_CHARS}"
        )


def _key_reused(job_id: str) -> AlreadyExists:
    return AlreadyExists(
        f"client_request_id is already used by job {job_id!r} for a different request "
        "(prompt, llm, sampling or priority differ): use a new id for a new request"
    )


def new_job_id(llm: str = "") -> str:
    """The LLM queue's hash tag (keys.py: the job's keys share its queue's Redis Cluster
    slot), then time-ordered (nanosecond clock in fixed-width hex, then randomness): Redis
    breaks score ties by member, so equal scores are served in arrival order."""
    return f"{llm_tag(llm) if llm else ''}{time.time_ns():016x}{secrets.token_hex(4)}"


class SchedulerCore:
    def __init__(
        self,
        store: JobStore,
        policy: Policy,
        config: SchedulerConfig,
        predictor: LengthPredictor | None,
        first_stage: FirstStageModel | None = None,
    ) -> None:
        if policy.uses_oracle and not config.allow_oracle:
            raise FailedPrecondition(
                f"policy {policy.name!r} reads true lengths sent by clients and is for "
                "experiments only: start the scheduler with --allow-oracle to use it"
            )
        self.store = store
        self.policy = policy
        self.config = config
        self.predictor = predictor
        self.first_stage = first_stage
        self.predictions = (
            AsyncPredictions(
                store,
                predictor,
                max_in_flight=config.max_predictions_in_flight,
                grace_s=config.prediction_grace_s,
            )
            if predictor is not None and config.prediction_mode == PredictionMode.ASYNC
            else None
        )
        self.tenant_jobs = TenantJobs(store.redis, store.settings.job_ttl_s)
        self._stopping = asyncio.Event()
        self._background: set[asyncio.Future[object]] = set()
        self._registrations = RegistrationCache()

    # Client side -----------------------------------------------------------------------

    def _validate(self, request: JobRequest) -> str:
        """Returns the LLM the job goes to; raises InvalidArgument for a malformed request."""
        llm = request.llm or self.config.default_llm
        check_llm_name(llm)
        if request.messages:
            if request.prompt:
                raise InvalidArgument("set either prompt or messages, not both")
            validate_messages(request.messages, self.config.max_prompt_chars)
        elif not request.prompt.strip():
            raise InvalidArgument("prompt must not be empty")
        elif len(request.prompt) > self.config.max_prompt_chars:
            raise InvalidArgument(
                f"prompt has {len(request.prompt)} characters, more than the "
                f"{self.config.max_prompt_chars} allowed (--max-prompt-chars)"
            )
        sampling = request.sampling
        if not math.isfinite(sampling.temperature) or sampling.temperature < 0:
            raise InvalidArgument(
                f"sampling.temperature must be >= 0 (0 is greedy), got {sampling.temperature}"
            )
        if not math.isfinite(sampling.top_p) or not 0 <= sampling.top_p <= 1:
            raise InvalidArgument(f"sampling.top_p must be within (0, 1], got {sampling.top_p}")
        check_penalties(
            sampling.repetition_penalty, sampling.presence_penalty, sampling.frequency_penalty
        )
        if len(sampling.stop) > MAX_STOP_STRINGS or any(
            not stop or len(stop) > MAX_STOP_CHARS for stop in sampling.stop
        ):
            raise InvalidArgument(
                f"sampling.stop takes at most {MAX_STOP_STRINGS} non-empty strings of at most "
                f"{MAX_STOP_CHARS} characters each"
            )
        for name in ("max_new_tokens", "replay_output_tokens"):
            if getattr(sampling, name) > MAX_OUTPUT_TOKENS:
                raise InvalidArgument(
                    f"sampling.{name} must be at most {MAX_OUTPUT_TOKENS}, "
                    f"got {getattr(sampling, name)}"
                )
        low, high = PRIORITY_RANGE
        if not low <= request.priority <= high:
            raise InvalidArgument(
                f"priority must be within [{low}, {high}], got {request.priority}"
            )
        if len(request.client_request_id) > MAX_CLIENT_REQUEST_ID_CHARS:
            raise InvalidArgument(
                f"client_request_id has more than {MAX_CLIENT_REQUEST_ID_CHARS} characters"
            )
        if request.oracle_output_tokens and not self.config.allow_oracle:
            raise InvalidArgument(
                "oracle_output_tokens is for sjf-oracle experiments only; this scheduler "
                "was not started with --allow-oracle"
            )
        if self.policy.uses_oracle and request.oracle_output_tokens <= 0:
            raise InvalidArgument(
                f"policy {self.policy.name!r} needs oracle_output_tokens > 0 on every request"
            )
        return llm

    async def submit(self, request: JobRequest, limits: TenantLimits = UNLIMITED) -> Submission:
        """Validate, predict (or fall back), score and queue a job; idempotent by
        client_request_id within the tenant; within the tenant's ``limits``."""
        if self._stopping.is_set():
            raise Unavailable("this scheduler replica is shutting down; retry on another")
        llm = self._validate(request)
        request_hash = request_digest(request, llm)
        if limits.best_priority is not None and request.priority < limits.best_priority:
            raise PermissionDenied(
                f"priority {request.priority} is above what tenant {request.tenant!r} was "
                f"given: use {limits.best_priority} or higher (lower values run first)"
            )
        if request.client_request_id:
            earlier = await self.store.job_for_client_id(
                llm, scoped_request_id(request.tenant, request.client_request_id)
            )
            if earlier is not None:
                record = await self.store.get(earlier)
                if record is not None:
                    return Submission(self._same_request(record, request_hash), deduplicated=True)
        submitted_at = self.store.now()
        # A chat job's prompt is its last user turn: what the predictor reads and the record
        # keeps (see conversation.py); the worker gets the whole conversation.
        prompt = last_user_turn(request.messages) if request.messages else request.prompt
        prediction, fallback, predict_later = await self._predict(prompt, llm)
        if self.policy.uses_oracle:
            predicted, predictor_version = float(request.oracle_output_tokens), "oracle"
        elif prediction is not None:
            predicted, predictor_version = prediction.output_tokens, prediction.model_version
        else:
            predicted, predictor_version = 0.0, ""
        features = JobFeatures(
            arrival_s=submitted_at,
            # A job with no estimate at all is scored as a typical one.
            predicted_tokens=(
                self.config.fallback_tokens
                if prediction is None and self.policy.uses_prediction
                else predicted
            ),
            oracle_tokens=request.oracle_output_tokens,
            priority=request.priority,
            # What the worker will prefill: the prompt, or every turn of a conversation.
            prompt_chars=len(request.prompt) + sum(len(m.content) for m in request.messages),
        )
        record = JobRecord(
            job_id=new_job_id(llm),
            client_request_id=request.client_request_id,
            llm=llm,
            state=JobState.QUEUED,
            priority=request.priority,
            predicted_output_tokens=predicted,
            prediction_fallback=fallback,
            predictor_version=predictor_version,
            policy=self.policy.name,
            score=self.policy.score(features),
            sampling=request.sampling,
            prompt=prompt,
            messages=request.messages,
            submitted_at=submitted_at,
            queued_at=self.store.now(),
            request_hash=request_hash,
            tenant=request.tenant,
        )
        start_timeout_s = (
            request.start_timeout_ms / 1e3
            if request.start_timeout_ms
            else self.config.default_start_timeout_s
        )
        deadline_at = submitted_at + start_timeout_s if start_timeout_s > 0 else 0.0
        if limits.max_queued_jobs:
            await self.tenant_jobs.reserve(
                request.tenant, record.job_id, limits.max_queued_jobs, submitted_at
            )
        queued = False
        try:
            job_id, deduplicated = await self.store.submit(
                record, deadline_at=deadline_at, max_queue_depth=self.config.max_queue_depth
            )
            queued = not deduplicated
        except Rejected as full:
            raise ResourceExhausted(
                f"the queue of {llm!r} is full ({full.depth} jobs, --max-queue-depth); retry later",
                retry_after_s=1.0,
                limit=LIMIT_MAX_QUEUE_DEPTH,
            ) from None
        except KeyReused as reused:
            raise _key_reused(reused.job_id) from None
        finally:
            if limits.max_queued_jobs and not queued:
                await self.tenant_jobs.release(request.tenant, record.job_id)
        if deduplicated:
            earlier_record = await self.store.get(job_id)
            if earlier_record is None:
                raise NotFound(f"job {job_id!r} of client_request_id expired; retry")
            return Submission(earlier_record, deduplicated=True)
        if predict_later and self.predictions is not None:
            policy = self.policy
            self.predictions.schedule(
                PendingJob(
                    job_id,
                    llm,
                    prompt,
                    lambda tokens: policy.score(replace(features, predicted_tokens=tokens)),
                )
            )
        return Submission(record, deduplicated=False)

    @staticmethod
    def _same_request(record: JobRecord, request_hash: str) -> JobRecord:
        if record.request_hash and record.request_hash != request_hash:
            raise _key_reused(record.job_id)
        return record

    async def _predict(self, prompt: str, llm: str) -> tuple[Prediction | None, bool, bool]:
        """(estimate to queue with, fallback, predict in the background). Policies that need
        no prediction never ask. The estimate is the proxy model's (sync mode) or the
        first-stage model's (async mode, and whenever the predictor cannot answer); None when
        neither exists (the job gets the fallback score)."""
        if not self.policy.uses_prediction:
            return None, False, False
        first = self._first_stage_estimate(prompt, llm)
        if self.predictor is None:
            return first, True, False
        if self.predictions is not None:
            return first, False, True
        prediction = await self.predictor.predict(prompt, llm)
        if prediction is None:
            return first, True, False
        return prediction, False, False

    def _first_stage_estimate(self, prompt: str, llm: str) -> Prediction | None:
        if self.first_stage is None:
            return None
        tokens = clamp_prediction(self.first_stage.predict(prompt, llm))
        return Prediction(tokens, self.first_stage.version)

    async def get_job(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """The job's record; for ``tenant`` (None: any), only a job of its own: another
        tenant's job is NotFound, the same answer as a job that does not exist."""
        check_job_id(job_id)
        record = await self.store.get(job_id)
        if record is None or (tenant is not None and record.tenant != tenant):
            raise NotFound(f"no job {job_id!r}: unknown, or finished and expired (--job-ttl-s)")
        return record

    async def events(
        self, job_id: str, from_index: int = 0, tenant: str | None = None
    ) -> AsyncIterator[Token | JobEnd]:
        """A job's tokens from ``from_index`` then its end; works on any replica."""
        await self.get_job(job_id, tenant)
        async for event in self.store.events(job_id, from_index):
            yield event

    async def cancel(self, job_id: str, tenant: str | None = None) -> tuple[JobState, bool]:
        check_job_id(job_id)
        if tenant is not None:
            await self.get_job(job_id, tenant)  # a job's owner never changes: no race
        result = await self.store.cancel(job_id)
        if result is None:
            raise NotFound(f"no job {job_id!r}: unknown, or finished and expired (--job-ttl-s)")
        state, cancelled = result
        if cancelled:
            log.info("job cancelled", extra={"job_id": job_id})
        return state, cancelled

    async def queue_stats(self, llm: str = "") -> list[QueueStats]:
        return await self.store.stats([llm] if llm else [], self.store.now())

    # Worker side -----------------------------------------------------------------------

    async def lease(
        self, worker_id: str, llms: list[str], max_jobs: int, wait_ms: int
    ) -> list[LeasedJob]:
        """Lease up to ``max_jobs`` jobs, waiting up to ``wait_ms`` for one (no polling: the
        wait blocks on the LLMs' wake-up lists)."""
        if not worker_id or len(worker_id) > MAX_WORKER_ID_CHARS:
            raise InvalidArgument(
                f"worker_id must have 1 to {MAX_WORKER_ID_CHARS} characters, got {len(worker_id)}"
            )
        if not llms:
            raise InvalidArgument("llms must name at least one LLM the worker serves")
        for llm in llms:
            check_llm_name(llm)
        if not 1 <= max_jobs <= MAX_LEASE_JOBS:
            raise InvalidArgument(f"max_jobs must be within [1, {MAX_LEASE_JOBS}], got {max_jobs}")
        wait_s = min(wait_ms, MAX_LEASE_WAIT_MS) / 1e3
        await self._register_worker(worker_id, llms, wait_s)
        deadline = time.monotonic() + wait_s
        while not self._stopping.is_set():
            jobs = await self._claim(worker_id, llms, max_jobs)
            if jobs:
                log.debug(
                    "leased", extra={"worker_id": worker_id, "jobs": [job.job_id for job in jobs]}
                )
                return jobs
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await self._wait_for_work(llms, remaining):
                return []
        return []

    async def _claim(self, worker_id: str, llms: list[str], max_jobs: int) -> list[LeasedJob]:
        """Claim, even when the Lease call is cancelled meanwhile: then the jobs claimed for
        a worker that will never hear of them are released at once, not orphaned until
        their leases expire (each losing an attempt)."""
        claiming = asyncio.ensure_future(
            self.store.claim(worker_id, llms, max_jobs=max_jobs, max_wait_s=self.config.max_wait_s)
        )
        try:
            return await asyncio.shield(claiming)
        except asyncio.CancelledError:
            claiming.add_done_callback(self._release_when_claimed)
            raise

    def _release_when_claimed(self, claiming: asyncio.Future[list[LeasedJob]]) -> None:
        if claiming.cancelled() or claiming.exception() is not None or not claiming.result():
            return
        task = asyncio.ensure_future(self.store.release(claiming.result()))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _wait_for_work(self, llms: list[str], timeout_s: float) -> bool:
        """True when woken by a queued job; False on timeout or shutdown."""
        wake = asyncio.ensure_future(self.store.wait_for_work(llms, timeout_s))
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({wake, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (wake, stop):
                task.cancel()
        return wake.done() and not wake.cancelled() and wake.result()

    async def report(self, progress: list[Progress], worker_id: str = "") -> list[Stop]:
        if 0 < len(worker_id) <= MAX_WORKER_ID_CHARS:
            await self._refresh_worker(worker_id)
        stops = await self.store.apply_progress(progress)
        await observe_finished_jobs(self, progress)  # JCT/TTFT/prediction-error histograms
        return stops

    # Live-worker registry ----------------------------------------------------------------

    async def _register_worker(self, worker_id: str, llms: list[str], wait_s: float) -> None:
        """A Lease call registers its worker as live for the long poll plus one lease TTL
        (the worker calls again or heartbeats through Report before that)."""
        now = self.store.now()
        ttl_s = wait_s + self.store.settings.lease_ttl_s
        served = tuple(sorted(set(llms)))
        # Written only when the last registration would lapse within half a lease TTL.
        if self._registrations.needs_register(worker_id, served, now + ttl_s / 2):
            await self.store.register_worker(worker_id, list(served), ttl_s, now)
            self._registrations.remember(worker_id, served, now + ttl_s)

    async def _refresh_worker(self, worker_id: str) -> None:
        """A Report (heartbeats every third of the lease TTL) keeps a busy worker, which does
        not call Lease while its batch is full, registered."""
        now = self.store.now()
        ttl_s = self.store.settings.lease_ttl_s
        if self._registrations.needs_refresh(worker_id, now + ttl_s / 2):
            # Remembered even when there was nothing to refresh (the registration lapsed):
            # the worker's next Lease registers it again; no write on every report meanwhile.
            await self.store.refresh_worker(worker_id, ttl_s, now)
            self._registrations.remember(worker_id, None, now + ttl_s)

    async def live_llms(self) -> set[str]:
        """LLM names at least one live worker serves now."""
        workers = await self.store.live_workers(self.store.now())
        return {llm for llms in workers.values() for llm in llms}

    async def list_models(self, include_offline: bool = False) -> list[ServedModel]:
        """The LLMs live workers serve now, with the predictor head ordering each one;
        ``include_offline`` adds those a worker served within KNOWN_LLM_MEMORY_S, with
        workers=0."""
        now = self.store.now()
        workers = await self.store.live_workers(now)
        counts: dict[str, int] = {}
        for llms in workers.values():
            for llm in set(llms):
                counts[llm] = counts.get(llm, 0) + 1
        if include_offline:
            for llm in await self.store.llms_seen(now - KNOWN_LLM_MEMORY_S):
                counts.setdefault(llm, 0)
        info = await self._predictor_info()
        return [
            ServedModel(
                llm=llm,
                workers=count,
                predictor_head=info.head_for(llm) if info else "",
                predictor_version=info.version if info else "",
            )
            for llm, count in sorted(counts.items())
        ]

    async def _predictor_info(self) -> PredictorInfo | None:
        if not self.policy.uses_prediction or self.predictor is None:
            return None
        return await self.predictor.model_info()

    # Background ------------------------------------------------------------------------

    async def run_reaper(self) -> None:
        """Requeue expired leases and fail missed deadlines until stopped. Every replica runs
        one; the reap script is atomic, so they never requeue a job twice."""
        while not self._stopping.is_set():
            try:
                await self.store.sync_clock()
                requeued, failed, missed = await self.store.reap()
                if requeued or failed or missed:
                    log.info(
                        "reaped",
                        extra={"requeued": requeued, "failed": failed, "deadline_missed": missed},
                    )
                if max(requeued + failed, missed) >= self.store.settings.reap_batch:
                    continue  # a full batch: more may be waiting
            except (RedisError, Unavailable) as error:
                log.warning("reaper cannot reach redis", extra={"error": str(error)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait_stopped(), self.config.reap_interval_s)

    def stop(self) -> None:
        """Stop taking work: new submissions are refused, waiting leases return empty."""
        self._stopping.set()

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()
