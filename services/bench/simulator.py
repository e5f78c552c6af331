"""A discrete-event simulator of SSJF: the scheduler's own queue and policies, simulated workers.

The queue is the scheduler's ``ReferenceQueue`` (the in-memory twin of its Redis claim
script) with the scheduler's own policy objects, so ordering, aging and the starvation guard
are exactly the real ones; only time is simulated. Workers follow a ``LatencyModel`` fitted
to the real worker, and batch as the real one does:

- ``none``: one job at a time.
- ``dynamic``: a batch of up to ``max_batch_size`` jobs is taken when the worker is idle and
  runs until its last job ends; no job joins a running batch (request-level batching).
- ``continuous``: free slots are refilled at every decoding step (iteration-level batching).

Time advances event to event, and between events a worker's batch advances many decoding
steps at once, so a million jobs simulate in about a minute.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.bench.latency import LatencyModel
from services.scheduler.policies import (
    EPOCH_S,
    MAX_AGING_RATE,
    POLICIES,
    JobFeatures,
    ReferenceQueue,
    make_policy,
)

BATCHING_MODES = ("none", "dynamic", "continuous")
# Policies only the simulator serves (no static score: see HrrnQueue).
SIMULATOR_ONLY_POLICIES = ("hrrn",)
# A grid entry is a policy name, optionally with its own starvation guard and aging rate:
# ``ssjf:noguard`` (max_wait_s 0), ``ssjf:guard=10`` (10 s), ``ssjf:aging=5`` (5 tokens of
# credit per second waited), so one grid holds SSJF with and without either.
NO_GUARD = "noguard"
NO_GUARD_SUFFIX = f":{NO_GUARD}"
GUARD = "guard"
AGING = "aging"
# On the real stack only, ``ssjf:sync`` runs the scheduler with ``--prediction-mode sync``
# (every job waits for its prediction before it is queued), so one grid compares the
# default asynchronous submit path against it in the same interleaved rounds.
SYNC = "sync"


@dataclass(frozen=True)
class GridEntry:
    """One parsed grid entry; ``None``: the grid's own --max-wait-s / --aging-rate."""

    policy: str
    guard_s: float | None = None
    aging_rate: float | None = None
    sync: bool = False


def _number(spec: str, field: str, text: str, example: str, upper: float = math.inf) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{spec!r}: the {field} must be a number, e.g. {example}") from None
    if not math.isfinite(value) or not 0 <= value <= upper:
        raise ValueError(f"{spec!r}: the {field} must be within [0, {upper:g}]")
    return value


def parse_entry(spec: str) -> GridEntry:
    """``ssjf:guard=10:aging=2:sync`` -> GridEntry("ssjf", 10.0, 2.0, True); ``ssjf`` ->
    GridEntry("ssjf"). Each option at most once, in any order."""
    policy, *options = spec.split(":")
    guard: float | None = None
    aging: float | None = None
    sync = False
    seen: set[str] = set()
    for option in options:
        key, sep, value = option.partition("=")
        # noguard and guard=S set the same thing.
        setting = GUARD if key == NO_GUARD else key
        if setting in seen:
            raise ValueError(f"{spec!r}: the {setting} is given twice")
        seen.add(setting)
        if option == NO_GUARD:
            guard = 0.0
        elif option == SYNC:
            sync = True
        elif key == GUARD and sep:
            guard = _number(spec, "guard", value, "ssjf:guard=10 (seconds)")
        elif key == AGING and sep:
            aging = _number(
                spec, "aging rate", value, "ssjf:aging=5 (tokens per second)", MAX_AGING_RATE
            )
        else:
            raise ValueError(
                f"{spec!r}: unknown option {option!r} (noguard, guard=SECONDS, aging=RATE, sync)"
            )
    return GridEntry(policy, guard, aging, sync)


def synchronous_prediction(spec: str) -> bool:
    """Whether a grid entry makes its jobs wait for their prediction (``...:sync``)."""
    return parse_entry(spec).sync


def asynchronous_twin(spec: str) -> str:
    """The grid entry ``spec`` would be without ``:sync`` (itself if it has none)."""
    return ":".join(part for part in spec.split(":") if part != SYNC)


def base_policy(spec: str) -> str:
    """The policy a grid entry runs: ``ssjf:noguard`` runs ``ssjf``."""
    return parse_entry(spec).policy


def guard_for(spec: str, max_wait_s: float) -> float:
    """The max-wait guard a grid entry runs with: its own, else the grid's."""
    guard = parse_entry(spec).guard_s
    return max_wait_s if guard is None else guard


