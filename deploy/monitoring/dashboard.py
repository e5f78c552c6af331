"""Write the provisioned Grafana dashboard (grafana/dashboards/ssjf.json) from one list of
panels, so every query lives here once:  python deploy/monitoring/dashboard.py

Histograms and counters come from services/scheduler/metrics.py (queues, JCT, TTFT, queue
wait, prediction error), services/worker/metrics.py (tokens/s, batch occupancy) and the
gRPC interceptor (predictor latency); tests/test_monitoring.py checks every metric named here
is one the services export.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).parent / "grafana" / "dashboards" / "ssjf.json"
JOB_FILTER = 'policy=~"$policy", llm=~"$llm"'


def quantiles(metric: str, by: str = "policy, llm", where: str = JOB_FILTER) -> list[dict]:
    return [
        {
            "expr": f"histogram_quantile({q}, sum by (le, {by}) "
            f"(rate({metric}_bucket{{{where}}}[$__rate_interval])))",
            "legendFormat": f"p{round(q * 100)} {{{{{by.replace(', ', '}} {{')}}}}}",
        }
        for q in (0.5, 0.95)
    ]


# (title, unit, targets); panels are laid out two per row in this order.
PANELS: list[tuple[str, str, list[dict]]] = [
    (
        "Queue depth (jobs waiting / running, per LLM)",
        "short",
        [
            {
                "expr": 'max by (llm) (ssjf_scheduler_queued{llm=~"$llm"})',
                "legendFormat": "queued {{llm}}",
            },
            {
                "expr": 'max by (llm) (ssjf_scheduler_running{llm=~"$llm"})',
                "legendFormat": "running {{llm}}",
            },
        ],
    ),
    (
        "Job events per second (per LLM)",
        "ops",
        [
            {
                "expr": 'sum by (llm, event) (rate(ssjf_scheduler_jobs_total{llm=~"$llm"}'
                "[$__rate_interval]))",
                "legendFormat": "{{event}} {{llm}}",
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
        "Worker tokens/s (per LLM and batching mode)",
        "short",
        [
            {
                "expr": "sum by (llm, batching) (rate(ssjf_worker_generated_tokens_total"
                "[$__rate_interval]))",
                "legendFormat": "{{llm}} {{batching}}",
            },
            {
                "expr": "rate(ssjf_worker_generated_tokens_total[$__rate_interval])",
                "legendFormat": "{{instance}}",
            },
        ],
    ),
    (
        "Batch occupancy (sequences / max batch size, mean per decoding step)",
        "percentunit",
        [
            {
                "expr": "sum by (llm, batching) (rate(ssjf_worker_batch_occupancy_sum"
                "[$__rate_interval])) / sum by (llm, batching) "
                "(rate(ssjf_worker_batch_occupancy_count[$__rate_interval]))",
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
                variable("policy", "ssjf_job_completion_seconds_count"),
                variable("llm", "ssjf_scheduler_queued"),
            ]
        },
        "panels": panels,
    }


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {OUT}")
