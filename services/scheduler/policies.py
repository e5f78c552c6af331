"""Scheduling policies: how a job's features become its place in the queue.

A policy maps a job's (arrival time, predicted tokens, oracle tokens, priority) to a STATIC
score; the queue serves the lowest score first, ties broken by job id (job ids are
time-ordered, so ties go first-come first-served), exactly as a Redis sorted set orders its
members. Adding a policy is one subclass with ``@register`` (the registry below); nothing
else changes.

Score = priority * PRIORITY_STRIDE + key, with the policy's key:

* ``fcfs``:       key = arrival - EPOCH
* ``ssjf``:       key = predicted + aging_rate * (arrival - EPOCH)
* ``sjf-oracle``: key = oracle + aging_rate * (arrival - EPOCH)
* ``sjf-prompt``: key = prompt characters + aging_rate * (arrival - EPOCH): the peers' order
  (vLLM's ``sjf`` queue and SGLang's prefill-first policies key on prompt length), a
  comparison policy showing what a learned output-length predictor buys over it

HRRN (highest response ratio next, SGLang's alternative) is not here: its ratio
``(wait + predicted) / predicted`` grows at a different speed for every job, so no static
score orders it and a sorted set cannot serve it; the simulator evaluates it exactly
(``services/bench/simulator.py``, ``HrrnQueue``).

Aging as a static score: serving the job with the smallest
``predicted - aging_rate * (now - arrival)`` (its length minus a credit that grows while it
waits) picks the same job at any ``now`` as the smallest ``predicted + aging_rate * arrival``,
since ``aging_rate * now`` is common to every job and cancels. So the queue never re-scores
anything: aging costs nothing at claim time. ``aging_rate`` is in predicted tokens per second
of waiting: with rate 1, a 500-token job that has waited 400 s goes before a fresh 120-token
job. The max-wait guard (a job that has waited longer than ``max_wait_s`` goes first, oldest
first) is part of the queue, not of the score: see ``ReferenceQueue`` and ``lua/claim.lua``.

Precision: scores are IEEE doubles (as Redis stores them). Arrival is counted from EPOCH
(2024-01-01) rather than 1970, and PRIORITY_STRIDE (1e11) is far above any key (aging_rate <=
MAX_AGING_RATE keeps ``aging_rate * (arrival - EPOCH)`` below 1e10 for 30 years), so a
priority class always dominates and within class 0 keys keep sub-microsecond resolution.
"""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from services.common.errors import InvalidArgument

EPOCH_S = 1_704_067_200.0  # 2024-01-01T00:00:00Z
PRIORITY_STRIDE = 1e11
PRIORITY_RANGE = (-100, 100)
MAX_AGING_RATE = 10.0


@dataclass(frozen=True)
class JobFeatures:
    """What a policy may know about a job when it is queued."""

    arrival_s: float  # Unix time of submission
    predicted_tokens: float = 0.0  # the proxy model's prediction (or the fallback value)
    oracle_tokens: int = 0  # true output length, sjf-oracle only
    priority: int = 0  # class: lower is served first, whatever the length
    # Characters of the prompt (the scheduler has no tokenizer; characters order prompts as
    # their token counts do, up to the tokenizer's noise). sjf-prompt only.
    prompt_chars: int = 0


class Policy(ABC):
    """Maps a job to its static queue score; lower is served first."""

    name: ClassVar[str]
    # Whether the scheduler must ask the predictor before queueing a job.
    uses_prediction: ClassVar[bool] = False
    # Whether jobs must carry their true length (oracle_output_tokens).
    uses_oracle: ClassVar[bool] = False

    def __init__(self, aging_rate: float = 0.0) -> None:
        if not 0.0 <= aging_rate <= MAX_AGING_RATE:
            raise InvalidArgument(
                f"aging rate must be within [0, {MAX_AGING_RATE}] tokens per second, "
                f"got {aging_rate}"
            )
        self.aging_rate = aging_rate

    @abstractmethod
    def key(self, job: JobFeatures) -> float:
        """Order within a priority class."""

    def score(self, job: JobFeatures) -> float:
        return job.priority * PRIORITY_STRIDE + self.key(job)

    def _aged(self, length: float, job: JobFeatures) -> float:
        return length + self.aging_rate * (job.arrival_s - EPOCH_S)


POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    POLICIES[cls.name] = cls
    return cls


