"""Unit tests of the benchmark suite's pure parts: simulator, latency fit, workload, report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from services.bench import report
from services.bench.calibrate import busy_time_s, capacity_rps, plan_for, replay_run
from services.bench.latency import LatencyModel, TimedRun, fit_step_times
from services.bench.loadgen import RequestResult
from services.bench.simulator import SimJob, Simulation
from services.bench.workload import (
    PromptLength,
    build_requests,
    load_prompt_lengths,
    read_azure_offsets,
    scale_length,
    trace_arrivals,
    vendored_workload_path,
)

LATENCY = LatencyModel(
    step_by_batch={1: 0.010, 4: 0.014, 8: 0.020},
    prefill_by_batch={1: 0.030, 4: 0.060},
    overhead_s=0.005,
)


def _toy_jobs(seed: int, count: int = 400, rate: float = 3.0) -> list[SimJob]:
    """Heavy-tailed lengths at a load that builds a queue for one unbatched worker."""
    rng = np.random.default_rng(seed)
    tokens = np.clip(rng.lognormal(3.0, 1.0, size=count).astype(int), 1, 400)
    arrivals = np.cumsum(rng.exponential(1 / rate, size=count))
    return [
        SimJob(i, float(a), int(t), float(t))
        for i, (a, t) in enumerate(zip(arrivals, tokens, strict=False))
    ]


def _mean_jct(jobs: list[SimJob]) -> float:
    return float(np.mean([job.jct_s for job in jobs]))


def test_simulated_sjf_beats_fcfs_under_queueing() -> None:
    fcfs = Simulation(LATENCY, "fcfs", "none").run(_toy_jobs(1))
    sjf = Simulation(LATENCY, "sjf-oracle", "none").run(_toy_jobs(1))
    assert all(np.isfinite(job.finish_s) for job in fcfs + sjf)
    assert _mean_jct(sjf) < 0.8 * _mean_jct(fcfs)


def test_simulated_ssjf_orders_by_prediction_not_truth() -> None:
    jobs = _toy_jobs(2)
    # A prediction that inverts the true order makes SSJF worse than FCFS: the policy really
    # reads the predicted score.
    inverted = [SimJob(j.index, j.arrival_s, j.tokens, 1.0 / j.tokens) for j in jobs]
    ssjf = Simulation(LATENCY, "ssjf", "none").run(inverted)
    fcfs = Simulation(LATENCY, "fcfs", "none").run(_toy_jobs(2))
    assert _mean_jct(ssjf) > _mean_jct(fcfs)


def test_fcfs_serves_in_arrival_order_without_batching() -> None:
    done = Simulation(LATENCY, "fcfs", "none").run(_toy_jobs(3))
    starts = [job.start_s for job in sorted(done, key=lambda j: j.index)]
    assert starts == sorted(starts)


def test_lone_job_takes_its_solo_time() -> None:
    (job,) = Simulation(LATENCY, "fcfs", "continuous", max_batch_size=8).run(
        [SimJob(0, 1.0, 50, 50.0)]
    )
    assert job.jct_s + LATENCY.overhead_s == pytest.approx(LATENCY.solo_jct_s(50))
    assert job.ttft_s == pytest.approx(LATENCY.prefill_s(1))


def test_no_queueing_regime_makes_policies_equal() -> None:
    """Batch slots for every concurrent job: nobody waits, so the order cannot matter."""
    jobs = _toy_jobs(4, count=60, rate=2.0)
    results = {
        policy: _mean_jct(
            Simulation(LATENCY, policy, "continuous", max_batch_size=64).run(
                [SimJob(j.index, j.arrival_s, j.tokens, j.predicted_tokens) for j in jobs]
            )
        )
        for policy in ("fcfs", "ssjf", "sjf-oracle")
    }
    assert results["ssjf"] == pytest.approx(results["fcfs"])
    assert results["sjf-oracle"] == pytest.approx(results["fcfs"])


def test_prediction_cpu_delays_the_job_it_scores_and_is_not_worker_busy_time() -> None:
    # A lone job on an idle worker: its prediction's CPU comes before its prefill.
    simulation = Simulation(LATENCY, "ssjf", "none", prediction_cpu_s=0.2)
    (job,) = simulation.run([SimJob(0, 1.0, 50, 50.0)])
    assert job.jct_s + LATENCY.overhead_s == pytest.approx(LATENCY.solo_jct_s(50) + 0.2)
    assert simulation.busy_s == pytest.approx(LATENCY.solo_jct_s(50) - LATENCY.overhead_s)


def test_prediction_cpu_charges_every_arrival_once() -> None:
    free = Simulation(LATENCY, "ssjf", "none").run(_toy_jobs(6, count=200, rate=3.0))
    free_span = max(job.finish_s for job in free)
    charged = Simulation(LATENCY, "ssjf", "none", prediction_cpu_s=0.01).run(
        _toy_jobs(6, count=200, rate=3.0)
    )
    # A busy worker pays each arrival's 10 ms once; an idle one pays while it would have
    # waited anyway, so the span grows by at most 200 x 10 ms.
    assert free_span < max(job.finish_s for job in charged) <= free_span + 2.0 + 1e-9
    assert _mean_jct(charged) > _mean_jct(free)
    with pytest.raises(ValueError, match="prediction_cpu_s"):
        Simulation(LATENCY, "ssjf", "none", prediction_cpu_s=-1.0)


def test_continuous_batching_admits_at_step_boundaries() -> None:
    long_job = SimJob(0, 0.0, 100, 100.0)
    late = SimJob(1, 0.25, 5, 5.0)
    Simulation(LATENCY, "fcfs", "continuous", max_batch_size=2).run([long_job, late])
    # The late job joins the running batch instead of waiting for the long one to end.
    assert late.start_s < long_job.finish_s
    assert late.start_s - late.arrival_s < LATENCY.step_s(1) + 1e-9


def test_a_job_far_past_its_prediction_gives_way_to_a_waiting_one() -> None:
    """An unbatched worker: a 'loop' predicted at 10 tokens runs to 300; a 5-token job arrives
    at 0.5 s. Without demotion it waits for the loop; with demotion after 2x the loop gives up
    the worker at the arrival, resumes after it (one prefill more), and both end exactly once."""

    def run(demote_after: float) -> tuple[SimJob, SimJob, Simulation]:
        loop, short = SimJob(0, 0.0, 300, 10.0), SimJob(1, 0.5, 5, 5.0)
        simulation = Simulation(LATENCY, "ssjf", "none", demote_after=demote_after)
        simulation.run([loop, short])
        return loop, short, simulation

    loop, short, simulation = run(0.0)
    assert short.start_s == pytest.approx(loop.finish_s) and simulation.demoted == 0
    loop, short, simulation = run(2.0)
    assert simulation.demoted == 1
    assert 0.5 <= short.start_s < 0.5 + LATENCY.step_s(1) + 1e-9
    assert short.finish_s < loop.finish_s
    assert loop.remaining == short.remaining == 0
    assert loop.first_token_s == pytest.approx(LATENCY.prefill_s(1))  # not re-counted
    work = LATENCY.prefill_s(1) + 299 * LATENCY.step_s(1)  # the loop alone
    short_work = LATENCY.prefill_s(1) + 4 * LATENCY.step_s(1)
    assert loop.finish_s == pytest.approx(work + short_work + LATENCY.prefill_s(1))


def test_demotion_never_touches_a_right_prediction_and_refuses_bad_settings() -> None:
    exact = Simulation(LATENCY, "sjf-oracle", "continuous", max_batch_size=4, demote_after=1.0)
    demoted = exact.run(_toy_jobs(7, count=200, rate=8.0))
    plain = Simulation(LATENCY, "sjf-oracle", "continuous", max_batch_size=4).run(
        _toy_jobs(7, count=200, rate=8.0)
    )
    assert exact.demoted == 0
    assert [job.finish_s for job in demoted] == pytest.approx([job.finish_s for job in plain])
    with pytest.raises(ValueError, match="factor >= 1"):
        Simulation(LATENCY, "ssjf", "none", demote_after=0.5)
    with pytest.raises(ValueError, match="dynamic batch runs to its end"):
        Simulation(LATENCY, "ssjf", "dynamic", demote_after=2.0)


def test_dynamic_batching_waits_for_the_whole_batch() -> None:
    long_job = SimJob(0, 0.0, 100, 100.0)
    late = SimJob(1, 0.25, 5, 5.0)
    Simulation(LATENCY, "fcfs", "dynamic", max_batch_size=2).run([long_job, late])
    assert late.start_s == pytest.approx(long_job.finish_s)


def test_max_wait_guard_bounds_the_longest_wait() -> None:
    def worst_wait(max_wait_s: float) -> float:
        jobs = _toy_jobs(5, count=300, rate=4.5)
        done = Simulation(LATENCY, "sjf-oracle", "none", max_wait_s=max_wait_s).run(jobs)
        return max(job.start_s - job.arrival_s for job in done)

    assert worst_wait(5.0) < worst_wait(0.0)


def test_latency_fit_recovers_a_known_model() -> None:
    runs = [
        TimedRun(batch, tokens, LATENCY.prefill_s(batch) + (tokens - 1) * LATENCY.step_s(batch))
        for batch in (1, 4)
        for tokens in (4, 16, 48)
    ]
    steps, prefills = fit_step_times(runs)
    assert steps[1] == pytest.approx(0.010)
    assert steps[4] == pytest.approx(0.014)
    assert prefills[1] == pytest.approx(0.030)
    assert prefills[4] == pytest.approx(0.060)


def test_latency_model_interpolates_and_round_trips(tmp_path: Path) -> None:
    assert LATENCY.step_s(2) == pytest.approx(0.010 + (0.004 / 3))
    assert LATENCY.step_s(16) == pytest.approx(0.020 + 8 * 0.0015)
    LATENCY.save(tmp_path / "latency.json")
    loaded = LatencyModel.load(tmp_path / "latency.json")
    assert loaded.step_by_batch == LATENCY.step_by_batch
    assert loaded.prefill_by_batch == LATENCY.prefill_by_batch
    with pytest.raises(ValueError, match="batch size 1"):
        LatencyModel({2: 0.1}, {1: 0.1}, 0.0)


def test_calibration_plan_and_capacity() -> None:
    assert plan_for("none", 8).batch_sizes == (1,)
    assert plan_for("continuous", 8).batch_sizes == (1, 2, 4, 8)
    tokens = [10] * 100
    unbatched = capacity_rps(LATENCY, tokens, "none", 4)
    assert unbatched == pytest.approx(1 / (LATENCY.prefill_s(1) + 9 * LATENCY.step_s(1)))
    assert capacity_rps(LATENCY, tokens, "continuous", 4) > 2 * unbatched


def test_workload_is_reproducible_and_rate_correct() -> None:
    items = [PromptLength(i, f"prompt {i}", 10 * (i + 1)) for i in range(20)]
    first = build_requests(items, 2000, 5.0, 10.0, seed=7)
    again = build_requests(items, 2000, 5.0, 10.0, seed=7)
    faster = build_requests(items, 2000, 10.0, 10.0, seed=7)
    assert first == again
    assert [r.prompt_id for r in first] == [r.prompt_id for r in faster]
    assert faster[-1].arrival_s == pytest.approx(first[-1].arrival_s / 2)
    assert len(first) / first[-1].arrival_s == pytest.approx(5.0, rel=0.1)
    assert all(r.output_tokens == scale_length(r.true_output_tokens, 10.0) for r in first)
    assert scale_length(3, 10.0) == 1


def test_trace_arrivals_keep_bursts_at_the_target_rate() -> None:
    offsets = read_azure_offsets(Path("bench/workloads/azure_conversation_timestamps.csv"))
    times = trace_arrivals(offsets, 500, 4.0, np.random.default_rng(0))
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(0.25)
    # Bursty: gaps vary more than a Poisson process's (coefficient of variation 1).
    assert gaps.std() / gaps.mean() > 1.0


def test_vendored_workload_loads_without_shared_data() -> None:
    items, source = load_prompt_lengths("vicuna-13b", data_dir=None)
    assert source == str(vendored_workload_path("vicuna-13b").relative_to(Path.cwd()))
    assert len(items) > 100
    assert all(item.prompt and item.output_tokens > 0 for item in items)
    with pytest.raises(FileNotFoundError, match="no workload for LLM"):
        load_prompt_lengths("no-such-llm", data_dir=None)


def test_summary_json_schema(tmp_path: Path) -> None:
    runs = []
    for policy, mean in (("fcfs", 2.0), ("ssjf", 1.2), ("sjf-oracle", 1.0)):
        stats = report.summarize([mean * 0.5, mean, mean * 1.5], [0.1, 0.1, 0.1], span_s=3.0)
        runs.append({"policy": policy, "batching": "none", "load": 0.9, **stats})
    path = report.write_summary(tmp_path, runs, {"kind": "test"})
    summary = json.loads(path.read_text())
    required = {"policy", "batching", "load", "completed", "mean_jct_s", "p50_jct_s",
                "p99_jct_s", "mean_ttft_s", "throughput_rps"}  # fmt: skip
    assert [run["policy"] for run in summary["runs"]] == ["fcfs", "ssjf", "sjf-oracle"]
    assert all(required <= set(run) for run in summary["runs"])
    (row,) = summary["comparisons"]
    assert row["ssjf_over_fcfs_mean_jct"] == pytest.approx(0.6)
    assert row["ssjf_over_oracle_mean_jct"] == pytest.approx(1.2)
    table = report.format_table(summary["runs"])
    assert "ssjf" in table and "x0.60 of FCFS" in table


def test_plots_are_written(tmp_path: Path) -> None:
    runs = [
        {"policy": p, "batching": "none", "load": load, "mean_jct_s": m * load}
        for p, m in (("fcfs", 2.0), ("ssjf", 1.0))
        for load in (0.5, 0.9)
    ]
    jcts = {("fcfs", "none", 0.9): [1.0, 2.0, 3.0], ("ssjf", "none", 0.9): [0.5, 1.0, 4.0]}
    for path in (
        report.plot_jct_cdf(jcts, tmp_path / "cdf.png", "test"),
        report.plot_mean_jct_vs_load(runs, tmp_path / "load.png", "test"),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_busy_time_is_the_union_of_intervals() -> None:
    assert busy_time_s([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0), (3.2, 3.5)]) == pytest.approx(3.0)
    assert busy_time_s([]) == 0.0


def _as_measured(jobs: list[SimJob]) -> list[RequestResult]:
    """Simulated jobs dressed as a measured run (server timings, the serving worker's id)."""
    return [
        RequestResult(
            index=job.index,
            prompt_id=job.index,
            output_tokens=job.tokens,
            true_output_tokens=job.tokens,
            arrival_s=job.arrival_s,
            submitted_s=job.arrival_s,
            finished_s=job.finish_s,
            state="JOB_STATE_DONE",
            server_queue_wait_s=job.start_s - job.arrival_s,
            server_completion_s=job.finish_s - job.arrival_s,
            worker_id=f"worker-{job.worker}",
        )
        for job in jobs
    ]


def test_replaying_a_run_recovers_its_worker_speed_and_jct() -> None:
    """A "measured" run made by the simulator at 1.3x the model's costs: replaying it with
    the model finds the 1.3 and predicts every job's completion exactly."""
    slower = LATENCY.scaled(1.3)
    jobs = Simulation(slower, "sjf-oracle", "continuous", max_batch_size=4).run(
        _toy_jobs(6, count=150, rate=3.0)
    )
    results = _as_measured(jobs)
    model, replayed = replay_run(results, LATENCY, "sjf-oracle", "continuous", 4)
    assert model.source["run_level_factor"] == pytest.approx(1.3, rel=0.02)
    assert _mean_jct(replayed) == pytest.approx(_mean_jct(jobs), rel=0.05)


def test_replaying_a_several_worker_run_fits_each_workers_busy_time() -> None:
    """Two workers' busy times overlap, so the fit counts worker-seconds per worker (by the
    job's worker_id); their union would see one worker's worth and miss the 1.3."""
    slower = LATENCY.scaled(1.3)
    jobs = Simulation(slower, "fcfs", "continuous", max_batch_size=2, workers=2).run(
        _toy_jobs(7, count=300, rate=9.0)
    )
    assert {job.worker for job in jobs} == {0, 1}
    results = _as_measured(jobs)
    model, replayed = replay_run(results, LATENCY, "fcfs", "continuous", 2, workers=2)
    assert model.source["run_level_factor"] == pytest.approx(1.3, rel=0.03)
    assert _mean_jct(replayed) == pytest.approx(_mean_jct(jobs), rel=0.05)
    unattributed = [replace(result, worker_id="") for result in results]
    with pytest.raises(ValueError, match="which worker"):
        replay_run(unattributed, LATENCY, "fcfs", "continuous", 2, workers=2)


def test_a_second_sigterm_cannot_cut_the_benchs_cleanup_short() -> None:
    """The first SIGTERM unwinds (stacks are stopped in finally blocks); any later one is
    ignored so it cannot interrupt that cleanup and orphan the stack's processes."""
    import signal

    from services.bench.cli import exit_on_sigterm

    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        with pytest.raises(SystemExit) as exited:
            exit_on_sigterm(signal.SIGTERM, None)
        assert exited.value.code == 143
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