def aging_for(spec: str, aging_rate: float) -> float:
    """The aging rate a grid entry runs with: its own, else the grid's."""
    aging = parse_entry(spec).aging_rate
    return aging_rate if aging is None else aging


def known_policy(spec: str, simulated: bool) -> bool:
    """Whether a grid entry names a policy (the scheduler's registry, and for the simulator
    its own extra ones) with well-formed options."""
    try:
        name = base_policy(spec)
    except ValueError:
        return False
    if synchronous_prediction(spec):
        # The simulator has no submit path to make synchronous.
        return not simulated and name in POLICIES
    return name in POLICIES or (simulated and name in SIMULATOR_ONLY_POLICIES)


@dataclass
class SimJob:
    """One job as the simulator sees it. Times are simulated seconds."""

    index: int
    arrival_s: float
    tokens: int
    # Score the policy orders by: the predictor's answer (ssjf) or the true length (oracle).
    predicted_tokens: float
    # The prompt's characters (sjf-prompt's key).
    prompt_chars: int = 0
    # Which of a mixed stream's LLMs the job is for (one queue each, as the scheduler has).
    llm: str = ""
    # Index of the worker that served it (-1: not yet served).
    worker: int = -1
    start_s: float = math.nan
    first_token_s: float = math.nan
    finish_s: float = math.nan
    remaining: int = 0

    @property
    def jct_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s


@dataclass
class _Worker:
    index: int
    active: list[SimJob]
    idle: bool = True
    # Seconds the worker spent prefilling or decoding (its realized utilization's numerator).
    busy_s: float = 0.0
    # A boundary event for this worker is pending (it must not be woken twice).
    scheduled: bool = False


