"""The worker's side of the scheduler's WorkerGateway: lease jobs, stream their progress.

Four asyncio tasks share one channel:
- lease: whenever the engine has free slots, long-poll ``Lease`` for that many jobs;
- pump: turn the engine's per-step updates into ``JobProgress`` entries in an outbox;
- report: send the outbox as ``WorkerReport``s on one ``Report`` stream, and obey the
  directive answering each (stop cancelled jobs and jobs whose lease was lost);
- heartbeat: every third of the lease TTL, put an empty entry (a heartbeat) in the outbox
  for each job still held, so a long prefill never lets a lease expire.

A scheduler that cannot be reached is retried with capped exponential backoff; progress
produced meanwhile stays in the outbox and is sent when the stream is back (token indexes
make a resend harmless). The client never raises out of its tasks.
"""

from __future__ import annotations

import asyncio
import logging
import random
from contextlib import suppress
from dataclasses import dataclass

import grpc

from services.common.channels import dial_aio
from services.common.errors import InvalidArgument
from services.common.tls import ChannelSecurity
from services.pb import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.worker.jobs import FinishReason, JobUpdate, Outcome, Sampling
from services.worker.runner import EngineRunner

log = logging.getLogger(__name__)

FINISH_REASONS = {
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.EOS: common_pb2.FINISH_REASON_EOS,
    FinishReason.STOP_SEQUENCE: common_pb2.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.REPLAY_LENGTH: common_pb2.FINISH_REASON_REPLAY_LENGTH,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}
# Until the first Lease answer says otherwise; the scheduler's default is longer.
_INITIAL_LEASE_TTL_S = 15.0
_RPC_SLACK_S = 10.0


def sampling_from_proto(params: common_pb2.SamplingParams, default_max_new_tokens: int) -> Sampling:
    """Protobuf zero values mean "server default"; an unset seed gets a fresh random one."""
    return Sampling(
        max_new_tokens=params.max_new_tokens or default_max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p or 1.0,
        stop=tuple(params.stop),
        seed=params.seed if params.HasField("seed") else random.getrandbits(63),
        replay_output_tokens=params.replay_output_tokens,
    )


def outcome_to_proto(outcome: Outcome) -> scheduler_pb2.JobOutcome:
    return scheduler_pb2.JobOutcome(
        finish_reason=FINISH_REASONS[outcome.finish_reason],
        error=outcome.error,
        generated_tokens=outcome.generated_tokens,
        prompt_tokens=outcome.prompt_tokens,
        prefill_s=outcome.prefill_s,
        decode_s=outcome.decode_s,
    )


class Backoff:
    """Capped exponential delays with jitter, so restarted schedulers are not stampeded."""

    def __init__(self, first_s: float = 0.1, cap_s: float = 5.0) -> None:
        self.first_s, self.cap_s = first_s, cap_s
        self._next_s = first_s
        self.failures = 0

    def reset(self) -> None:
        if self.failures:
            log.info("scheduler reachable again", extra={"after_failures": self.failures})
        self._next_s = self.first_s
        self.failures = 0

    def log_failure(self, message: str, error: BaseException) -> None:
        """Warn on the first failure of a run; repeats while the outage lasts are debug."""
        self.failures += 1
        if isinstance(error, grpc.aio.AioRpcError):
            detail = {"code": error.code().name, "details": error.details()}
        else:
            detail = {"error": str(error)}
        log.log(logging.WARNING if self.failures == 1 else logging.DEBUG, message, extra=detail)

    async def sleep(self) -> None:
        await asyncio.sleep(self._next_s * random.uniform(0.5, 1.0))
        self._next_s = min(self.cap_s, self._next_s * 2)


@dataclass(frozen=True)
class _Lease:
    """One lease of one job. The engine knows the job by ``key``, unique per lease, so a job
    leased again (after its old lease lapsed) never mixes with its earlier run here."""

    job_id: str
    lease_id: str

    @property
    def key(self) -> str:
        return f"{self.job_id}/{self.lease_id}"


