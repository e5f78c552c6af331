"""The benchmark's statistics: bootstrap intervals with a known answer, the SLO search on a
simulated server, realized utilization, HRRN, the workloads, and the summary.json schema."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from services.bench import report, stats
from services.bench.latency import LatencyModel
from services.bench.loadgen import RequestResult
from services.bench.runner import (
    Calibration,
    idle_arrival_waits,
    lower_median_calibration,
    summarize_idle_arrivals,
    summarize_prediction_counts,
    turn_order,
)
from services.bench.runner import realized_utilization as measured_utilization
from services.bench.simulate import SimulateConfig, run_simulations
from services.bench.simulator import (
    GridEntry,
    HrrnQueue,
    SimJob,
    Simulation,
    aging_for,
    asynchronous_twin,
    guard_for,
    known_policy,
    parse_entry,
)
from services.bench.workload import (
    PromptLength,
    azure_generated_tokens,
    build_requests,
    load_workload,
    map_lengths_to,
)
from services.common.alpaca import load_dataset
from services.common.machine import describe_machine
from services.common.paths import SERVED_MODEL_LABELS
from services.scheduler.policies import EPOCH_S, JobFeatures

# A worker whose every job takes exactly 1 s alone (prefill 0.1 s + 9 steps of 0.1 s).
UNIT = LatencyModel(step_by_batch={1: 0.1}, prefill_by_batch={1: 0.1}, overhead_s=0.0)


def _paired_sample(rng: np.random.Generator, jobs: int, ratio: float) -> dict[str, np.ndarray]:
    """FCFS JCTs exponential(2); SSJF the same jobs times ``ratio`` times mean-one noise."""
    fcfs = rng.exponential(2.0, size=jobs)
    noise = rng.lognormal(-0.08, 0.4, size=jobs)  # E = exp(-0.08 + 0.08) = 1
    return {"fcfs": fcfs, "ssjf": fcfs * ratio * noise}


def test_bootstrap_interval_covers_a_known_ratio_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(11)
    covered, widths = 0, []
    trials = 80
    for trial in range(trials):
        rounds = [_paired_sample(rng, 300, 0.7) for _ in range(2)]
        interval = stats.paired_bootstrap(
            rounds, {"r": stats.mean_ratio("ssjf", "fcfs")}, resamples=300, block=1, seed=trial
        )["r"]
        covered += interval.low <= 0.7 <= interval.high
        widths.append(interval.half_width)
    # 95% nominal: with 80 trials, fewer than 68 hits would be a real miss (p < 0.01).
    assert covered >= 68, f"covered the true ratio {covered}/{trials} times"
    # And it is not trivially wide: the ratio's standard error here is about 0.02.
    assert 0.02 < float(np.mean(widths)) < 0.08


def test_block_bootstrap_widens_for_correlated_jobs_as_it_must() -> None:
    """Consecutive JCTs of a queue are correlated. Resampling single jobs understates the
    spread; blocks recover the spread of independent replications."""
    rng = np.random.default_rng(3)

    def correlated(jobs: int) -> dict[str, np.ndarray]:
        level = np.zeros(jobs)
        for i in range(1, jobs):  # AR(1) in log space: busy and quiet stretches
            level[i] = 0.95 * level[i - 1] + rng.normal(0, 0.3)
        # SSJF's advantage depends on how loaded the stretch is (as a queue's does), so the
        # ratio of means moves with the busy stretches a sample happens to hold.
        fcfs = np.exp(level)
        return {"fcfs": fcfs, "ssjf": 0.5 * np.exp(1.3 * level)}

    truth = [
        (sample["ssjf"].mean() / sample["fcfs"].mean())
        for sample in (correlated(1000) for _ in range(60))
    ]
    replication_half_width = 1.96 * float(np.std(truth, ddof=1))
    sample = correlated(1000)
    single = stats.paired_bootstrap(
        [sample], {"r": stats.mean_ratio("ssjf", "fcfs")}, resamples=400, block=1
    )["r"]
    blocks = stats.paired_bootstrap(
        [sample], {"r": stats.mean_ratio("ssjf", "fcfs")}, resamples=400
    )["r"]
    assert blocks.half_width > single.half_width
    assert 0.5 * replication_half_width < blocks.half_width < 2.0 * replication_half_width


def test_oracle_gain_fraction_has_its_defined_value() -> None:
    values = {
        "fcfs": np.array([2.0, 2.0]),
        "ssjf": np.array([1.2, 1.2]),
        "sjf-oracle": np.array([1.0, 1.0]),
    }
    assert stats.oracle_gain_fraction("ssjf")(values) == pytest.approx(0.8)
    values["sjf-oracle"] = values["fcfs"]  # no room for any gain: undefined, not infinite
    assert math.isnan(stats.oracle_gain_fraction("ssjf")(values))


def test_paired_bootstrap_refuses_rounds_with_different_jobs() -> None:
    with pytest.raises(ValueError, match="same jobs"):
        stats.paired_bootstrap(
            [{"fcfs": [1.0, 2.0], "ssjf": [1.0]}], {"r": stats.mean_ratio("ssjf", "fcfs")}
        )


def test_failed_jobs_are_left_out_not_counted_as_zero() -> None:
    rounds = [{"fcfs": [2.0, 2.0, 2.0], "ssjf": [1.0, np.nan, 1.0]}]
    interval = stats.paired_bootstrap(rounds, {"r": stats.mean_ratio("ssjf", "fcfs")})["r"]
    assert interval.value == pytest.approx(0.5)


def test_slo_search_finds_the_known_rate_of_a_formula() -> None:
    """M/M/1: mean sojourn 1 / (mu - rate); under SLO s the answer is mu - 1/s."""
    mu, slo = 10.0, 0.5
    search = stats.max_rate_under_slo(
        lambda rate: 1 / (mu - rate) if rate < mu else math.inf, slo, low=1.0, high=4.0
    )
    assert search.max_rate == pytest.approx(mu - 1 / slo, rel=0.02)
    assert not search.infeasible and not search.unbounded
    assert stats.max_rate_under_slo(lambda rate: 99.0, slo, 1.0, 2.0).infeasible
    assert stats.max_rate_under_slo(lambda rate: 0.0, slo, 1.0, 2.0).unbounded


def test_slo_targets_put_each_statistic_on_its_own_scale() -> None:
    # Heavy tail: 98 short jobs and 2 long ones alone on an idle worker.
    targets = stats.SloTargets.from_solo_jcts([1.0] * 98 + [50.0, 50.0], 5.0, 3.0)
    assert targets.unloaded_mean_s == pytest.approx(1.98)
    assert targets.unloaded_p99_s == pytest.approx(50.0)
    statistics = targets.statistics()
    (mean, mean_limit), (p99, p99_limit) = statistics["mean"], statistics["p99"]
    assert mean_limit == pytest.approx(9.9) and p99_limit == pytest.approx(150.0)
    # With no queueing at all, the p99 would already miss a limit on the mean's scale.
    unloaded = np.array([1.0] * 98 + [50.0, 50.0])
    assert mean(unloaded) < mean_limit and mean_limit < p99(unloaded) < p99_limit
    described = targets.describe()
    assert described["slo"]["p99"] == "3 x unloaded p99 JCT"
    assert described["slo_s"] == {"mean": mean_limit, "p99": p99_limit}


def test_slo_search_on_a_simulated_server_matches_queueing_theory() -> None:
    """One unbatched worker, every job exactly 1 s, Poisson arrivals: M/D/1, whose mean
    sojourn is 1 + rho / (2 (1 - rho)). Under an SLO of 5 s: rho = 8/9 jobs per second."""
    rng = np.random.default_rng(5)
    unit_gaps = rng.exponential(1.0, size=40_000)

    def mean_jct(rate: float) -> float:
        arrivals = np.cumsum(unit_gaps) / rate
        jobs = [SimJob(i, float(t), 10, 10.0) for i, t in enumerate(arrivals)]
        done = Simulation(UNIT, "fcfs", "none").run(jobs)
        return float(np.mean([job.jct_s for job in done]))

    search = stats.max_rate_under_slo(mean_jct, 5.0, low=0.3, high=0.95)
    assert search.max_rate == pytest.approx(8 / 9, rel=0.05)


def test_simulated_utilization_is_the_offered_load() -> None:
    rng = np.random.default_rng(8)
    arrivals = np.cumsum(rng.exponential(1 / 0.6, size=5000))  # 0.6 jobs/s of 1 s jobs
    jobs = [SimJob(i, float(t), 10, 10.0) for i, t in enumerate(arrivals)]
    simulation = Simulation(UNIT, "fcfs", "none")
    done = simulation.run(jobs)
    span = max(j.finish_s for j in done) - min(j.arrival_s for j in done)
    assert simulation.busy_s / span == pytest.approx(0.6, abs=0.03)


def test_measured_utilization_counts_each_worker_once() -> None:
    def result(index: int, worker: str, start: float, end: float) -> RequestResult:
        return RequestResult(
            index=index,
            prompt_id=index,
            output_tokens=1,
            true_output_tokens=1,
            arrival_s=0.0,
            submitted_s=0.0,
            finished_s=end,
            state="JOB_STATE_DONE",
            server_queue_wait_s=start,
            server_completion_s=end,
            worker_id=worker,
        )

    # Worker a busy 0-4 (two overlapping jobs of a batch), worker b 0-2; span 4 s, 2 workers.
    results = [result(0, "a", 0, 4), result(1, "a", 1, 3), result(2, "b", 0, 2)]
    assert measured_utilization(results, workers=2) == pytest.approx(6 / 8)


def test_only_jobs_that_found_the_system_empty_count_as_idle_arrivals() -> None:
    def result(index: int, sent: float, end: float, wait: float, ok: bool = True) -> RequestResult:
        return RequestResult(
            index=index,
            prompt_id=index,
            output_tokens=1,
            true_output_tokens=1,
            arrival_s=sent,
            submitted_s=sent,
            finished_s=end,
            state="JOB_STATE_DONE" if ok else "JOB_STATE_FAILED",
            server_queue_wait_s=wait,
        )

    one_round = [
        result(0, 0.0, 2.0, 0.001),  # empty system
        result(1, 1.0, 3.0, 0.5),  # job 0 still running
        result(2, 2.5, 4.0, 0.3),  # job 1 still running (finishes at 3)
        result(3, 5.0, 6.0, 0.002),  # everything before it done
        result(4, 7.0, math.nan, 0.0, ok=False),  # failed: never counted, busy for good
        result(5, 9.0, 10.0, 0.004),
    ]
    # Listed out of order: the job that was sent first decides, not the list's order.
    assert idle_arrival_waits(list(reversed(one_round))) == [0.001, 0.002]
    summary = summarize_idle_arrivals([one_round, one_round[:1]])
    assert summary["jobs"] == 3
    assert summary["p50_queue_wait_ms"] == pytest.approx(1.0)
    assert summary["mean_queue_wait_ms"] == pytest.approx(4 / 3)
    assert summarize_idle_arrivals([[]]) == {"jobs": 0}


def test_the_share_dispatched_before_prediction_sums_the_rounds_counts() -> None:
    rounds = [
        {"submitted": 10, "rescored": 6, "prediction_unneeded": 3, "prediction_late": 1},
        {"submitted": 10, "rescored": 2, "prediction_unneeded": 7, "prediction_fallback": 1},
    ]
    summary = summarize_prediction_counts(rounds)
    assert summary["counts"] == {
        "submitted": 20,
        "rescored": 8,
        "prediction_unneeded": 10,
        "prediction_late": 1,
        "prediction_fallback": 1,
        "prediction_skipped": 0,
    }
    assert summary["dispatched_before_prediction"] == pytest.approx(11 / 20)
    # A policy that never asks the predictor has no share, not a share of zero.
    fcfs = summarize_prediction_counts([{"submitted": 10}])
    assert fcfs["dispatched_before_prediction"] is None
    assert fcfs["counts"]["submitted"] == 10


def test_hrrn_serves_the_highest_response_ratio() -> None:
    queue = HrrnQueue(UNIT)
    # Predicted service: 10 tokens = 1 s, 100 tokens = 10 s.
    queue.push("long-old", JobFeatures(arrival_s=EPOCH_S, predicted_tokens=100))
    queue.push("short-new", JobFeatures(arrival_s=EPOCH_S + 8, predicted_tokens=10))
    # At t=9: long (9 + 10) / 10 = 1.9; short (1 + 1) / 1 = 2.0 -> the short one.
    assert queue.pop(EPOCH_S + 9) == "short-new"
    queue.push("short-newer", JobFeatures(arrival_s=EPOCH_S + 20, predicted_tokens=10))
    # At t=21: long (21 + 10) / 10 = 3.1 beats short (1 + 1) / 1 = 2: waiting pays.
    assert queue.pop(EPOCH_S + 21) == "long-old"
    assert queue.pop(EPOCH_S + 21) == "short-newer"
    assert queue.pop(EPOCH_S + 21) is None and len(queue) == 0


def test_hrrn_bounds_the_wait_that_sjf_lets_grow() -> None:
    rng = np.random.default_rng(2)
    tokens = np.clip(rng.lognormal(3.0, 1.2, size=3000).astype(int), 1, 600)
    arrivals = np.cumsum(rng.exponential(1 / 0.9 / (UNIT.step_s(1) * tokens.mean()), 3000))

    def max_wait(policy: str) -> float:
        pairs = zip(arrivals, tokens, strict=True)
        jobs = [SimJob(i, float(a), int(t), float(t)) for i, (a, t) in enumerate(pairs)]
        done = Simulation(UNIT, policy, "none").run(jobs)
        return max(job.start_s - job.arrival_s for job in done)

    assert max_wait("hrrn") < max_wait("sjf-oracle")


def test_policy_entries_with_their_own_guard_and_aging() -> None:
    assert parse_entry("ssjf") == GridEntry("ssjf")
    assert parse_entry("ssjf:noguard") == GridEntry("ssjf", guard_s=0.0)
    assert parse_entry("sjf-oracle:guard=12.5") == GridEntry("sjf-oracle", guard_s=12.5)
    assert parse_entry("ssjf:aging=2:noguard") == GridEntry("ssjf", 0.0, 2.0)
    assert guard_for("ssjf", 5.0) == 5.0 and guard_for("ssjf:noguard", 5.0) == 0.0
    assert aging_for("ssjf", 0.5) == 0.5 and aging_for("ssjf:aging=3", 0.5) == 3.0
    assert known_policy("hrrn", simulated=True) and not known_policy("hrrn", simulated=False)
    assert known_policy("ssjf:aging=10", simulated=True)
    for bad in ("ssjf:guard=soon", "ssjf:aging=11", "ssjf:aging=-1", "ssjf:aging=nan",
                "ssjf:noguard:guard=3", "ssjf:aging=1:aging=2", "ssjf:later", "lifo"):  # fmt: skip
        assert not known_policy(bad, simulated=True), bad
    with pytest.raises(ValueError, match="given twice"):
        parse_entry("ssjf:guard=1:noguard")


def test_sync_entries_run_the_scheduler_with_synchronous_prediction(tmp_path) -> None:
    """``ssjf:sync`` is the same policy and guard, with every job waiting for its prediction:
    only the real stack has a submit path to make synchronous."""
    from services.bench.runner import BenchConfig, _scheduler_args

    assert parse_entry("ssjf:guard=10:sync") == GridEntry("ssjf", 10.0, sync=True)
    assert asynchronous_twin("ssjf:sync:guard=10") == "ssjf:guard=10"
    assert asynchronous_twin("ssjf:guard=10") == "ssjf:guard=10"
    assert known_policy("ssjf:sync", simulated=False)
    assert not known_policy("ssjf:sync", simulated=True)
    config = BenchConfig(out_dir=tmp_path, policies=["ssjf:sync"], batchings=["none"], loads=[0.9])

    def mode(spec: str) -> str:
        args = _scheduler_args(config, spec)
        return args[args.index("--prediction-mode") + 1]

    assert mode("ssjf:sync") == "sync" and mode("ssjf") == "async"
    assert mode("ssjf:noguard:sync") == "sync"


def test_azure_lengths_keep_the_order_and_take_the_trace_distribution() -> None:
    items = [PromptLength(i, f"p{i}", tokens) for i, tokens in enumerate([5, 500, 50, 50, 5000])]
    target = azure_generated_tokens("azure-conversation", None)  # the vendored column
    mapped = map_lengths_to(items, target)
    lengths = [item.output_tokens for item in mapped]
    assert lengths[0] < lengths[2] == lengths[3] < lengths[1] < lengths[4]
    assert min(target) <= min(lengths) and max(lengths) <= max(target)


def test_the_served_models_own_workload_is_vendored_with_held_out_prompts_only() -> None:
    from services.predictor.training import split_dataset

    items, source = load_workload("smollm2-135m-instruct", data_dir=None)
    assert "alpaca_smollm2-135m-instruct.jsonl" in source and len(items) > 100
    labels = load_dataset(SERVED_MODEL_LABELS)
    held_out = set(split_dataset(labels).test)
    answered = labels.lengths_for("smollm2-135m-instruct")
    for item in items:
        assert item.prompt_id in held_out
        assert item.output_tokens == answered[item.prompt_id]


def test_mixed_stream_asks_for_every_llm() -> None:
    items, source = load_workload("vicuna-13b,gpt4_0314", data_dir=None)
    assert {item.llm for item in items} == {"vicuna-13b", "gpt4_0314"}
    assert "alpaca_gpt4_0314.jsonl" in source
    requests = build_requests(items, 400, 5.0, 16.0, seed=1)
    share = sum(r.llm == "gpt4_0314" for r in requests) / len(requests)
    assert 0.4 < share < 0.6


def test_simulate_summary_schema(tmp_path: Path) -> None:
    config = SimulateConfig(
        out_dir=tmp_path,
        policies=["fcfs", "ssjf", "ssjf:noguard", "hrrn", "sjf-prompt", "sjf-oracle"],
        batchings=["none"],
        loads=[0.9],
        requests=900,
        rounds=3,
        prediction_noise=0.5,  # no proxy model needed: noisy true lengths
        max_wait_s=5.0,
        resamples=100,
        slo_search=True,
        slo_requests=600,
        slo_seeds=2,
        data_dir=None,
    )
    run_simulations(config)
    summary = json.loads((tmp_path / "summary.json").read_text())
    provenance = summary["provenance"]
    assert provenance["command"] is not None and len(provenance["git_commit"]) == 40
    assert provenance["machine"]["cpus"] >= 1 and provenance["machine"]["cpu_model"]
    assert len(provenance["machine"]["load_average_1_5_15m"]) == 3
    assert "predictor_version" in provenance
    runs = {run["policy"]: run for run in summary["runs"]}
    assert set(runs) == set(config.policies)
    for run in runs.values():
        assert 0.5 < run["realized_utilization"] <= 1.0
        assert run["max_queue_wait_s"] <= run["max_jct_s"]
        assert run["requests"] == 900 and run["rounds"] == 3
    assert runs["ssjf:noguard"]["max_wait_s"] == 0.0 and runs["ssjf"]["max_wait_s"] == 5.0
    (row,) = summary["comparisons"]
    assert row["jobs_per_policy"] == 900 and row["rounds"] == 3
    for policy, entry in row["policies"].items():
        for name in ("mean_jct_over_fcfs", "p99_jct_over_fcfs"):
            assert entry[name]["ci_low"] <= entry[name]["value"] <= entry[name]["ci_high"]
        assert ("oracle_gain_fraction" in entry) == (policy != "sjf-oracle")
    slo = summary["slo_throughput"]["none"]
    assert slo["slo_s"]["mean"] == pytest.approx(5 * slo["unloaded_mean_jct_s"])
    assert slo["slo_s"]["p99"] == pytest.approx(3 * slo["unloaded_p99_jct_s"])
    assert slo["unloaded_p99_jct_s"] > slo["unloaded_mean_jct_s"]
    assert set(slo["ratios_to_fcfs"]) == set(config.policies) - {"fcfs"}
    assert slo["policies"]["fcfs"]["mean"]["max_rate_rps"] > 0
    for plot in ("jct_cdf.png", "mean_jct_vs_load.png", "ratios.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
    assert "oracle gain" in report.format_intervals(summary["comparisons"])
    assert "ssjf:noguard" in report.format_starvation(summary["runs"])


def test_bench_and_simulate_accept_their_own_policies() -> None:
    from services.cli import build_parser

    parser = build_parser()
    simulate = parser.parse_args(["simulate", "--policies", "fcfs,hrrn,ssjf:guard=20"])
    assert simulate.policies == ["fcfs", "hrrn", "ssjf:guard=20"]
    bench = parser.parse_args(["bench", "--policies", "fcfs,sjf-prompt,ssjf:noguard"])
    assert bench.policies == ["fcfs", "sjf-prompt", "ssjf:noguard"]
    assert parser.parse_args(["simulate", "--prediction-cpu-ms", "11"]).prediction_cpu_ms == 11
    assert parser.parse_args(["bench", "--saturation-jobs", "160"]).saturation_jobs == 160
    assert parser.parse_args(["bench", "--recalibrate", "pooled"]).recalibrate == "pooled"
    for bad in (
        ["bench", "--saturation-jobs", "0"],
        ["bench", "--saturation-jobs", "many"],
        ["bench", "--policies", "hrrn"],
        ["simulate", "--policies", "ssjf,ssjf"],
        ["simulate", "--prediction-cpu-ms", "-1"],
        ["simulate", "--prediction-cpu-ms", "nan"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_revalidation_rebuilds_each_rounds_calibration() -> None:
    from services.bench.runner import file_safe, round_models

    first = UNIT.scaled(2.0, load_factor=2.0)
    summary = {
        "latency_models": {
            "none": {
                "recalibrated": [
                    {"load": 0.9, "round": 0, "load_factor": 2.0},
                    {"load": 0.9, "round": 1, "load_factor": 3.0},
                    {"load": 0.5, "round": 0, "load_factor": 9.0},
                ]
            }
        }
    }
    run = {"batching": "none", "load": 0.9, "rounds": 2}
    models = round_models(summary, run, first)
    assert [m.step_s(1) for m in models] == pytest.approx([0.2, 0.3])
    # An older summary without per-round calibrations: the saved model for every round.
    assert round_models({}, run, first) == [first, first]
    assert file_safe("ssjf:guard=20") == "ssjf-guard20"


def test_a_sync_entry_is_compared_with_its_asynchronous_twin() -> None:
    """Beside the ratios to FCFS, ``ssjf:sync`` gets the paired ratio ssjf / ssjf:sync."""
    from services.bench.report import format_intervals, interval_comparisons

    rng = np.random.default_rng(1)
    rounds = []
    for _ in range(3):
        sync = rng.exponential(1.0, 200) + 0.1
        rounds.append({"fcfs": 2 * sync, "ssjf": 0.5 * sync, "ssjf:sync": sync})
    rows = interval_comparisons({("none", 0.9): rounds}, resamples=200)
    twin = rows[0]["policies"]["ssjf:sync"]["async_twin_mean_jct_over_this"]
    assert twin["value"] == pytest.approx(0.5)
    assert twin["ci_low"] == pytest.approx(0.5) and twin["ci_high"] == pytest.approx(0.5)
    assert "async_twin_mean_jct_over_this" not in rows[0]["policies"]["ssjf"]
    assert "(prediction asynchronous) / ssjf:sync: 0.50 [0.50, 0.50]" in format_intervals(rows)


def test_a_guarded_or_aged_entry_reports_the_share_of_the_unguarded_gain_it_keeps() -> None:
    """FCFS 2x, unguarded SSJF 1x, an aged SSJF 1.25x the same jobs: the aged entry keeps
    (2 - 1.25) / (2 - 1) = 0.75 of the unguarded gain; the unguarded one has no such line."""
    from services.bench.report import format_intervals, interval_comparisons

    rng = np.random.default_rng(2)
    rounds = []
    for _ in range(3):
        jobs = rng.exponential(1.0, 200) + 0.1
        rounds.append({"fcfs": 2 * jobs, "ssjf:noguard": jobs, "ssjf:aging=1": 1.25 * jobs})
    rows = interval_comparisons({("none", 0.9): rounds}, resamples=200)
    kept = rows[0]["policies"]["ssjf:aging=1"]["unguarded_gain_kept"]
    assert kept["value"] == pytest.approx(0.75)
    assert "unguarded_gain_kept" not in rows[0]["policies"]["ssjf:noguard"]
    assert "ssjf:aging=1 keeps 0.75 [0.75, 0.75] of ssjf:noguard's" in format_intervals(rows)


def test_policies_take_turns_in_reversed_order_every_other_round() -> None:
    policies = ["fcfs", "ssjf", "sjf-oracle"]
    orders = [turn_order(policies, r) for r in range(4)]
    assert orders[0] == orders[2] == policies
    assert orders[1] == orders[3] == ["sjf-oracle", "ssjf", "fcfs"]
    # Over a pair of rounds every policy's mean position is the same: none runs first more.
    positions = {p: sum(order.index(p) for order in orders[:2]) for p in policies}
    assert len(set(positions.values())) == 1
    assert policies == ["fcfs", "ssjf", "sjf-oracle"]  # the caller's list is not reordered


def test_pooled_calibration_runs_at_the_lower_median_of_the_measurements() -> None:
    def measured(capacity: float) -> Calibration:
        return Calibration(UNIT, UNIT, capacity)

    first, slow, fast = measured(12.0), measured(9.0), measured(13.5)
    assert lower_median_calibration([first]) is first
    # Of two, the lower: a high outlier never sets a round's rate.
    assert lower_median_calibration([first, fast]) is first
    assert lower_median_calibration([first, slow]) is slow
    assert lower_median_calibration([fast, slow, first]) is first
    assert lower_median_calibration([fast, slow, first, measured(12.5)]) is first


def test_the_machine_record_names_the_cpu_and_its_speed_relevant_extensions() -> None:
    cpuinfo = (
        "processor\t: 0\nmodel name\t: AMD EPYC 9B14\n"
        "flags\t\t: fpu sse2 avx avx2 avx512f avx512_vnni sha_ni\n"
    )
    machine = describe_machine(cpuinfo)
    assert machine["cpu_model"] == "AMD EPYC 9B14"
    assert machine["cpu_flags"] == ["avx2", "avx512f", "avx512_vnni"]
    assert describe_machine("")["cpu_flags"] == []
    assert describe_machine()["cpus"] >= 1


def test_a_bad_environment_value_is_a_usage_error_not_a_crash(monkeypatch) -> None:
    from services.cli import build_parser

    monkeypatch.setenv("SSJF_SATURATION_JOBS", "12")
    assert build_parser().parse_args(["bench"]).saturation_jobs == 12
    monkeypatch.setenv("SSJF_SATURATION_JOBS", "0")
    parser = build_parser()  # building the parser (and so --help) must not fail on it
    with pytest.raises(SystemExit):
        parser.parse_args(["bench"])
    # The flag still wins over the variable.
    assert parser.parse_args(["bench", "--saturation-jobs", "3"]).saturation_jobs == 3
