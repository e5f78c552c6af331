"""The worker's side of the scheduler's WorkerGateway: lease jobs, stream their progress.

Four asyncio tasks share one channel:
- lease: whenever the engine has free slots, long-poll ``Lease`` for that many jobs;
- pump: turn the engine's per-step updates into ``JobProgress`` entries in an outbox;
- report: send the outbox as ``WorkerReport``s on one ``Report`` stream, and obey the
  directive answering each (stop cancelled jobs and jobs whose lease was lost);
- heartbeat: every third of the lease TTL, put an empty entry (a heartbeat) in the outbox
  for each job still held, so a long prefill never lets a lease expire.

Each lease is a small state machine (``LeaseState``: RUNNING, then STOPPED or ended), and
progress goes through an ``Outbox`` whose reports stay in flight until a directive
acknowledges them by sequence: a report written to a stream that then broke (a Redis blip
on the scheduler, a replica restarting) is sent again, so the scheduler never sees a gap.
A scheduler that cannot be reached is retried with capped exponential backoff; progress
produced meanwhile stays in the outbox and is sent when the stream is back (token indexes
make a resend harmless). The client never raises out of its tasks.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Callable
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
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
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


class Phase(enum.Enum):
    """Where one lease is, on this worker.

    RUNNING --(engine outcome)--> gone: its last progress waits in the outbox until a
    directive acknowledges the report that carried it.
    RUNNING --(stop directive, or the job leased again)--> STOPPED --(engine outcome)--> gone:
    nothing more is reported for it.
    """

    RUNNING = "running"
    STOPPED = "stopped"


@dataclass
class LeaseState:
    """One lease of one job. The engine knows the run by ``key``, unique per lease, so a job
    leased again (after its old lease lapsed) never mixes with its earlier run here."""

    job_id: str
    lease_id: str
    phase: Phase = Phase.RUNNING

    @property
    def key(self) -> str:
        return lease_key(self.job_id, self.lease_id)


def lease_key(job_id: str, lease_id: str) -> str:
    return f"{job_id}/{lease_id}"


class Outbox:
    """Progress to report, kept until the scheduler acknowledges it.

    ``pending`` holds progress not yet sent, one entry per lease, in first-touched order.
    ``take`` moves it into a numbered report that stays ``in_flight`` until a directive
    acknowledges its sequence. When a stream breaks, every report still in flight goes
    back in front of newer progress (``requeue``) and is sent again: the scheduler may or may
    not have applied it, and token indexes make a second application harmless. So no token
    is forgotten between being written to a stream and being applied, which used to leave a
    gap that failed the job.
    """

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.pending: dict[str, scheduler_pb2.JobProgress] = {}
        self.in_flight: dict[int, scheduler_pb2.WorkerReport] = {}
        self._sequence = 0

    def entry(self, job_id: str, lease_id: str) -> scheduler_pb2.JobProgress:
        key = lease_key(job_id, lease_id)
        entry = self.pending.get(key)
        if entry is None:
            entry = scheduler_pb2.JobProgress(job_id=job_id, lease_id=lease_id)
            self.pending[key] = entry
        return entry

    def drop(self, key: str) -> None:
        self.pending.pop(key, None)

    @property
    def empty(self) -> bool:
        return not self.pending and not self.in_flight

    def take(self) -> scheduler_pb2.WorkerReport:
        self._sequence += 1
        report = scheduler_pb2.WorkerReport(
            worker_id=self.worker_id, progress=list(self.pending.values()), sequence=self._sequence
        )
        self.pending = {}
        self.in_flight[report.sequence] = report
        return report

    def acknowledge(self, sequence: int) -> None:
        """Reports up to ``sequence`` were applied (directives answer reports in order; an
        older scheduler sends no sequence, and its directive answers the oldest report)."""
        if sequence == 0:
            if self.in_flight:
                del self.in_flight[min(self.in_flight)]
            return
        for number in [n for n in self.in_flight if n <= sequence]:
            del self.in_flight[number]

    def requeue(self, stopped: Callable[[str], bool]) -> None:
        """The stream broke: reports in flight go back, oldest first, before newer progress
        (entries of stopped leases are dropped)."""
        newer, self.pending = self.pending, {}
        for number in sorted(self.in_flight):
            for entry in self.in_flight[number].progress:
                self._merge(entry, stopped)
        self.in_flight = {}
        for entry in newer.values():
            self._merge(entry, stopped)

    def _merge(self, entry: scheduler_pb2.JobProgress, stopped: Callable[[str], bool]) -> None:
        key = lease_key(entry.job_id, entry.lease_id)
        if stopped(key):
            return
        mine = self.pending.get(key)
        if mine is None:
            self.pending[key] = entry
            return
        mine.tokens.extend(entry.tokens)
        if entry.HasField("outcome"):
            mine.outcome.CopyFrom(entry.outcome)


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
        # TLS and the worker's credential (token or client certificate), from flags or env;
        # several scheduler addresses are used round-robin (channel_target).
        target, options = channel_target(scheduler_address)
        self._channel = dial_aio(target, security, options)
        self._stub = scheduler_pb2_grpc.WorkerGatewayStub(self._channel)
        # Every lease held here by key (one state machine each), and each job's running key.
        self._leases: dict[str, LeaseState] = {}
        self._running: dict[str, str] = {}
        self._outbox = Outbox(worker_id)
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
        """Stop leasing, then wait until every held job has finished and its last report has
        been acknowledged.

        A Lease call already in flight is allowed to return, and the jobs it brings are run,
        so no leased job is dropped on the floor."""
        self._draining = True
        if not self._lease_in_flight:
            self._lease_task.cancel()
        with suppress(asyncio.CancelledError):
            await self._lease_task
        log.info("draining", extra={"jobs": self.runner.active_jobs})
        while self.runner.active_jobs or not self._outbox.empty:
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
        lease = LeaseState(job.job_id, job.lease_id)
        earlier = self._running.get(job.job_id)
        if earlier is not None:
            # Our old lease lapsed while the job still ran here, and the scheduler handed it
            # out again: restart from its resume point, which is where it stopped accepting
            # our tokens, so the answer stays gapless.
            self._stop_lease(earlier, "leased again")
        self._leases[lease.key] = lease
        self._running[job.job_id] = lease.key
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

    def _stop_lease(self, key: str, why: str) -> None:
        """RUNNING -> STOPPED: stop the run now and report nothing more about it."""
        lease = self._leases.get(key)
        if lease is None or lease.phase is not Phase.RUNNING:
            return  # already ended or stopped here
        lease.phase = Phase.STOPPED
        if self._running.get(lease.job_id) == key:
            del self._running[lease.job_id]
        log.info("stopping job", extra={"job_id": lease.job_id, "why": why})
        self._outbox.drop(key)
        self.runner.cancel(key)

    def _is_stopped(self, key: str) -> bool:
        lease = self._leases.get(key)
        return lease is not None and lease.phase is Phase.STOPPED

    # --- progress ------------------------------------------------------------------------

    def _record(self, update: JobUpdate) -> None:
        """Put one engine update into the outbox (or drop it for a stopped run)."""
        key = update.job_id
        lease = self._leases.get(key)
        if lease is None:
            log.warning("update for a job not held", extra={"key": key})
            return
        if update.outcome is not None:
            del self._leases[key]  # the run is over here, whatever its phase
            if self._running.get(lease.job_id) == key:
                del self._running[lease.job_id]
        if lease.phase is Phase.STOPPED:
            return
        entry = self._outbox.entry(lease.job_id, lease.lease_id)
        entry.tokens.extend(
            common_pb2.Token(index=t.index, text=t.text, token_id=t.token_id) for t in update.tokens
        )
        if update.outcome is not None:
            entry.outcome.CopyFrom(outcome_to_proto(update.outcome))
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
            for lease in self._leases.values():
                if lease.phase is Phase.RUNNING:
                    self._outbox.entry(lease.job_id, lease.lease_id)
            if self._leases:
                self._outbox_ready.set()

    async def _report_loop(self) -> None:
        backoff = Backoff()
        while True:
            # The stream is opened when there is something to say, so an idle worker does
            # not hammer a scheduler that is down.
            while self._outbox.empty:
                await self._outbox_ready.wait()
                self._outbox_ready.clear()
            # Whatever the last stream did not get acknowledged goes first on this one.
            self._outbox.requeue(self._is_stopped)
            call = self._stub.Report()
            reader = asyncio.create_task(self._read_directives(call))
            try:
                while True:
                    if reader.done():
                        reader.result()  # raises why the stream ended
                        raise ConnectionError("the scheduler closed the report stream")
                    if self._outbox.pending:
                        await call.write(self._outbox.take())
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
                self._outbox.acknowledge(directive.ack_sequence)
                for stop in directive.stop:
                    self._stop(stop.job_id, stop.lease_id, stop.reason)
        finally:
            # Wake the writer so it notices the stream is gone.
            self._outbox_ready.set()

    def _stop(self, job_id: str, lease_id: str, reason: int) -> None:
        """A stop names the lease it concerns: a stop meant for a job's old lease never
        silences its newer lease here. (No lease id: an older scheduler; the running one.)"""
        key = lease_key(job_id, lease_id) if lease_id else self._running.get(job_id)
        if key is not None:
            self._stop_lease(key, scheduler_pb2.StopJob.Reason.Name(reason))


def channel_target(addresses: str) -> tuple[str, list[tuple[str, object]]]:
    """A gRPC target and options for one scheduler address or several, comma-separated
    (``10.0.0.1:50051,10.0.0.2:50051``): calls are spread round-robin over the replicas
    that are up, so a worker rides through one replica's restart."""
    if "," not in addresses:
        return addresses, []
    return "ipv4:" + addresses, [("grpc.lb_policy_name", "round_robin")]
