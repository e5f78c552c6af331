"""Metrics behind the monitoring dashboard: the job and worker histograms record what they
claim, and every metric the provisioned Grafana dashboard queries is one the services export."""

from __future__ import annotations

import json
import re

from prometheus_client import REGISTRY

from deploy.monitoring.dashboard import WORKER_FILTER, dashboard
from services.common import grpc_server
from services.scheduler import metrics as scheduler_metrics
from services.scheduler import prediction
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


def exported_labels() -> dict[str, set[str]]:
    """Every series name the services export (_bucket, _sum, _count, _total included) with
    its label names: the registered metrics, and the queue collector the scheduler registers
    at start-up."""
    # Registered by importing the modules.
    assert scheduler_metrics.JOB_COMPLETION_SECONDS and grpc_server.RPC_SECONDS
    assert prediction.PREDICTION_SECONDS
    exported = {
        name: {
            *getattr(collector, "_labelnames", ()),
            *(["le"] if name.endswith("_bucket") else []),
        }
        for name, collector in REGISTRY._names_to_collectors.items()
    }
    queues = QueueCollector(policy="ssjf")
    queues.snapshot = [QueueStats("x", 1, 1, 0.0, {"submitted": 1})]
    for family in queues.collect():
        for series in family.samples:
            exported.setdefault(series.name, set()).update(series.labels)
    return exported


def dashboard_queries() -> list[str]:
    committed = json.loads(DASHBOARD.read_text())
    panels = [target["expr"] for panel in committed["panels"] for target in panel["targets"]]
    return panels + [variable["definition"] for variable in committed["templating"]["list"]]


def test_every_dashboard_metric_is_exported_with_the_labels_it_selects():
    exported = exported_labels()
    queries = dashboard_queries()
    queried = {name for query in queries for name in re.findall(r"\bssjf_[a-z_]+", query)}
    missing = sorted(queried - set(exported))
    assert not missing, f"the dashboard queries metrics nobody exports: {missing}"
    for query in queries:
        selected = [
            (name, re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
            for name, matchers in re.findall(r"\b(ssjf_[a-z_]+)\{([^}]*)\}", query)
        ] + re.findall(r"label_values\((ssjf_[a-z_]+), (\w+)\)", query)
        for name, labels in selected:
            unknown = set([labels] if isinstance(labels, str) else labels) - exported[name]
            assert not unknown, f"{name} has no label {unknown} (query: {query})"
    assert len(json.loads(DASHBOARD.read_text())["panels"]) >= 11


def test_committed_dashboard_is_the_generators_output():
    assert json.loads(DASHBOARD.read_text()) == dashboard(), (
        "run: python deploy/monitoring/dashboard.py"
    )


def test_dashboard_has_policy_and_llm_on_every_scheduler_panel():
    generated = dashboard()
    assert [v["name"] for v in generated["templating"]["list"]] == ["policy", "llm"]
    for panel in generated["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            if "ssjf_worker_" in expr:  # workers know no policy (a lease carries none)
                assert "$llm" in expr, panel["title"]
            elif "ssjf_rpc_duration_seconds" not in expr:  # the predictor's own RPC timings
                assert "$policy" in expr, panel["title"]
                if "ssjf_scheduler_prediction_seconds" not in expr:  # no llm label there
                    assert "$llm" in expr, panel["title"]
    titles = " ".join(panel["title"] for panel in generated["panels"])
    assert "Prediction round trip at the scheduler" in titles


def test_queue_gauges_keep_their_labels_and_the_policy_is_an_info_series():
    # ssjf_scheduler_queued{llm} is what the worker HPA and the adapter rule select: its
    # label set must not change; the policy comes from a separate series to join on.
    queues = QueueCollector(policy="fcfs")
    queues.snapshot = [QueueStats("m", 2, 0, 0.0, {})]
    samples = {s.name: s.labels for family in queues.collect() for s in family.samples}
    assert samples["ssjf_scheduler_queued"] == {"llm": "m"}
    assert samples["ssjf_scheduler_info"] == {"policy": "fcfs"}
    assert "ssjf_scheduler_info" not in {
        s.name for family in QueueCollector().collect() for s in family.samples
    }


def test_worker_llm_filter_matches_each_served_name():
    # Grafana substitutes $llm with one name, "(a|b)" for several, ".*" for All; Prometheus
    # anchors the regex (fullmatch).
    pattern = WORKER_FILTER.split('"')[1]
    served = ",".join(["smollm2", "vicuna-13b"])  # the worker's label for two served names
    for choice, matches in [
        ("smollm2", True), ("vicuna-13b", True), ("(smollm2|other)", True), (".*", True),
        ("vicuna", False), ("other", False),
    ]:  # fmt: skip
        assert bool(re.fullmatch(pattern.replace("$llm", choice), served)) is matches, choice
    assert re.fullmatch(pattern.replace("$llm", "smollm2"), "smollm2")