class Simulation:
    """Runs one workload through ``workers`` simulated workers and a real policy queue."""

    def __init__(
        self,
        latency: LatencyModel,
        policy: str,
        batching: str,
        max_batch_size: int = 8,
        workers: int = 1,
        aging_rate: float = 0.0,
        max_wait_s: float = 0.0,
        prediction_cpu_s: float = 0.0,
        demote_after: float = 0.0,
        steps_per_predicted_token: float = 1.0,
    ) -> None:
        if batching not in BATCHING_MODES:
            raise ValueError(f"unknown batching {batching!r}; use one of {BATCHING_MODES}")
        if workers < 1 or max_batch_size < 1:
            raise ValueError("workers and max_batch_size must be at least 1")
        if not math.isfinite(prediction_cpu_s) or prediction_cpu_s < 0:
            raise ValueError("prediction_cpu_s must be seconds >= 0")
        if demote_after and (not math.isfinite(demote_after) or demote_after < 1):
            raise ValueError("demote_after must be 0 (off) or a factor >= 1")
        if demote_after and batching == "dynamic":
            raise ValueError("a dynamic batch runs to its end: no job can give up its slot")
        # A running job that has decoded more than ``demote_after`` times its predicted length
        # (predicted tokens x ``steps_per_predicted_token``, the workload's length scale) while
        # others wait gives up its slot: it re-enters the queue scored as ``demote_after``
        # times what it has decoded, keeps its progress, and pays a prefill again when it
        # resumes (its context recomputed). A prediction far too short, such as a loop no
        # prompt shows, then costs the others one overrun instead of the whole answer.
        self.demote_after = demote_after
        self.steps_per_predicted_token = steps_per_predicted_token
        self.demoted = 0
        self.latency = latency
        # Where the predictor shares the workers' CPU (one host), each arrival's prediction
        # takes this many seconds from them: owed as a debt, paid by the next worker to run
        # (before its next prefill or steps), so the prediction delays whatever runs then.
        self.prediction_cpu_s = prediction_cpu_s
        self._cpu_debt_s = 0.0
        self.batching = batching
        self.slots = 1 if batching == "none" else max_batch_size
        self.queue = SchedulerQueue(policy, aging_rate, max_wait_s, latency)
        self.workers = [_Worker(i, []) for i in range(workers)]
        self._events: list[tuple[float, int, int, int]] = []
        self._sequence = 0

    # Event kinds, in the order simultaneous events are handled: arrivals first, so a job
    # arriving exactly at a step boundary can join that step.
    _ARRIVAL, _BOUNDARY = 0, 1

    @property
    def busy_s(self) -> float:
        """Worker-seconds spent serving, summed over the workers."""
        return sum(worker.busy_s for worker in self.workers)

    def _push(self, time_s: float, kind: int, target: int) -> None:
        self._sequence += 1
        heapq.heappush(self._events, (time_s, kind, self._sequence, target))

    def run(self, jobs: Sequence[SimJob]) -> list[SimJob]:
        """Simulate until every job is done; returns the jobs with their times filled in."""
        for job in jobs:
            job.remaining = job.tokens
            self._push(job.arrival_s, self._ARRIVAL, job.index)
            self._schedule_extra(job)
        self._by_index = {job.index: job for job in jobs}
        self._next_arrival = _ArrivalClock(sorted(job.arrival_s for job in jobs))
        while self._events:
            now, kind, _, target = heapq.heappop(self._events)
            if kind == self._ARRIVAL:
                self._next_arrival.pop()
                self._cpu_debt_s += self.prediction_cpu_s
                self.queue.push(self._by_index[target], now)
                for worker in self.workers:
                    if worker.idle and not worker.scheduled:
                        worker.scheduled = True
                        self._push(now, self._BOUNDARY, worker.index)
            elif kind == self._BOUNDARY:
                self._boundary(self.workers[target], now)
            else:
                self._handle_extra(kind, target, now)
        return list(jobs)

    def _schedule_extra(self, job: SimJob) -> None:
        """Subclasses add events of their own kinds (numbered after _BOUNDARY) per job."""

    def _handle_extra(self, kind: int, target: int, now: float) -> None:
        raise ValueError(f"unknown simulator event kind {kind}")

    def _free_slots(self, worker: _Worker) -> int:
        if self.batching == "continuous" or not worker.active:
            return self.slots - len(worker.active)
        return 0

    def _boundary(self, worker: _Worker, now: float) -> None:
        """The worker finished a step (or was idle): admit jobs, then run to the next event."""
        worker.scheduled = False
        if self.demote_after and len(self.queue):
            self._demote_overrunning(worker, now)
        free = self._free_slots(worker)
        admitted = self.queue.claim(free, now) if free > 0 else []
        if not worker.active and not admitted:
            worker.idle = True
            return
        worker.idle = False
        # The predictions' CPU is not the worker's busy time: it is kept out of busy_s.
        stolen, self._cpu_debt_s = self._cpu_debt_s, 0.0
        clock = now + stolen
        if admitted:
            # Newcomers are prefilled together, which gives each its first token; the running
            # batch waits meanwhile.
            clock += self.latency.prefill_s(len(admitted))
        for job in admitted:
            job.worker = worker.index
            worker.active.append(job)
            if math.isnan(job.start_s):  # not a demoted job resuming: this is its first token
                job.start_s = now
                job.first_token_s = clock
                job.remaining -= 1
        for job in [job for job in worker.active if job.remaining == 0]:
            job.finish_s = clock
            worker.active.remove(job)
        if not worker.active:
            worker.busy_s += clock - now - stolen
            worker.scheduled = True
            self._push(clock, self._BOUNDARY, worker.index)
            return
        step = self.latency.step_s(len(worker.active))
        steps = min(job.remaining for job in worker.active)
        if self._free_slots(worker) > 0:
            # A job arriving meanwhile may join at the first step boundary after it arrives.
            steps = min(steps, self._steps_to_next_arrival(clock, step))
        if self.demote_after:
            steps = min(steps, self._steps_to_possible_demotion(worker, clock, step))
        clock += steps * step
        worker.busy_s += clock - now - stolen
        for job in worker.active:
            job.remaining -= steps
        for job in [job for job in worker.active if job.remaining == 0]:
            job.finish_s = clock
            worker.active.remove(job)
        worker.scheduled = True
        self._push(clock, self._BOUNDARY, worker.index)

    def _steps_to_next_arrival(self, clock: float, step: float) -> int | float:
        arrival = self._next_arrival.peek()
        return math.inf if arrival is None else max(1, math.ceil((arrival - clock) / step))

    def _overrun_steps(self, job: SimJob) -> float:
        return self.demote_after * job.predicted_tokens * self.steps_per_predicted_token

    def _demote_overrunning(self, worker: _Worker, now: float) -> None:
        for job in [job for job in worker.active if self._decoded(job) > self._overrun_steps(job)]:
            worker.active.remove(job)
            job.predicted_tokens = (
                self.demote_after * self._decoded(job) / self.steps_per_predicted_token
            )
            self.demoted += 1
            self.queue.push(job, now)

    def _steps_to_possible_demotion(self, worker: _Worker, clock: float, step: float) -> float:
        """Steps until a boundary where a running job could be demoted: the step at which the
        first one passes its overrun point, or, for one already past it (nobody was waiting
        then), the next arrival."""
        steps: float = math.inf
        for job in worker.active:
            left = math.floor(self._overrun_steps(job)) + 1 - self._decoded(job)
            steps = min(steps, left if left > 0 else self._steps_to_next_arrival(clock, step))
        return steps

    @staticmethod
    def _decoded(job: SimJob) -> int:
        return job.tokens - job.remaining


