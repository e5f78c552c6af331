"""Write the provisioned Grafana dashboard (grafana/dashboards/ssjf.json) from one list of
panels, so every query lives here once:  python deploy/monitoring/dashboard.py

Histograms and counters come from services/scheduler/metrics.py (queues, JCT, TTFT, queue
wait, prediction error), services/worker/metrics.py (tokens/s, batch occupancy) and the
gRPC interceptor (predictor latency); tests/test_monitoring.py checks every metric named here
is one the services export, with the labels the queries select on.

Every panel follows the $policy and $llm variables where its metric can: the job histograms
carry both labels; the queue gauges and the scheduler's prediction round trips get the policy
by joining the replica's ssjf_scheduler_info{policy}; the worker metrics carry only the LLM
names a worker serves (a lease carries no policy; see services/worker/metrics.py).
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).parent / "grafana" / "dashboards" / "ssjf.json"
JOB_FILTER = 'policy=~"$policy", llm=~"$llm"'
# Gives a scheduler series the policy of the replica that exports it, filtered by $policy.
POLICY_JOIN = ' * on (instance) group_left (policy) ssjf_scheduler_info{policy=~"$policy"}'
# A worker's llm label is its served names joined with ",": match any one of them.
WORKER_FILTER = 'llm=~"(.*,)?($llm)(,.*)?"'


def quantiles(
    metric: str, by: str = "policy, llm", where: str = JOB_FILTER, join: str = ""
) -> list[dict]:
    """p50 and p95 of a histogram, per ``by``; ``join`` is appended to the bucket rates (to
    bring in a label such as the policy before they are summed)."""
    selector = f"{{{where}}}" if where else ""
    return [
        {
            "expr": f"histogram_quantile({q}, sum by (le, {by}) "
            f"(rate({metric}_bucket{selector}[$__rate_interval]){join}))",
            "legendFormat": f"p{round(q * 100)} {{{{{by.replace(', ', '}} {{')}}}}}",
        }
        for q in (0.5, 0.95)
    ]


# (title, unit, targets); panels are laid out two per row in this order.
PANELS: list[tuple[str, str, list[dict]]] = [
    (
        "Queue depth (jobs waiting / running, per policy and LLM)",
        "short",
        [
            # Cluster-wide values, the same on every replica: max, never sum.
            {
                "expr": f"max by (policy, llm) "
                f'(ssjf_scheduler_{gauge}{{llm=~"$llm"}}{POLICY_JOIN})',
                "legendFormat": f"{gauge} {{{{policy}}}} {{{{llm}}}}",
            }
            for gauge in ("queued", "running")
        ],
    ),
    (
        "Job events per second (per policy and LLM)",
        "ops",
        [
            # Counters are cluster-wide too (Redis): max over replicas of one policy.
            {
                "expr": "max by (policy, llm, event) (rate(ssjf_scheduler_jobs_total"
                f'{{llm=~"$llm"}}[$__rate_interval]){POLICY_JOIN})',
                "legendFormat": "{{event}} {{policy}} {{llm}}",
            },
        ],
    ),
    ("Job completion time (JCT)", "s", quantiles("ssjf_job_completion_seconds")),
    ("Time to first token (TTFT)", "s", quantiles("ssjf_job_time_to_first_token_seconds")),
    ("Queue wait", "s", quantiles("ssjf_job_queue_wait_seconds")),
    ("Output tokens per job", "short", quantiles("ssjf_job_output_tokens")),
    (
        "Predictor latency (Predict RPC at the predictor)",
        "s",
        quantiles(
            "ssjf_rpc_duration_seconds", by="method", where='method=~"/ssjf.v1.Predictor/.*"'
        ),
    ),
    (
        "Prediction round trip at the scheduler (per policy and outcome; all LLMs)",
        "s",
        quantiles(
            "ssjf_scheduler_prediction_seconds", by="policy, outcome", where="", join=POLICY_JOIN
        ),
    ),
    (
        "Prediction error: predicted / generated tokens (1 = exact)",
        "short",
        quantiles("ssjf_prediction_ratio"),
    ),
    (
        "Prediction error: mean |predicted - generated| tokens (MAE)",
        "short",
        [
            {
                "expr": "sum by (policy, llm) (rate(ssjf_prediction_abs_error_tokens_sum{"
                + JOB_FILTER
                + "}[$__rate_interval])) / sum by (policy, llm) "
                "(rate(ssjf_prediction_abs_error_tokens_count{"
                + JOB_FILTER
                + "}[$__rate_interval]))",
                "legendFormat": "MAE {{policy}} {{llm}}",
            },
        ],
    ),
    (
        "Worker tokens/s (per LLM and batching mode; workers know no policy)",
        "short",
        [
            {
                "expr": "sum by (llm, batching) (rate(ssjf_worker_generated_tokens_total"
                f"{{{WORKER_FILTER}}}[$__rate_interval]))",
                "legendFormat": "{{llm}} {{batching}}",
            },
            {
                "expr": f"rate(ssjf_worker_generated_tokens_total{{{WORKER_FILTER}}}"
                "[$__rate_interval])",
                "legendFormat": "{{instance}}",
            },
        ],
    ),
    (
        "Batch occupancy (sequences / max batch size, mean per decoding step, per LLM)",
        "percentunit",
        [
            {
                "expr": "sum by (llm, batching) (rate(ssjf_worker_batch_occupancy_sum"
                f"{{{WORKER_FILTER}}}[$__rate_interval])) / sum by (llm, batching) "
                f"(rate(ssjf_worker_batch_occupancy_count{{{WORKER_FILTER}}}"
                "[$__rate_interval]))",
                "legendFormat": "{{llm}} {{batching}}",
            },
        ],
    ),
]


def variable(name: str, metric: str) -> dict:
    return {
        "name": name,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "ssjf-prometheus"},
        "query": {"query": f"label_values({metric}, {name})", "refId": name},
        "definition": f"label_values({metric}, {name})",
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
        "refresh": 2,
    }


def dashboard() -> dict:
    panels = []
    for index, (title, unit, targets) in enumerate(PANELS):
        panels.append(
            {
                "id": index + 1,
                "type": "timeseries",
                "title": title,
                "datasource": {"type": "prometheus", "uid": "ssjf-prometheus"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {**target, "refId": chr(ord("A") + n)} for n, target in enumerate(targets)
                ],
            }
        )
    return {
        "uid": "ssjf-overview",
        "title": "SSJF serving",
        "tags": ["ssjf"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {
            "list": [
                # Every scheduler replica exports its policy, before any job has finished.
                variable("policy", "ssjf_scheduler_info"),
                variable("llm", "ssjf_scheduler_queued"),
            ]
        },
        "panels": panels,
    }


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {OUT}")
