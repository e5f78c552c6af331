"""The live-worker registry's domain objects: which LLMs live workers serve, and the
predictor head that orders each one's queue.

Workers register through their Lease calls and stay registered through their Report
heartbeats (SchedulerCore writes the registration to the JobStore); a worker that stops
calling drops out when its registration expires. Nothing here knows gRPC or Redis.
"""

from __future__ import annotations

from dataclasses import dataclass

ALL_LLMS_HEAD = "*"
MAX_WORKER_ID_CHARS = 256
# How long an LLM no live worker serves is still "known" (ListModels with include_offline):
# a request for it is answered "no worker serves it now" rather than "unknown model".
KNOWN_LLM_MEMORY_S = 24 * 3600.0


@dataclass(frozen=True)
class PredictorInfo:
    """What the scheduler needs to know of the proxy model: its version and its heads."""

    version: str
    heads: tuple[str, ...]  # LLMs with their own head

    def head_for(self, llm: str) -> str:
        """The head that answers for ``llm``: its own, else the all-LLM head (the predictor's
        own resolution rule, see predictor.proto)."""
        return llm if llm in self.heads else ALL_LLMS_HEAD


@dataclass(frozen=True)
class ServedModel:
    llm: str
    workers: int  # live workers serving it now (0: known, but no live worker)
    predictor_head: str  # "" when this replica asks no predictor for its jobs
    predictor_version: str


class RegistrationCache:
    """Until when this replica last registered each worker (and with which LLMs), so that
    the hot Lease and Report paths write to Redis only when a registration nears expiry
    or changes, not on every call."""

    def __init__(self, max_workers: int = 100_000) -> None:
        self._until: dict[str, tuple[tuple[str, ...], float]] = {}
        self._max_workers = max_workers

    def needs_register(self, worker_id: str, llms: tuple[str, ...], needed_until: float) -> bool:
        known = self._until.get(worker_id)
        return known is None or known[0] != llms or known[1] < needed_until

    def needs_refresh(self, worker_id: str, needed_until: float) -> bool:
        known = self._until.get(worker_id)
        # Unknown to this replica (registered through another one): refresh; the store
        # refreshes only registrations that exist.
        return known is None or known[1] < needed_until

    def remember(self, worker_id: str, llms: tuple[str, ...] | None, until: float) -> None:
        if len(self._until) >= self._max_workers:
            self._until.clear()  # crash-only pruning: costs one extra write per worker
        if llms is None:  # a refresh: keep the LLMs ((): registered through another replica)
            llms = self._until.get(worker_id, ((), 0.0))[0]
        self._until[worker_id] = (llms, until)