class _ArrivalClock:
    """The arrival times not yet delivered, in order: when the next job will show up."""

    def __init__(self, times: list[float]) -> None:
        self._times = times
        self._next = 0

    def peek(self) -> float | None:
        return self._times[self._next] if self._next < len(self._times) else None

    def pop(self) -> None:
        self._next += 1


class SchedulerQueue:
    """The scheduler's ``ReferenceQueue`` and policy, in simulated time.

    Simulated second ``t`` is the Unix time ``EPOCH_S + t`` (the policies count arrivals
    from that epoch); job ids are zero-padded arrival indexes, time-ordered as the
    scheduler's own ids are, so equal scores go first-come first-served.
    """

    def __init__(
        self,
        policy: str,
        aging_rate: float = 0.0,
        max_wait_s: float = 0.0,
        latency: LatencyModel | None = None,
    ) -> None:
        self.queue: ReferenceQueue | HrrnQueue
        if policy == "hrrn":
            if latency is None:
                raise ValueError("hrrn needs the latency model (predicted service seconds)")
            self.queue = HrrnQueue(latency, max_wait_s)
        else:
            self.queue = ReferenceQueue(make_policy(policy, aging_rate=aging_rate), max_wait_s)
        self._jobs: dict[str, SimJob] = {}

    def push(self, job: SimJob, now: float) -> None:
        job_id = f"{job.index:012d}"
        features = JobFeatures(
            arrival_s=EPOCH_S + now,
            predicted_tokens=job.predicted_tokens,
            oracle_tokens=job.tokens,
            prompt_chars=job.prompt_chars,
        )
        self.queue.push(job_id, features)
        self._jobs[job_id] = job

    def claim(self, max_jobs: int, now: float) -> list[SimJob]:
        """Up to ``max_jobs`` jobs in the order the scheduler's claim would hand them out."""
        claimed = []
        while len(claimed) < max_jobs:
            job_id = self.queue.pop(EPOCH_S + now)
            if job_id is None:
                break
            claimed.append(self._jobs.pop(job_id))
        return claimed

    def __len__(self) -> int:
        return len(self.queue)


class HrrnQueue:
    """Highest response ratio next, exactly: at each claim, the job with the largest
    ``(wait + predicted service) / predicted service`` goes first (ties: earlier job id).

    The predicted service is the seconds a job of the predicted length takes alone on the
    worker (``LatencyModel.solo_jct_s`` without the serving overhead), so wait and service are
    in the same unit. SGLang ships this order; it starts as SJF (everyone's ratio is 1) and
    lets a long job's ratio overtake as it waits, which bounds starvation.

    Why only in the simulator: the ratio of every queued job changes with time at its own
    speed (1 / service), so the order is not a static score a Redis sorted set can hold. A
    claim script would have to re-evaluate every queued job at every claim (O(queue) Lua
    work inside Redis's single thread), or approximate with a bounded window (the K
    shortest-predicted plus the K oldest jobs), which can miss the true maximum. The
    simulator evaluates it exactly, to see whether it earns that cost; the max-wait guard
    applies first, as in the scheduler's queue.
    """

    def __init__(self, latency: LatencyModel, max_wait_s: float = 0.0) -> None:
        self.latency = latency
        self.max_wait_s = max_wait_s
        self._ids: list[str] = []
        self._arrival = np.empty(0)
        self._service = np.empty(0)

    def __len__(self) -> int:
        return len(self._ids)

    def push(self, job_id: str, job: JobFeatures) -> float:
        service = self.latency.prefill_s(1) + max(job.predicted_tokens - 1, 0.0) * (
            self.latency.step_s(1)
        )
        self._ids.append(job_id)
        self._arrival = np.append(self._arrival, job.arrival_s)
        self._service = np.append(self._service, max(service, 1e-9))
        return service

    def pop(self, now: float) -> str | None:
        if not self._ids:
            return None
        oldest = int(np.argmin(self._arrival))
        if self.max_wait_s > 0 and now - self._arrival[oldest] > self.max_wait_s:
            chosen = oldest
        else:
            ratio = (now - self._arrival + self._service) / self._service
            # Job ids are time-ordered and pushed in order, so the first maximum is the
            # earliest job among equals.
            chosen = int(np.argmax(ratio))
        job_id = self._ids.pop(chosen)
        self._arrival = np.delete(self._arrival, chosen)
        self._service = np.delete(self._service, chosen)
        return job_id
