"""Smoke test of ``ssjf bench`` on the real stack: processes, gRPC, Redis, the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.bench.runner import BenchConfig, revalidate, run_bench


@pytest.mark.slow
def test_bench_runs_the_real_stack_and_writes_its_report(tmp_path: Path) -> None:
    config = BenchConfig(
        out_dir=tmp_path,
        policies=["sjf-oracle"],
        batchings=["continuous"],
        loads=[0.5],
        requests=12,
        length_scale=32.0,
        max_batch_size=2,
        saturation_jobs=6,
        data_dir=None,  # the vendored workload, as in a fresh clone
    )
    run_bench(config)

    summary = json.loads((tmp_path / "summary.json").read_text())
    (run,) = summary["runs"]
    assert run["policy"] == "sjf-oracle" and run["batching"] == "continuous"
    assert run["completed"] == 12 and run["failed"] == 0
    assert 0 < run["p50_jct_s"] <= run["p99_jct_s"]
    assert run["mean_ttft_s"] <= run["mean_jct_s"]
    assert run["simulated_mean_jct_s"] > 0
    latency = summary["latency_models"]["continuous"]
    assert set(latency["step_by_batch"]) == {"1", "2"}
    assert latency["fcfs_capacity_rps"] > 0
    jobs = [json.loads(line) for line in (tmp_path / "jobs").glob("*.jsonl").__next__().open()]
    assert len(jobs) == 12
    # Replay mode: every job produced exactly its replayed length.
    assert all(job["tokens"] == job["output_tokens"] for job in jobs)
    for plot in ("jct_cdf.png", "mean_jct_vs_load.png"):
        assert (tmp_path / plot).stat().st_size > 0
    # ssjf simulate --validate replays the run from its per-job file to the same prediction.
    (again,) = revalidate(tmp_path)
    assert again["simulated_mean_jct_s"] == pytest.approx(run["simulated_mean_jct_s"])
