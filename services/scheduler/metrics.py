"""Prometheus view of the queues: the same numbers as QueueStats, for every LLM.

The counters live in Redis and are shared by all replicas, so each replica exports the
cluster-wide values (aggregate with ``max``, not ``sum``). A background task refreshes the
snapshot; a scrape never waits on Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from services.common.errors import Unavailable
from services.scheduler.core import SchedulerCore
from services.scheduler.models import QueueStats

log = logging.getLogger(__name__)


class QueueCollector(Collector):
    def __init__(self) -> None:
        self.snapshot: list[QueueStats] = []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        queued = GaugeMetricFamily("ssjf_scheduler_queued", "Jobs waiting, per LLM", labels=["llm"])
        running = GaugeMetricFamily(
            "ssjf_scheduler_running", "Jobs leased by workers, per LLM", labels=["llm"]
        )
        oldest = GaugeMetricFamily(
            "ssjf_scheduler_oldest_wait_seconds", "Wait of the oldest queued job", labels=["llm"]
        )
        jobs = CounterMetricFamily(
            "ssjf_scheduler_jobs",
            "Job events across all replicas (submitted, prediction_fallback, completed, "
            "failed, cancelled, requeued, deadline_missed)",
            labels=["llm", "event"],
        )
        for stats in self.snapshot:
            queued.add_metric([stats.llm], stats.queued)
            running.add_metric([stats.llm], stats.running)
            oldest.add_metric([stats.llm], stats.oldest_wait_s)
            for event, value in stats.counters.items():
                jobs.add_metric([stats.llm, event], value)
        yield from (queued, running, oldest, jobs)


async def refresh_queue_metrics(core: SchedulerCore, interval_s: float = 5.0) -> None:
    """Keep a registered QueueCollector current until ``core`` stops."""
    collector = QueueCollector()
    REGISTRY.register(collector)
    try:
        while not core.stopping:
            try:
                collector.snapshot = await core.queue_stats()
            except (RedisError, Unavailable) as error:
                log.warning("queue metrics not refreshed", extra={"error": str(error)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(core.wait_stopped(), interval_s)
    finally:
        REGISTRY.unregister(collector)
