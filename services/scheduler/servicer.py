"""gRPC servicers: translate ssjf.v1 messages to and from the scheduler's domain core."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from services.common.auth import current_principal
from services.common.errors import NotFound, Unavailable
from services.pb import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.core import SchedulerCore
from services.scheduler.models import (
    ChatMessage,
    FinishReason,
    JobEnd,
    JobRecord,
    JobRequest,
    JobState,
    LeasedJob,
    Outcome,
    Progress,
    SamplingParams,
    StopReason,
    Submission,
    Token,
)

log = logging.getLogger(__name__)

# Retries (with backoff up to 5 s, about 2 minutes in all) of a disconnected client's cancel.
_ABANDONED_CANCEL_TRIES = 30

_STOP_REASON = {
    StopReason.CANCELLED: scheduler_pb2.StopJob.REASON_CANCELLED,
    StopReason.LEASE_LOST: scheduler_pb2.StopJob.REASON_LEASE_LOST,
    StopReason.FINISHED: scheduler_pb2.StopJob.REASON_FINISHED,
}


def _state_pb(state: JobState) -> int:
    return common_pb2.JobState.Value(f"JOB_STATE_{state.value}")


def _finish_reason_pb(reason: FinishReason) -> int:
    return common_pb2.FinishReason.Value(f"FINISH_REASON_{reason.value or 'UNSPECIFIED'}")


def _finish_reason(value: int) -> FinishReason:
    name = common_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_")
    return FinishReason.UNSPECIFIED if name == "UNSPECIFIED" else FinishReason(name)


def sampling_from_pb(sampling: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        stop=tuple(sampling.stop),
        seed=sampling.seed if sampling.HasField("seed") else None,
        replay_output_tokens=sampling.replay_output_tokens,
        repetition_penalty=sampling.repetition_penalty,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
    )


def sampling_to_pb(sampling: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        stop=list(sampling.stop),
        seed=sampling.seed,
        replay_output_tokens=sampling.replay_output_tokens,
        repetition_penalty=sampling.repetition_penalty,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
    )


def job_request_from_pb(request: scheduler_pb2.GenerateRequest, tenant: str = "") -> JobRequest:
    return JobRequest(
        tenant=tenant,
        prompt=request.prompt,
        llm=request.llm,
        sampling=sampling_from_pb(request.sampling),
        client_request_id=request.client_request_id,
        priority=request.priority,
        oracle_output_tokens=request.oracle_output_tokens,
        start_timeout_ms=request.start_timeout_ms,
        messages=tuple(ChatMessage(m.role, m.content) for m in request.messages),
    )


def job_to_pb(record: JobRecord) -> scheduler_pb2.Job:
    return scheduler_pb2.Job(
        job_id=record.job_id,
        client_request_id=record.client_request_id,
        llm=record.llm,
        state=_state_pb(record.state),
        priority=record.priority,
        predicted_output_tokens=record.predicted_output_tokens,
        prediction_fallback=record.prediction_fallback,
        predictor_version=record.predictor_version,
        submitted_at=record.submitted_at,
        queued_at=record.queued_at,
        leased_at=record.leased_at,
        first_token_at=record.first_token_at,
        finished_at=record.finished_at,
        worker_id=record.worker_id,
        attempts=record.attempts,
        generated_tokens=record.generated_tokens,
        finish_reason=_finish_reason_pb(record.finish_reason),
        error=record.error,
        policy=record.policy,
        sampling=sampling_to_pb(record.sampling),
        prompt_chars=len(record.prompt),
    )


def summary_to_pb(record: JobRecord) -> scheduler_pb2.JobSummary:
    return scheduler_pb2.JobSummary(
        state=_state_pb(record.state),
        finish_reason=_finish_reason_pb(record.finish_reason),
        error=record.error,
        queue_wait_s=record.queue_wait_s,
        time_to_first_token_s=record.time_to_first_token_s,
        completion_s=record.completion_s,
        predicted_output_tokens=record.predicted_output_tokens,
        generated_tokens=record.generated_tokens,
        attempts=record.attempts,
        prediction_fallback=record.prediction_fallback,
        prompt_tokens=record.prompt_tokens,
    )


def messages_to_pb(messages: tuple[ChatMessage, ...]) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=m.role, content=m.content) for m in messages]


def event_to_pb(job_id: str, event: Token | JobEnd) -> scheduler_pb2.JobEvent:
    if isinstance(event, Token):
        return scheduler_pb2.JobEvent(
            job_id=job_id,
            token=common_pb2.Token(index=event.index, text=event.text, token_id=event.token_id),
        )
    return scheduler_pb2.JobEvent(job_id=job_id, summary=summary_to_pb(event.record))


def leased_job_to_pb(job: LeasedJob) -> scheduler_pb2.LeasedJob:
    return scheduler_pb2.LeasedJob(
        job_id=job.job_id,
        lease_id=job.lease_id,
        llm=job.llm,
        prompt=job.prompt,
        sampling=sampling_to_pb(job.sampling),
        resume_token_ids=job.resume_token_ids,
        attempt=job.attempt,
        predicted_output_tokens=job.predicted_output_tokens,
        messages=messages_to_pb(job.messages),
    )


def progress_from_pb(progress: scheduler_pb2.JobProgress) -> Progress:
    outcome = None
    if progress.HasField("outcome"):
        reported = progress.outcome
        outcome = Outcome(
            finish_reason=_finish_reason(reported.finish_reason),
            error=reported.error,
            generated_tokens=reported.generated_tokens,
            prompt_tokens=reported.prompt_tokens,
            prefill_s=reported.prefill_s,
            decode_s=reported.decode_s,
        )
    return Progress(
        job_id=progress.job_id,
        lease_id=progress.lease_id,
        tokens=[Token(token.index, token.text, token.token_id) for token in progress.tokens],
        outcome=outcome,
    )


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    """The client-facing API."""

    def __init__(self, core: SchedulerCore) -> None:
        self.core = core
        # Cancellations started by disconnected clients: kept so they are not collected.
        self._cancellations: set[asyncio.Task[object]] = set()

    async def Generate(
        self, request: scheduler_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.JobEvent]:
        # Shielded: a client gone while its job is being queued must still have it cancelled.
        principal = current_principal()
        submitting = asyncio.ensure_future(
            self.core.submit(job_request_from_pb(request, principal.tenant), principal.limits)
        )
        try:
            submission = await asyncio.shield(submitting)
        except asyncio.CancelledError:
            submitting.add_done_callback(self._cancel_when_queued)
            raise
        record = submission.record
        try:
            yield scheduler_pb2.JobEvent(
                job_id=record.job_id,
                accepted=scheduler_pb2.JobAccepted(
                    predicted_output_tokens=record.predicted_output_tokens,
                    prediction_fallback=record.prediction_fallback,
                    deduplicated=submission.deduplicated,
                ),
            )
            async for event in self.core.events(record.job_id):
                yield event_to_pb(record.job_id, event)
        except (asyncio.CancelledError, GeneratorExit):
            # The client closed the call before the end: that cancels the job, unless
            # - this replica is shutting down (the client resumes with Stream elsewhere);
            # - the submission was deduplicated: the job belongs to the first request with
            #   this client_request_id, and a retry or a second client must not cancel it.
            # An error on our side (Redis unreachable: "resume with Stream") cancels nothing.
            if not submission.deduplicated and not self.core.stopping:
                self._cancel_in_background(record.job_id)
            raise

    def _cancel_when_queued(self, submitting: asyncio.Future[Submission]) -> None:
        if submitting.cancelled() or submitting.exception() is not None:
            return
        if not submitting.result().deduplicated:
            self._cancel_in_background(submitting.result().record.job_id)

    def _cancel_in_background(self, job_id: str) -> None:
        task = asyncio.ensure_future(self._cancel_abandoned(job_id))
        self._cancellations.add(task)
        task.add_done_callback(self._cancellations.discard)

    async def _cancel_abandoned(self, job_id: str) -> None:
        """Cancel a disconnected client's job, retrying while Redis is unreachable, so no
        abandoned job stays queued (its error is logged, never left unretrieved)."""
        delay = 0.1
        for _ in range(_ABANDONED_CANCEL_TRIES):
            try:
                await self.core.cancel(job_id)
                return
            except NotFound:
                return  # its record already expired: nothing is left to cancel
            except Unavailable as error:
                log.warning(
                    "cannot cancel an abandoned job yet",
                    extra={"job_id": job_id, "error": str(error)},
                )
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
            except Exception:
                log.exception("cancelling an abandoned job failed", extra={"job_id": job_id})
                return
        log.error("gave up cancelling an abandoned job", extra={"job_id": job_id})

    async def Submit(
        self, request: scheduler_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.SubmitResponse:
        principal = current_principal()
        submission = await self.core.submit(
            job_request_from_pb(request, principal.tenant), principal.limits
        )
        return scheduler_pb2.SubmitResponse(
            job_id=submission.record.job_id,
            deduplicated=submission.deduplicated,
            job=job_to_pb(submission.record),
        )

    async def Stream(
        self, request: scheduler_pb2.StreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.JobEvent]:
        tenant = current_principal().tenant
        async for event in self.core.events(request.job_id, request.from_index, tenant):
            yield event_to_pb(request.job_id, event)

    async def Cancel(
        self, request: scheduler_pb2.CancelRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.CancelResponse:
        state, cancelled = await self.core.cancel(request.job_id, current_principal().tenant)
        return scheduler_pb2.CancelResponse(state=_state_pb(state), cancelled=cancelled)

    async def GetJob(
        self, request: scheduler_pb2.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.Job:
        return job_to_pb(await self.core.get_job(request.job_id, current_principal().tenant))

    async def QueueStats(
        self, request: scheduler_pb2.QueueStatsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.QueueStatsResponse:
        stats = await self.core.queue_stats(request.llm)
        return scheduler_pb2.QueueStatsResponse(
            queues=[
                scheduler_pb2.QueueStats(
                    llm=item.llm,
                    queued=item.queued,
                    running=item.running,
                    oldest_wait_s=item.oldest_wait_s,
                    counters=item.counters,
                )
                for item in stats
            ],
            policy=self.core.policy.name,
        )

    async def ListModels(
        self, request: scheduler_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.ListModelsResponse:
        models = await self.core.list_models(include_offline=request.include_offline)
        return scheduler_pb2.ListModelsResponse(
            models=[
                scheduler_pb2.ServedModel(
                    llm=model.llm,
                    workers=model.workers,
                    predictor_head=model.predictor_head,
                    predictor_version=model.predictor_version,
                )
                for model in models
            ]
        )


class WorkerGatewayServicer(scheduler_pb2_grpc.WorkerGatewayServicer):
    """Where workers lease jobs and report progress."""

    def __init__(self, core: SchedulerCore) -> None:
        self.core = core

    async def Lease(
        self, request: scheduler_pb2.LeaseRequest, context: grpc.aio.ServicerContext
    ) -> scheduler_pb2.LeaseResponse:
        jobs = await self.core.lease(
            request.worker_id, list(request.llms), request.max_jobs, request.wait_ms
        )
        return scheduler_pb2.LeaseResponse(
            jobs=[leased_job_to_pb(job) for job in jobs],
            lease_ttl_s=self.core.store.settings.lease_ttl_s,
        )

    async def Report(
        self,
        request_iterator: AsyncIterator[scheduler_pb2.WorkerReport],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[scheduler_pb2.WorkerDirective]:
        async for report in request_iterator:
            stops = await self.core.report(
                [progress_from_pb(p) for p in report.progress], report.worker_id
            )
            if stops:
                log.info(
                    "stopping jobs",
                    extra={
                        "worker_id": report.worker_id,
                        "stop": [(s.job_id, s.reason.value) for s in stops],
                    },
                )
            yield scheduler_pb2.WorkerDirective(
                stop=[
                    scheduler_pb2.StopJob(
                        job_id=s.job_id, reason=_STOP_REASON[s.reason], lease_id=s.lease_id
                    )
                    for s in stops
                ],
                ack_sequence=report.sequence,
            )