class GatewayClient:
    """Feeds the engine from the scheduler and reports back; see the module docstring."""

    def __init__(
        self,
        runner: EngineRunner,
        scheduler_address: str,
        worker_id: str,
        llms: list[str],
        default_max_new_tokens: int,
        lease_wait_ms: int = 2000,
        security: ChannelSecurity | None = None,
    ) -> None:
        self.runner = runner
        self.worker_id = worker_id
        self.llms = llms
        self.default_max_new_tokens = default_max_new_tokens
        self.lease_wait_ms = lease_wait_ms
        self.lease_ttl_s = _INITIAL_LEASE_TTL_S
        # TLS and the worker's credential (token or client certificate), from flags or env.
        self._channel = dial_aio(scheduler_address, security)
        self._stub = scheduler_pb2_grpc.WorkerGatewayStub(self._channel)
        # Leases the engine works on, by key; and each job's current lease key.
        self._held: dict[str, _Lease] = {}
        self._current: dict[str, str] = {}
        # Keys of runs stopped here: the engine's last update for them is dropped.
        self._silenced: set[str] = set()
        # Progress not yet sent, one entry per lease key, in first-touched order.
        self._outbox: dict[str, scheduler_pb2.JobProgress] = {}
        self._outbox_ready = asyncio.Event()
        self._lease_ttl_changed = asyncio.Event()
        self._draining = False
        self._lease_in_flight = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._lease_task = asyncio.create_task(self._lease_loop(), name="lease")
        self._tasks = [
            self._lease_task,
            asyncio.create_task(self._pump_loop(), name="pump"),
            asyncio.create_task(self._report_loop(), name="report"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
        ]

    async def drain(self) -> None:
        """Stop leasing, then wait until every held job has finished and been reported.

        A Lease call already in flight is allowed to return, and the jobs it brings are run,
        so no leased job is dropped on the floor."""
        self._draining = True
        if not self._lease_in_flight:
            self._lease_task.cancel()
        with suppress(asyncio.CancelledError):
            await self._lease_task
        log.info("draining", extra={"jobs": self.runner.active_jobs})
        while self.runner.active_jobs or self._outbox:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._channel.close()

    # --- leasing -------------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        backoff = Backoff()
        while not self._draining:
            slots = self.runner.free_slots()
            if slots == 0:
                self.runner.slot_freed.clear()
                await self.runner.slot_freed.wait()
                continue
            request = scheduler_pb2.LeaseRequest(
                worker_id=self.worker_id,
                llms=self.llms,
                max_jobs=slots,
                wait_ms=self.lease_wait_ms,
            )
            self._lease_in_flight = True
            try:
                response = await self._stub.Lease(
                    request, timeout=self.lease_wait_ms / 1000 + _RPC_SLACK_S
                )
            except grpc.aio.AioRpcError as error:
                backoff.log_failure("lease failed; retrying", error)
                response = None
            finally:
                self._lease_in_flight = False
            if response is None:
                await backoff.sleep()
                continue
            backoff.reset()
            if response.lease_ttl_s > 0 and response.lease_ttl_s != self.lease_ttl_s:
                self.lease_ttl_s = response.lease_ttl_s
                self._lease_ttl_changed.set()
            for job in response.jobs:
                self._start(job)

    def _start(self, job: scheduler_pb2.LeasedJob) -> None:
        lease = _Lease(job.job_id, job.lease_id)
        earlier = self._current.get(job.job_id)
        if earlier is not None:
            # Our old lease lapsed while the job still ran here, and the scheduler handed it
            # out again: restart from its resume point, which is where it stopped accepting
            # our tokens, so the answer stays gapless.
            self._silence(earlier, "leased again")
        self._held[lease.key] = lease
        self._current[job.job_id] = lease.key
        log.debug("leased", extra={"job_id": job.job_id, "attempt": job.attempt})
        try:
            sampling = sampling_from_proto(job.sampling, self.default_max_new_tokens)
        except InvalidArgument as error:
            failed = Outcome(FinishReason.ERROR, len(job.resume_token_ids), 0, 0.0, 0.0, str(error))
            self._record(JobUpdate(lease.key, outcome=failed))
            self._outbox_ready.set()
            return
        conversation = tuple((turn.role, turn.content) for turn in job.messages)
        self.runner.submit(
            lease.key, job.prompt, sampling, tuple(job.resume_token_ids), conversation
        )

    def _silence(self, key: str, why: str) -> None:
        """Stop a run now and report nothing more about it."""
        lease = self._held.pop(key)
        if self._current.get(lease.job_id) == key:
            del self._current[lease.job_id]
        log.info("stopping job", extra={"job_id": lease.job_id, "why": why})
        self._outbox.pop(key, None)
        self._silenced.add(key)
        self.runner.cancel(key)

    # --- progress ------------------------------------------------------------------------

    def _entry(self, lease: _Lease) -> scheduler_pb2.JobProgress:
        entry = self._outbox.get(lease.key)
        if entry is None:
            entry = scheduler_pb2.JobProgress(job_id=lease.job_id, lease_id=lease.lease_id)
            self._outbox[lease.key] = entry
        return entry

    def _record(self, update: JobUpdate) -> None:
        """Put one engine update into the outbox (or drop it for a stopped run)."""
        key = update.job_id
        if key in self._silenced:
            if update.outcome is not None:
                self._silenced.discard(key)
            return
        lease = self._held.get(key)
        if lease is None:
            log.warning("update for a job not held", extra={"key": key})
            return
        entry = self._entry(lease)
        entry.tokens.extend(
            common_pb2.Token(index=t.index, text=t.text, token_id=t.token_id) for t in update.tokens
        )
        if update.outcome is not None:
            entry.outcome.CopyFrom(outcome_to_proto(update.outcome))
            del self._held[key]
            if self._current.get(lease.job_id) == key:
                del self._current[lease.job_id]
            log.debug(
                "finished",
                extra={
                    "job_id": lease.job_id,
                    "reason": update.outcome.finish_reason.value,
                    "tokens": update.outcome.generated_tokens,
                },
            )

    async def _pump_loop(self) -> None:
        while True:
            for update in await self.runner.updates.get():
                self._record(update)
            self._outbox_ready.set()

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                # A new TTL (known from the first Lease answer) restarts the wait.
                await asyncio.wait_for(self._lease_ttl_changed.wait(), self.lease_ttl_s / 3)
                self._lease_ttl_changed.clear()
                continue
            except TimeoutError:
                pass
            for lease in self._held.values():
                self._entry(lease)
            if self._held:
                self._outbox_ready.set()

    def _take_report(self) -> scheduler_pb2.WorkerReport:
        report = scheduler_pb2.WorkerReport(
            worker_id=self.worker_id, progress=list(self._outbox.values())
        )
        self._outbox = {}
        return report

    def _put_back(self, report: scheduler_pb2.WorkerReport) -> None:
        """A report that may not have arrived goes back in front of newer progress."""
        newer, self._outbox = self._outbox, {}
        for entry in report.progress:
            key = _Lease(entry.job_id, entry.lease_id).key
            if key not in self._silenced:
                self._outbox[key] = entry
        for key, entry in newer.items():
            if key in self._outbox:
                self._outbox[key].tokens.extend(entry.tokens)
                if entry.HasField("outcome"):
                    self._outbox[key].outcome.CopyFrom(entry.outcome)
            else:
                self._outbox[key] = entry

    async def _report_loop(self) -> None:
        backoff = Backoff()
        while True:
            # The stream is opened when there is something to say, so an idle worker does
            # not hammer a scheduler that is down.
            while not self._outbox:
                await self._outbox_ready.wait()
                self._outbox_ready.clear()
            call = self._stub.Report()
            reader = asyncio.create_task(self._read_directives(call))
            try:
                while True:
                    if reader.done():
                        reader.result()  # raises why the stream ended
                        raise ConnectionError("the scheduler closed the report stream")
                    if self._outbox:
                        report = self._take_report()
                        try:
                            await call.write(report)
                        except BaseException:
                            self._put_back(report)
                            raise
                        backoff.reset()
                    await self._outbox_ready.wait()
                    self._outbox_ready.clear()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, ConnectionError) as error:
                backoff.log_failure("report stream broken; reconnecting", error)
                await backoff.sleep()
            finally:
                reader.cancel()
                call.cancel()
                # Collects the reader's end (its error was already handled above).
                await asyncio.gather(reader, return_exceptions=True)

    async def _read_directives(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for directive in call:
                for stop in directive.stop:
                    self._stop(stop.job_id, stop.reason)
        finally:
            # Wake the writer so it notices the stream is gone.
            self._outbox_ready.set()

    def _stop(self, job_id: str, reason: int) -> None:
        key = self._current.get(job_id)
        if key is not None:  # else it already finished here
            self._silence(key, scheduler_pb2.StopJob.Reason.Name(reason))
