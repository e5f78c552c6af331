"""Prometheus view of the queues (the same numbers as QueueStats, for every LLM) and
histograms of finished jobs (JCT, TTFT, queue wait, prediction error) by policy and LLM.

The replica's policy is exported as ``ssjf_scheduler_info{policy}`` (value 1) rather than as a
label of the queue gauges: ``ssjf_scheduler_queued{llm}`` keeps the exact label set that the
worker HPA, the prometheus-adapter rule and existing queries match, and a dashboard gets the
policy dimension with ``* on (instance) group_left (policy) ssjf_scheduler_info``. The same
join labels this replica's ``ssjf_scheduler_prediction_seconds`` by policy.

The counters live in Redis and are shared by all replicas, so each replica exports the
cluster-wide values (aggregate with ``max``, not ``sum``). A background task refreshes the
snapshot; a scrape never waits on Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Histogram
from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from services.common.errors import Unavailable
from services.scheduler.models import JobRecord, JobState, Progress, QueueStats

if TYPE_CHECKING:
    from services.scheduler.core import SchedulerCore

log = logging.getLogger(__name__)


class QueueCollector(Collector):
    def __init__(self, policy: str = "") -> None:
        self.snapshot: list[QueueStats] = []
        self.policy = policy  # "": no info series (a collector fed by hand, as in tests)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | InfoMetricFamily]:
        if self.policy:
            yield InfoMetricFamily(
                "ssjf_scheduler",
                "This replica's scheduling policy (join on instance for a policy label)",
                value={"policy": self.policy},
            )
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
    collector = QueueCollector(policy=core.policy.name)
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


# Per-job latency and prediction quality, by policy and LLM, observed by the replica that
# applies a job's final report (each job exactly once across replicas: sum them).
_JOB_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
JOB_COMPLETION_SECONDS = Histogram(
    "ssjf_job_completion_seconds",
    "Job completion time (JCT): submission to last token, of jobs that finished DONE",
    ["policy", "llm"],
    buckets=_JOB_SECONDS_BUCKETS,
)
JOB_TTFT_SECONDS = Histogram(
    "ssjf_job_time_to_first_token_seconds",
    "Submission to first streamed token (TTFT), of jobs that finished DONE",
    ["policy", "llm"],
    buckets=_JOB_SECONDS_BUCKETS,
)
JOB_QUEUE_WAIT_SECONDS = Histogram(
    "ssjf_job_queue_wait_seconds",
    "Submission to the (last) lease by a worker, of jobs that finished DONE",
    ["policy", "llm"],
    buckets=_JOB_SECONDS_BUCKETS,
)
JOB_OUTPUT_TOKENS = Histogram(
    "ssjf_job_output_tokens",
    "Tokens generated per job that finished DONE",
    ["policy", "llm"],
    buckets=(8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
)
PREDICTION_ABS_ERROR_TOKENS = Histogram(
    "ssjf_prediction_abs_error_tokens",
    "|predicted - generated| output tokens per finished job (its mean is the MAE; jobs on "
    "the predictor fallback excluded)",
    ["policy", "llm"],
    buckets=(4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
PREDICTION_RATIO = Histogram(
    "ssjf_prediction_ratio",
    "Predicted / generated output tokens per finished job (1: exact, < 1: underestimated)",
    ["policy", "llm"],
    buckets=(0.125, 0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 4, 8),
)


def observe_finished_job(record: JobRecord) -> None:
    """Record a finished job's latencies and prediction error (DONE jobs only: a failed or
    cancelled job's times say nothing about serving speed)."""
    if record.state is not JobState.DONE:
        return
    labels = (record.policy or "unknown", record.llm)
    JOB_COMPLETION_SECONDS.labels(*labels).observe(record.finished_at - record.submitted_at)
    if record.first_token_at:
        JOB_TTFT_SECONDS.labels(*labels).observe(record.first_token_at - record.submitted_at)
    if record.leased_at:
        JOB_QUEUE_WAIT_SECONDS.labels(*labels).observe(record.queue_wait_s)
    JOB_OUTPUT_TOKENS.labels(*labels).observe(record.generated_tokens)
    if not record.prediction_fallback:
        error = record.predicted_output_tokens - record.generated_tokens
        PREDICTION_ABS_ERROR_TOKENS.labels(*labels).observe(abs(error))
        PREDICTION_RATIO.labels(*labels).observe(
            record.predicted_output_tokens / max(record.generated_tokens, 1)
        )


async def observe_finished_jobs(core: SchedulerCore, progress: list[Progress]) -> None:
    """After a worker report: observe the jobs it finished (one HGETALL each, off the report's
    path). Metrics never fail a report."""
    for item in progress:
        if item.outcome is None:
            continue
        try:
            observe_finished_job(await core.get_job(item.job_id))
        except Exception as error:  # a metric is not worth a failed report
            log.debug(
                "finished job not observed", extra={"job_id": item.job_id, "error": str(error)}
            )
