"""Metrics behind the monitoring dashboard: the job and worker histograms record what they
claim, and every metric the provisioned Grafana dashboard queries is one the services export."""

from __future__ import annotations

import json
import re

from prometheus_client import REGISTRY

from services.common import grpc_server
from services.scheduler import metrics as scheduler_metrics
from services.scheduler.metrics import QueueCollector, observe_finished_job
from services.scheduler.models import JobRecord, JobState, QueueStats, SamplingParams
from services.worker.engine import StepStat
from services.worker.metrics import step_observer
from tests.helpers import REPO_ROOT

DASHBOARD = REPO_ROOT / "deploy" / "monitoring" / "grafana" / "dashboards" / "ssjf.json"


def sample(name: str, labels: dict[str, str]) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def record(**changes) -> JobRecord:
    fields = dict(
        job_id="j1", client_request_id="", llm="test-llm-a", state=JobState.DONE, priority=0,
        predicted_output_tokens=40.0, prediction_fallback=False, predictor_version="v",
        policy="ssjf", score=40.0, sampling=SamplingParams(), prompt="hi",
        submitted_at=100.0, queued_at=100.0, leased_at=101.5, first_token_at=102.0,
        finished_at=110.0, generated_tokens=50,
    )  # fmt: skip
    return JobRecord(**{**fields, **changes})


def test_finished_jobs_feed_jct_ttft_queue_wait_and_prediction_error():
    labels = {"policy": "ssjf", "llm": "test-llm-a"}
    before = {
        name: sample(f"{name}_count", labels)
        for name in ("ssjf_job_completion_seconds", "ssjf_prediction_abs_error_tokens")
    }
    jct_sum = sample("ssjf_job_completion_seconds_sum", labels)
    error_sum = sample("ssjf_prediction_abs_error_tokens_sum", labels)
    observe_finished_job(record())
    assert (
        sample("ssjf_job_completion_seconds_count", labels)
        == before["ssjf_job_completion_seconds"] + 1
    )
    assert sample("ssjf_job_completion_seconds_sum", labels) - jct_sum == 10.0
    assert sample("ssjf_prediction_abs_error_tokens_sum", labels) - error_sum == 10.0
    assert sample("ssjf_prediction_ratio_bucket", {**labels, "le": "0.8"}) >= 1  # 40 / 50
    assert sample("ssjf_job_queue_wait_seconds_bucket", {**labels, "le": "2.0"}) >= 1
    assert sample("ssjf_job_time_to_first_token_seconds_bucket", {**labels, "le": "2.0"}) >= 1
    # Failed jobs say nothing about speed; fallback predictions are no prediction error.
    observe_finished_job(record(state=JobState.FAILED))
    observe_finished_job(record(prediction_fallback=True))
    assert (
        sample("ssjf_job_completion_seconds_count", labels)
        == before["ssjf_job_completion_seconds"] + 2
    )
    assert (
        sample("ssjf_prediction_abs_error_tokens_count", labels)
        == before["ssjf_prediction_abs_error_tokens"] + 1
    )


def test_worker_steps_feed_tokens_and_batch_occupancy():
    labels = {"llm": "test-llm-w", "batching": "continuous"}
    observe = step_observer(["test-llm-w"], "continuous", max_batch_size=8)
    observe(StepStat("prefill", batch_size=2, tokens=30, context=15, seconds=0.02))
    observe(StepStat("decode", batch_size=2, tokens=2, context=16, seconds=0.01))
    observe(StepStat("decode", batch_size=8, tokens=8, context=17, seconds=0.01))
    assert sample("ssjf_worker_generated_tokens_total", labels) == 10
    assert sample("ssjf_worker_batch_occupancy_sum", labels) == 0.25 + 1.0
    assert sample("ssjf_worker_batch_occupancy_count", labels) == 2
    assert sample("ssjf_worker_step_seconds_count", {**labels, "kind": "prefill"}) == 1


def test_every_dashboard_metric_is_exported():
    # Registered by importing the modules.
    assert scheduler_metrics.JOB_COMPLETION_SECONDS and grpc_server.RPC_SECONDS
    # Every series name of the registered metrics (_bucket, _sum, _count, _total included),
    # and of the queue collector the scheduler registers at start-up.
    exported = set(REGISTRY._names_to_collectors)
    queues = QueueCollector()
    queues.snapshot = [QueueStats("x", 1, 1, 0.0, {"submitted": 1})]
    exported.update(s.name for family in queues.collect() for s in family.samples)
    queried = set(re.findall(r"\bssjf_[a-z_]+", DASHBOARD.read_text()))
    missing = sorted(queried - exported)
    assert not missing, f"the dashboard queries metrics nobody exports: {missing}"
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len(panels) >= 8