@register
class FcfsPolicy(Policy):
    """First come, first served: the order of arrival (aging would change nothing)."""

    name = "fcfs"

    def key(self, job: JobFeatures) -> float:
        return job.arrival_s - EPOCH_S


@register
class SsjfPolicy(Policy):
    """Speculative shortest job first: the proxy model's predicted length, aged."""

    name = "ssjf"
    uses_prediction = True

    def key(self, job: JobFeatures) -> float:
        return self._aged(job.predicted_tokens, job)


@register
class OracleSjfPolicy(Policy):
    """Shortest job first on the true length given with the request (experiments only)."""

    name = "sjf-oracle"
    uses_oracle = True

    def key(self, job: JobFeatures) -> float:
        return self._aged(float(job.oracle_tokens), job)


@register
class PromptSjfPolicy(Policy):
    """Shortest prompt first: the peers' SJF (vLLM, SGLang), for comparison. On AlpacaEval
    prompt length carries almost no signal about the answer's length."""

    name = "sjf-prompt"

    def key(self, job: JobFeatures) -> float:
        return self._aged(float(job.prompt_chars), job)


def make_policy(name: str, aging_rate: float = 0.0) -> Policy:
    """The registered policy called ``name``."""
    try:
        return POLICIES[name](aging_rate=aging_rate)
    except KeyError:
        raise InvalidArgument(
            f"unknown policy {name!r}; choose one of {', '.join(sorted(POLICIES))}"
        ) from None


class ReferenceQueue:
    """In-memory twin of one LLM's Redis queue, with the claim script's exact order.

    The discrete-event simulator (``ssjf simulate``) drives it, and a test checks that
    ``lua/claim.lua`` pops random jobs in the same order, so simulated and served schedules
    agree.

    API:
        queue = ReferenceQueue(make_policy("ssjf", aging_rate=1.0), max_wait_s=120.0)
        queue.push("job-a", JobFeatures(arrival_s=t, predicted_tokens=85.0))
        job_id = queue.pop(now)   # next job to serve at time ``now``; None when empty
        queue.remove("job-a")     # a cancelled job; True when it was queued
        len(queue)

    pop(now): a job that has waited longer than ``max_wait_s`` (``now - arrival_s >
    max_wait_s``; 0 disables the guard) goes first, oldest (arrival_s, job_id) first; else
    the lowest (score, job_id). Job ids compare as strings, as Redis compares members with
    equal scores; give time-ordered ids for first-come first-served ties. Start deadlines,
    leases and multi-LLM workers are not modelled.
    """

    def __init__(self, policy: Policy, max_wait_s: float = 0.0) -> None:
        self.policy = policy
        self.max_wait_s = max_wait_s
        self._by_score: list[tuple[float, str]] = []
        self._by_arrival: list[tuple[float, str]] = []
        # job_id -> (score, arrival_s): a heap entry is live only when it matches, so a job
        # removed and pushed again leaves no stale entry behind.
        self._queued: dict[str, tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self._queued)

    def push(self, job_id: str, job: JobFeatures) -> float:
        """Queue a job; returns its score."""
        if job_id in self._queued:
            raise ValueError(f"job {job_id!r} is already queued")
        score = self.policy.score(job)
        if not math.isfinite(score):
            raise ValueError(f"job {job_id!r} has a non-finite score {score}")
        heapq.heappush(self._by_score, (score, job_id))
        heapq.heappush(self._by_arrival, (job.arrival_s, job_id))
        self._queued[job_id] = (score, job.arrival_s)
        return score

    def remove(self, job_id: str) -> bool:
        """Take a job out (lazily: its heap entries are skipped when they surface)."""
        if job_id not in self._queued:
            return False
        del self._queued[job_id]
        return True

    def _head(self, heap: list[tuple[float, str]], field: int) -> tuple[float, str] | None:
        while heap:
            value, job_id = heap[0]
            entry = self._queued.get(job_id)
            if entry is not None and entry[field] == value:
                return heap[0]
            heapq.heappop(heap)
        return None

    def pop(self, now: float) -> str | None:
        oldest = self._head(self._by_arrival, 1)
        if oldest is None:
            return None
        if self.max_wait_s > 0 and now - oldest[0] > self.max_wait_s:
            job_id = oldest[1]
        else:
            best = self._head(self._by_score, 0)
            assert best is not None
            job_id = best[1]
        del self._queued[job_id]
        return job_id
