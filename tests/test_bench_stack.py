"""Smoke test of ``ssjf bench`` on the real stack: processes, gRPC, Redis, the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.bench.runner import BenchConfig, revalidate, run_bench


@pytest.mark.slow
# Two stacks, each calibrated, and two rounds recalibrated in between: minutes on a busy
# 2-core machine.
@pytest.mark.timeout(900)
def test_bench_runs_the_real_stack_and_writes_its_report(tmp_path: Path) -> None:
    config = BenchConfig(
        out_dir=tmp_path,
        policies=["fcfs", "ssjf"],
        batchings=["continuous"],
        loads=[0.5],
        requests=8,
        rounds=2,  # recalibrated before the second round
        length_scale=32.0,
        max_batch_size=2,
        saturation_jobs=6,
        resamples=50,
        data_dir=None,  # the vendored workload, as in a fresh clone
    )
    run_bench(config)

    summary = json.loads((tmp_path / "summary.json").read_text())
    runs = {run["policy"]: run for run in summary["runs"]}
    assert set(runs) == {"fcfs", "ssjf"}
    for run in runs.values():
        assert run["batching"] == "continuous" and run["rounds"] == 2
        assert run["completed"] == 16 and run["failed"] == 0
        assert 0 < run["p50_jct_s"] <= run["p99_jct_s"]
        assert run["mean_ttft_s"] <= run["mean_jct_s"]
        assert run["simulated_mean_jct_s"] > 0
        # Busy time of the worker (read back per job) over the rounds' span.
        assert 0 < run["realized_utilization"] <= 1.0
        assert len(run["capacity_rps_by_round"]) == 2
    latency = summary["latency_models"]["continuous"]
    assert set(latency["step_by_batch"]) == {"1", "2"}
    assert latency["fcfs_capacity_rps"] > 0
    assert [entry["round"] for entry in latency["recalibrated"]] == [0, 1]
    # The scheduler's own counts, read before and after each round: every job of the run
    # was submitted once, and each SSJF job's prediction ended exactly one way.
    assert runs["fcfs"]["predictions"]["counts"]["submitted"] == 16
    assert runs["fcfs"]["predictions"]["dispatched_before_prediction"] is None
    ssjf = runs["ssjf"]["predictions"]
    assert ssjf["counts"]["submitted"] == 16
    assert sum(ssjf["counts"].values()) - 16 == 16
    assert 0.0 <= ssjf["dispatched_before_prediction"] <= 1.0
    provenance = summary["provenance"]
    # Jobs dispatched on their first-stage score name that model; re-scored ones the proxy's.
    versions = provenance["predictor_version"].split(",")
    assert any(version.startswith("first-stage-") for version in versions) == bool(
        ssjf["counts"]["submitted"] - ssjf["counts"]["rescored"]
    )
    assert any(version.startswith("minilm-length-") for version in versions) == bool(
        ssjf["counts"]["rescored"]
    )
    assert provenance["machine"]["cpus"] >= 1 and provenance["git_commit"]
    (row,) = summary["comparisons"]
    ratio = row["policies"]["ssjf"]["mean_jct_over_fcfs"]
    assert ratio["ci_low"] <= ratio["value"] <= ratio["ci_high"]
    assert row["jobs_per_policy"] == 16 and row["rounds"] == 2
    jobs = [json.loads(line) for line in (tmp_path / "jobs").glob("*.jsonl").__next__().open()]
    assert len(jobs) == 16 and all(job["worker_id"] for job in jobs)
    # Replay mode: every job produced exactly its replayed length.
    assert all(job["tokens"] == job["output_tokens"] for job in jobs)
    for plot in ("jct_cdf.png", "mean_jct_vs_load.png"):
        assert (tmp_path / plot).stat().st_size > 0
    # ssjf simulate --validate replays the run from its per-job file to the same prediction.
    again = {run["policy"]: run for run in revalidate(tmp_path)}
    for policy, run in runs.items():
        assert again[policy]["simulated_mean_jct_s"] == pytest.approx(
            run["simulated_mean_jct_s"], rel=1e-3
        )
