"""``ssjf bench``: the grid of (batching, policy, load) runs on the real stack.

For each batching mode and policy a fresh stack starts (``LocalStack``: embedded Redis,
predictor, scheduler, workers as processes), unless ``--server`` names a running one. The
first stack of each batching mode is calibrated (the latency model of its worker), which
gives FCFS's capacity in that mode; each load is then a Poisson (or Azure-trace) arrival rate
of ``load * capacity``. With ``--recalibrate round`` (the default) the worker's speed under
load is measured again before every round and that round's rate follows it, so a machine
whose speed drifts still runs each round at the load it claims; the load each round really
ran at is reported beside it (``realized_utilization``, from the workers' busy time).

Every run is replayed in the simulator (one worker: at the speed that round had, fitted to
its busy time; several workers: with the round's calibrated model), the check that the
simulator predicts the real stack, with its error per point.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from services.bench import report, stats
from services.bench.calibrate import (
    UnattributedJobs,
    capacity_rps,
    fit_level,
    fit_shape,
    replay_run,
    simulate_measured,
    summed_busy_s,
)
from services.bench.latency import LatencyModel
from services.bench.loadgen import RequestResult, queue_counters, run_open_loop
from services.bench.realgen import DEFAULT_LABELS, load_greedy_lengths
from services.bench.simulator import aging_for, base_policy, guard_for, synchronous_prediction
from services.bench.workload import PromptLength, build_requests, llm_names, load_workload

log = logging.getLogger(__name__)

MIN_REQUESTS = 20


@dataclass
class BenchConfig:
    out_dir: Path
    policies: list[str]
    batchings: list[str]
    loads: list[float]
    requests: int = 150
    # When set, each run's request count is this many seconds of arrivals at its rate
    # (``requests`` is ignored): batched modes, serving faster, get more jobs in equal time.
    duration_s: float | None = None
    # Each run is split into this many rounds, the policies taking turns round by round (in
    # reversed order every other round), so that a shared machine's changing speed hits
    # every policy alike.
    rounds: int = 1
    # Workload jobs sent at once to measure the worker's speed under load (calibrate.py).
    saturation_jobs: int = 40
    length_scale: float = 16.0
    # One LLM, or several comma-separated (a mixed stream, one queue each).
    llm: str = "vicuna-13b"
    lengths: str = "alpaca"
    max_batch_size: int = 4
    workers: int = 1
    # "round": measure the worker's speed under load before every round and set that
    # round's rate from it; "pooled": measure before every round, set the rate from the
    # lower median of all measurements so far; "once": one calibration per batching mode.
    recalibrate: str = "round"
    resamples: int = 1000
    slo_search: bool = False
    slo_factor: float = 5.0
    p99_slo_factor: float = 3.0
    arrivals: str = "poisson"
    seed: int = 0
    aging_rate: float = 0.0
    max_wait_s: float = 0.0
    data_dir: Path | None = None
    server: str | None = None
    timeout_s: float = 600.0
    # How long a stack may take to come up: on a loaded 2-core machine, minutes.
    stack_ready_timeout_s: float = 600.0
    extra_scheduler_args: list[str] = field(default_factory=list)
    extra_worker_args: list[str] = field(default_factory=list)
    # "replay": workers generate exactly the replayed lengths (any model; the tiny one by
    # default). "real": the LLM answers to EOS, greedy (services/bench/realgen.py), with the
    # greedy lengths in ``labels`` as the oracle.
    generation: str = "replay"
    labels: Path | None = None
    model: str = "tiny-llama"


def _scheduler_args(config: BenchConfig, spec: str) -> list[str]:
    return [
        "--default-llm",
        llm_names(config.llm)[0],
        "--allow-oracle",
        "--aging-rate",
        str(aging_for(spec, config.aging_rate)),
        "--max-wait-s",
        str(guard_for(spec, config.max_wait_s)),
        "--prediction-mode",
        "sync" if synchronous_prediction(spec) else "async",
        *config.extra_scheduler_args,
    ]


@contextlib.contextmanager
def stack_for(config: BenchConfig, policy: str, batching: str) -> Iterator[str]:
    """The address of a stack serving ``policy`` (a grid entry, e.g. ``ssjf:guard=10``)
    with ``batching``: a fresh local one, or the ``--server`` the user started (then its
    settings are the user's to match)."""
    if config.server:
        yield config.server
        return
    from services.stack.launcher import LocalStack, StackConfig, free_port

    stack_config = StackConfig(
        port=free_port(),
        workers=config.workers,
        policy=base_policy(policy),
        batching=batching,
        max_batch_size=config.max_batch_size,
        # Every worker serves every LLM of a mixed stream (one queue per LLM).
        served_model_name=",".join(llm_names(config.llm)),
        model=config.model,
        scheduler_args=_scheduler_args(config, policy),
        # One intra-op thread: on a small machine the proxy model shares the cores with the
        # LLM, and ONNX Runtime's spinning worker threads would take the worker's CPU.
        predictor_args=["--threads", "1"],
        worker_args=config.extra_worker_args,
        log_dir=config.out_dir / "logs" / f"{file_safe(policy)}_{batching}",
        ready_timeout_s=config.stack_ready_timeout_s,
        log_level="warning",
    )
    with LocalStack(stack_config) as stack:
        yield stack.address


def file_safe(policy: str) -> str:
    """A grid entry as part of a file name: ``ssjf:guard=10`` -> ``ssjf-guard10``."""
    return policy.replace(":", "-").replace("=", "")


def turn_order(policies: Sequence[str], round_index: int) -> list[str]:
    """The order the policies take their turns in round ``round_index``: as given in even
    rounds, reversed in odd ones. A machine that speeds up or slows down steadily over a
    pair of rounds then favours no policy (a counterbalanced, ABBA design); with one fixed
    order the first policy would always run on the earlier, differently loaded, minutes."""
    return list(policies) if round_index % 2 == 0 else list(reversed(policies))


def run_name(policy: str, batching: str, load: float) -> str:
    return f"{file_safe(policy)}_{batching}_load{load:.2f}"


# What became of each job's background prediction, as the scheduler counts it
# (services/scheduler/prediction.py): with asynchronous prediction every SSJF job ends in
# exactly one of these; under a policy that needs no prediction, in none.
PREDICTION_OUTCOMES = (
    "rescored",  # predicted while queued: moved to its place
    "prediction_unneeded",  # dispatched within the grace: never predicted
    "prediction_late",  # dispatched while its prediction was on the way
    "prediction_fallback",  # the predictor gave no answer
    "prediction_skipped",  # too many predictions in flight
)
# The counters a run reads back: every job submitted, and its prediction's outcome.
COUNTED = ("submitted", *PREDICTION_OUTCOMES)


def _run_round(
    address: str,
    items: Sequence[PromptLength],
    config: BenchConfig,
    policy: str,
    rate: float,
    round_index: int,
    label: str,
) -> tuple[list[RequestResult], dict[str, int]]:
    """One open-loop run of ``policy`` at ``rate``; round ``r`` replays seed ``seed + r``.
    Returns its jobs and the scheduler's counts for the round (``submitted`` and
    ``PREDICTION_OUTCOMES``)."""
    count = round_jobs(config, rate)
    requests = build_requests(
        items,
        count,
        rate,
        config.length_scale,
        config.seed + round_index,
        config.arrivals,
        config.data_dir,
    )
    if config.generation == "real":
        requests = [dataclasses.replace(request, real=True) for request in requests]
    bar = tqdm(total=len(requests), desc=label, unit="job", leave=False)
    before = asyncio.run(queue_counters(address))
    results = asyncio.run(
        run_open_loop(
            address,
            requests,
            config.llm,
            oracle=policy == "sjf-oracle",
            timeout_s=config.timeout_s,
            on_done=lambda _: bar.update(),
        )
    )
    # Every job has ended here, so each prediction's outcome is settled: a job leased within
    # the grace is decided within milliseconds, far less than any job takes.
    after = asyncio.run(queue_counters(address))
    bar.close()
    for result in results:
        result.round = round_index
    counts = {name: after[name] - before[name] for name in COUNTED}
    return results, counts


def round_jobs(config: BenchConfig, rate: float) -> int:
    """Jobs in one round: ``requests``, or ``duration_s / rounds`` seconds of arrivals."""
    if config.duration_s is None:
        return config.requests
    return max(round(rate * config.duration_s / config.rounds), MIN_REQUESTS)


def realized_utilization(results: Sequence[RequestResult], workers: int) -> float:
    """The load a round really ran at: each worker's busy time (union of its jobs' lease to
    last token; the worker is read back from the job's record) over workers x the round's
    span (first submission to last answer)."""
    ok = [r for r in results if r.ok]
    if not ok:
        return math.nan
    span = max(r.finished_s for r in ok) - min(r.submitted_s for r in results)
    # Unknown worker (record expired): counted as a worker of its own, which can only
    # overstate the busy time, never hide it.
    busy = summed_busy_s(
        (
            r.worker_id or f"?{r.index}",
            r.submitted_s + r.server_queue_wait_s,
            r.submitted_s + r.server_completion_s,
        )
        for r in ok
    )
    return busy / (workers * span) if span > 0 else math.nan


def idle_arrival_waits(one_round: Sequence[RequestResult]) -> list[float]:
    """Queue waits (s) of the round's jobs that found the system empty: every earlier job of
    the round had finished when they were sent. No policy has a reason to make such a job
    wait, so its wait is the dispatch path's own cost (Submit, the first-stage score, the
    lease), and SSJF's against FCFS's shows whether anything still waits for a prediction."""
    busy_until = -math.inf
    waits = []
    for result in sorted(one_round, key=lambda r: r.submitted_s):
        if result.ok and result.submitted_s > busy_until:
            waits.append(result.server_queue_wait_s)
        # A job that never finished keeps the system busy for the rest of the round.
        finished = result.finished_s if result.ok else math.inf
        busy_until = max(busy_until, finished)
    return waits


def summarize_idle_arrivals(rounds: Sequence[Sequence[RequestResult]]) -> dict[str, Any]:
    """Mean (with its 95% t half-width) and median queue wait in ms of the jobs that arrived
    to an empty system (``idle_arrival_waits``), over all rounds."""
    waits_ms = 1e3 * np.array(
        [w for one_round in rounds for w in idle_arrival_waits(one_round)], dtype=float
    )
    if len(waits_ms) == 0:
        return {"jobs": 0}
    return {
        "jobs": len(waits_ms),
        "mean_queue_wait_ms": float(waits_ms.mean()),
        "mean_half_width_95_ms": stats.half_width_t(waits_ms),
        "p50_queue_wait_ms": float(np.median(waits_ms)),
    }


def idle_line(idle: dict[str, Any]) -> str:
    if not idle["jobs"]:
        return "no job found the system empty"
    return (
        f"{idle['jobs']} found it empty: queue wait {idle['mean_queue_wait_ms']:.1f} "
        f"+- {idle['mean_half_width_95_ms']:.1f} ms (p50 {idle['p50_queue_wait_ms']:.1f})"
    )


def summarize_prediction_counts(counts: Sequence[Mapping[str, int]]) -> dict[str, Any]:
    """The rounds' scheduler counts summed, and the share of submitted jobs a worker took
    before their prediction could re-score them (None where no job was predicted)."""
    total: Counter[str] = Counter()
    for one_round in counts:
        total.update(one_round)
    predicted = sum(total[name] for name in PREDICTION_OUTCOMES)
    before = total["prediction_unneeded"] + total["prediction_late"]
    return {
        "counts": {name: total[name] for name in COUNTED},
        "dispatched_before_prediction": before / total["submitted"] if predicted else None,
    }


def predictions_line(predictions: dict[str, Any]) -> str:
    share = predictions["dispatched_before_prediction"]
    return "" if share is None else f", {100 * share:.0f}% dispatched before their prediction"


def summarize_rounds(
    rounds: Sequence[Sequence[RequestResult]],
    policy: str,
    batching: str,
    load: float,
    rate: float,
    capacity: float,
    workers: int = 1,
    prediction_counts: Sequence[Mapping[str, int]] = (),
) -> dict[str, Any]:
    """One run's numbers from all its rounds' jobs (and the scheduler's counts) together."""
    results = [r for one_round in rounds for r in one_round]
    ok = [r for r in results if r.ok]
    # Throughput: completed jobs per second of the rounds' spans (arrival to last answer).
    span = sum(
        max((r.finished_s for r in one_round if r.ok), default=0.0)
        - min(r.submitted_s for r in one_round)
        for one_round in rounds
    )
    summary = report.summarize(
        [r.jct_s for r in ok],
        [r.ttft_s for r in ok],
        span,
        failed=len(results) - len(ok),
        queue_wait_s=[r.server_queue_wait_s for r in ok],
    )
    run: dict[str, Any] = {
        "policy": policy,
        "batching": batching,
        "load": load,
        "arrival_rate_rps": rate,
        "capacity_rps": capacity,
        "requests": len(results),
        "rounds": len(rounds),
        **summary,
        "server_mean_jct_s": _mean([r.server_completion_s for r in ok]),
        "server_mean_queue_wait_s": _mean([r.server_queue_wait_s for r in ok]),
        "prediction_fallbacks": sum(r.prediction_fallback for r in results),
        "idle_arrivals": summarize_idle_arrivals(rounds),
        "predictions": summarize_prediction_counts(prediction_counts),
        "workers": workers,
        "realized_utilization_by_round": [
            realized_utilization(one_round, workers) for one_round in rounds
        ],
    }
    run["realized_utilization"] = _mean(run["realized_utilization_by_round"])
    if failed := [r for r in results if not r.ok]:
        run["first_error"] = f"{failed[0].state}: {failed[0].error}"
    return run


def validate(
    rounds: Sequence[Sequence[RequestResult]],
    latency: LatencyModel | Sequence[LatencyModel],
    policy: str,
    batching: str,
    config: BenchConfig,
) -> dict[str, float]:
    """The simulator's mean JCT for exactly this run's jobs: each round replayed at the
    worker speed it had (``replay_run``: the round's model scaled until the simulated
    worker-seconds of service equal the measured ones, per worker by the job's worker_id).
    Several workers whose jobs do not all say which worker served them: the round's
    calibrated model as is (``latency`` per round), with ``config.workers`` workers."""
    models = [latency] * len(rounds) if isinstance(latency, LatencyModel) else list(latency)
    simulated_jct: list[float] = []
    factors: list[float] = []
    guard = guard_for(policy, config.max_wait_s)
    aging = aging_for(policy, config.aging_rate)
    for one_round, model in zip(rounds, models, strict=True):
        settings = (base_policy(policy), batching, config.max_batch_size)
        try:
            model, simulated = replay_run(
                one_round, model, *settings, aging, guard, workers=config.workers
            )
            factors.append(float(model.source["run_level_factor"]))
        except UnattributedJobs:
            simulated = simulate_measured(one_round, model, *settings, config.workers, aging, guard)
            factors.append(1.0)
        simulated_jct += [job.jct_s + model.overhead_s for job in simulated]
    predicted = float(np.mean(simulated_jct))
    measured = float(np.mean([r.jct_s for one_round in rounds for r in one_round if r.ok]))
    return {
        "simulated_mean_jct_s": predicted,
        "simulated_error_pct": 100 * (predicted / measured - 1),
        "run_level_factor": float(np.mean(factors)),
    }


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else math.nan


@dataclass
class Calibration:
    """A batching mode's latency model: its idle shape, and the level under load."""

    shape: LatencyModel
    latency: LatencyModel
    capacity_rps: float


class Calibrator:
    """Measures one batching mode's worker on the first policy's stack: the idle shape
    once, the level under load once or before every round (``--recalibrate``); with
    ``pooled``, every round runs at the lower median of all the levels measured so far."""

    def __init__(
        self,
        config: BenchConfig,
        address: str,
        policy: str,
        batching: str,
        items: Sequence[PromptLength],
    ) -> None:
        self.config, self.address, self.policy, self.batching = config, address, policy, batching
        self.scaled = [max(1, round(i.output_tokens / config.length_scale)) for i in items]
        self.saturation = build_requests(
            items, config.saturation_jobs, 1.0, config.length_scale, config.seed + 1000
        )
        self.llm = llm_names(config.llm)[0]
        self.measurements: list[Calibration] = []
        self.shape = fit_shape(
            address,
            self.llm,
            _median_prompt(items),
            batching,
            config.max_batch_size,
            base_policy(policy),
        )
        self.current = self.level()

    def level(self) -> Calibration:
        config = self.config
        latency = fit_level(
            self.address,
            self.llm,
            self.shape,
            self.saturation,
            base_policy(self.policy),
            self.batching,
            config.max_batch_size,
            config.workers,
        )
        capacity = capacity_rps(
            latency, self.scaled * 4, self.batching, config.max_batch_size, config.workers
        )
        self.current = Calibration(self.shape, latency, capacity)
        self.measurements.append(self.current)
        log.info("calibrated", extra={"batching": self.batching, "capacity": capacity})
        return self.current

    def for_round(self, round_index: int) -> Calibration:
        """The calibration a round runs at: measured again, unless this is the first round
        after the initial one or recalibration is off; pooled, the lower median of every
        measurement of this batching mode."""
        if self.config.recalibrate != "once" and round_index > 0:
            self.level()
        if self.config.recalibrate == "pooled":
            return lower_median_calibration(self.measurements)
        return self.current


def lower_median_calibration(measurements: Sequence[Calibration]) -> Calibration:
    """The measurement of median capacity, the lower of the two middle ones for an even
    count. One calibration burst's capacity scattered over 9.2-13.4 jobs/s across the 25
    rounds of bench/results/stack-precise, and the rounds measured high ran nearest
    saturation, where a queue and its JCTs grow without bound; the median of all
    measurements so far damps scatter that is noise, and the lower middle one errs towards
    a lighter load. Where the scatter is the machine really slowing down, as on this
    project's 2-core host (bench/results/stack-precise-pooled), it does not help: use
    ``round`` there."""
    ordered = sorted(measurements, key=lambda calibration: calibration.capacity_rps)
    return ordered[(len(ordered) - 1) // 2]


@contextlib.contextmanager
def stacks_for(
    config: BenchConfig, batching: str, items: Sequence[PromptLength]
) -> Iterator[tuple[dict[str, str], Calibrator]]:
    """Every policy's stack for ``batching``, up at once, and the mode's calibrator (on the
    first policy's stack). The runs interleave the policies: a shared machine's speed
    drifts, and so every policy meets the same drift instead of one getting the slow
    minutes."""
    with contextlib.ExitStack() as stacks:
        addresses = {
            policy: stacks.enter_context(stack_for(config, policy, batching))
            for policy in config.policies
        }
        first = config.policies[0]
        yield addresses, Calibrator(config, addresses[first], first, batching, items)


def _job_jcts(results: Sequence[RequestResult], count: int) -> np.ndarray:
    """Per-job JCT by the job's index in its round (NaN: failed), for the paired intervals."""
    values = np.full(count, np.nan)
    for r in results:
        if r.ok:
            values[r.index] = r.jct_s
    return values


def _meta(config: BenchConfig, items: Sequence[PromptLength], source: str) -> dict[str, Any]:
    scaled = [max(1, round(item.output_tokens / config.length_scale)) for item in items]
    return {
        "kind": "real stack",
        "provenance": report.provenance(None),
        "workload": {
            "source": source,
            "llm": config.llm,
            "lengths": config.lengths,
            "prompts": len(items),
            "length_scale": config.length_scale,
            "mean_output_tokens_replayed": float(np.mean(scaled)),
            "arrivals": config.arrivals,
            "generation": config.generation,
        },
        "config": {k: v for k, v in asdict(config).items() if k != "out_dir"},
        "latency_models": {},
    }


def _predictor_version(results: Sequence[RequestResult]) -> str | None:
    versions = sorted({r.predictor_version for r in results if r.predictor_version} - {"oracle"})
    return ",".join(versions) or None


def _load_items(config: BenchConfig) -> tuple[list[PromptLength], str]:
    if config.generation == "real":
        return load_greedy_lengths(config.labels or DEFAULT_LABELS)
    return load_workload(config.llm, config.data_dir, config.lengths)


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run the grid; writes summary.json, per-job files, the latency models and the plots."""
    items, source = _load_items(config)
    out = config.out_dir
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    meta = _meta(config, items, source)
    runs: list[dict[str, Any]] = []
    jcts: dict[tuple[str, str, float], list[float]] = {}
    points: dict[tuple[str, float], list[dict[str, np.ndarray]]] = {}
    versions: set[str] = set()
    compared: list[dict[str, Any]] = []
    for batching in config.batchings:
        with stacks_for(config, batching, items) as (addresses, calibrator):
            calibrator.current.latency.save(out / f"latency_{batching}.json")
            meta["latency_models"][batching] = {
                **calibrator.current.latency.to_dict(),
                "fcfs_capacity_rps": calibrator.current.capacity_rps,
                "recalibrated": [],
            }
            for load in config.loads:
                rounds: dict[str, list[list[RequestResult]]] = {p: [] for p in config.policies}
                counts: dict[str, list[dict[str, int]]] = {p: [] for p in config.policies}
                models: list[LatencyModel] = []
                capacities: list[float] = []
                point: list[dict[str, np.ndarray]] = []
                for round_index in range(config.rounds):
                    calibration = calibrator.for_round(round_index)
                    models.append(calibration.latency)
                    capacities.append(calibration.capacity_rps)
                    meta["latency_models"][batching]["recalibrated"].append(
                        {
                            "load": load,
                            "round": round_index,
                            "capacity_rps": calibration.capacity_rps,
                            "measured_capacity_rps": calibrator.current.capacity_rps,
                            "load_factor": calibration.latency.source.get("load_factor"),
                            "load_average": report.load_average(),
                        }
                    )
                    rate = load * calibration.capacity_rps
                    count = round_jobs(config, rate)
                    this_round = {}
                    for policy in turn_order(config.policies, round_index):
                        label = f"{run_name(policy, batching, load)} round {round_index + 1}"
                        results, round_counts = _run_round(
                            addresses[policy], items, config, policy, rate, round_index, label
                        )
                        rounds[policy].append(results)
                        counts[policy].append(round_counts)
                        this_round[policy] = _job_jcts(results, count)
                    point.append(this_round)
                points[(batching, load)] = point
                rate = load * float(np.mean(capacities))
                capacity = float(np.mean(capacities))
                for policy in config.policies:
                    run = summarize_rounds(
                        rounds[policy],
                        policy,
                        batching,
                        load,
                        rate,
                        capacity,
                        config.workers,
                        counts[policy],
                    )
                    run["capacity_rps_by_round"] = capacities
                    run["max_wait_s"] = guard_for(policy, config.max_wait_s)
                    run["aging_rate"] = aging_for(policy, config.aging_rate)
                    run.update(validate(rounds[policy], models, policy, batching, config))
                    runs.append(run)
                    results = [r for one_round in rounds[policy] for r in one_round]
                    if version := _predictor_version(results):
                        versions.add(version)
                    jcts[(policy, batching, load)] = [r.jct_s for r in results if r.ok]
                    name = run_name(policy, batching, load)
                    _write_jobs(out / "jobs" / f"{name}.jsonl", results)
                    tqdm.write(
                        f"{name}: mean JCT {run['mean_jct_s']:.3f}s (simulated "
                        f"{run.get('simulated_mean_jct_s', math.nan):.3f}s), p99 "
                        f"{run['p99_jct_s']:.3f}s, utilization "
                        f"{run['realized_utilization']:.2f}, {run['completed']}/"
                        f"{run['requests']} done, {idle_line(run['idle_arrivals'])}"
                        f"{predictions_line(run['predictions'])}"
                    )
                compared = report.interval_comparisons(points, config.resamples, config.seed)
                meta["provenance"]["predictor_version"] = ",".join(sorted(versions)) or None
                report.write_summary(out, runs, meta, compared)
    meta["provenance"]["load_average_at_end"] = report.load_average()
    report.write_summary(out, runs, meta, compared)
    title = f"SSJF on the real stack ({config.llm} lengths / {config.length_scale:g})"
    report.plot_jct_cdf(jcts, out / "jct_cdf.png", title)
    report.plot_mean_jct_vs_load(runs, out / "mean_jct_vs_load.png", title)
    if compared:
        report.plot_ratios(compared, out / "ratios.png", title)
    return {**meta, "runs": runs, "comparisons": compared}


def run_slo_search(config: BenchConfig) -> dict[str, Any]:
    """Throughput at a latency SLO on the real stack: per batching mode and policy, the
    highest arrival rate whose mean JCT stays under ``slo_factor`` x the unloaded mean JCT,
    and separately whose p99 JCT stays under ``p99_slo_factor`` x the unloaded p99 JCT
    (stats.SloTargets; solo JCTs from the calibrated model over the workload). Bisection
    over rates, ``requests`` jobs per evaluation (the same jobs at every rate), to 10%: each
    evaluation is a real run, so this is coarse and slow."""
    items, source = _load_items(config)
    meta = _meta(config, items, source)
    results_by_batching: dict[str, Any] = {}
    versions: set[str] = set()
    for batching in config.batchings:
        with stacks_for(config, batching, items) as (addresses, calibrator):
            latency, capacity = calibrator.current.latency, calibrator.current.capacity_rps
            targets = stats.SloTargets.from_solo_jcts(
                [latency.solo_jct_s(t) for t in calibrator.scaled],
                config.slo_factor,
                config.p99_slo_factor,
            )
            entry: dict[str, Any] = {
                **targets.describe(),
                "jobs_per_evaluation": config.requests,
                "job_streams": 1,
                "capacity_rps": capacity,
                "policies": {},
                "ratios_to_fcfs": {},
            }
            for policy in config.policies:
                cache: dict[float, np.ndarray] = {}

                def jcts(
                    rate: float,
                    policy: str = policy,
                    cache: dict[float, np.ndarray] = cache,
                    address: str = addresses[policy],
                    batching: str = batching,
                ) -> np.ndarray:
                    if rate not in cache:
                        label = f"SLO search {file_safe(policy)} {batching} {rate:.2f}/s"
                        results, _ = _run_round(address, items, config, policy, rate, 0, label)
                        cache[rate] = np.array([r.jct_s for r in results if r.ok])
                        if version := _predictor_version(results):
                            versions.add(version)
                    return cache[rate]

                entry["policies"][policy] = {}
                for name, (statistic, limit) in targets.statistics().items():
                    search = stats.max_rate_under_slo(
                        lambda rate, statistic=statistic: statistic(jcts(rate)),
                        limit,
                        low=0.3 * capacity,
                        high=1.2 * capacity,
                        relative_tolerance=0.1,
                        max_evaluations=8,
                        max_expansions=1,
                    )
                    entry["policies"][policy][name] = {
                        **search.to_dict(),
                        "max_load": search.max_rate / capacity,
                        "per_stream_rps": [search.max_rate],
                        "any_lower_bound_only": search.unbounded,
                        "any_infeasible": search.infeasible,
                    }
            if "fcfs" in entry["policies"]:
                fcfs = entry["policies"]["fcfs"]
                for policy, found in entry["policies"].items():
                    if policy == "fcfs":
                        continue
                    entry["ratios_to_fcfs"][policy] = {
                        name: {
                            "value": found[name]["max_rate_rps"] / fcfs[name]["max_rate_rps"]
                            if fcfs[name]["max_rate_rps"] > 0
                            else math.nan,
                            "half_width_95": math.nan,
                        }
                        for name in ("mean", "p99")
                    }
            results_by_batching[batching] = entry
    meta["slo_throughput"] = results_by_batching
    meta["provenance"]["predictor_version"] = ",".join(sorted(versions)) or None
    meta["provenance"]["load_average_at_end"] = report.load_average()
    report.write_summary(config.out_dir, [], meta, [])
    return meta


def _median_prompt(items: Sequence[PromptLength]) -> str:
    """A prompt of typical length, so calibration prefills what the workload prefills."""
    ordered = sorted(items, key=lambda item: len(item.prompt))
    return ordered[len(ordered) // 2].prompt


def _write_jobs(path: Path, results: Sequence[RequestResult]) -> None:
    with path.open("w") as out:
        for result in results:
            out.write(json.dumps(result.to_dict()) + "\n")


def read_jobs(path: Path) -> list[RequestResult]:
    """The per-request records of one run, as ``_write_jobs`` wrote them."""
    derived = {"jct_s", "ttft_s"}
    with path.open() as lines:
        return [
            RequestResult(**{k: v for k, v in json.loads(line).items() if k not in derived})
            for line in lines
            if line.strip()
        ]


def round_models(
    summary: dict[str, Any], run: dict[str, Any], first: LatencyModel
) -> list[LatencyModel]:
    """The latency model each round of ``run`` was calibrated to: the saved (first) model
    rescaled by that round's measured level (``latency_models.<batching>.recalibrated``)."""
    entries = [
        entry
        for entry in summary.get("latency_models", {})
        .get(run["batching"], {})
        .get("recalibrated", [])
        if float(entry["load"]) == float(run["load"])
    ]
    base = first.source.get("load_factor")
    if not entries or not base or len(entries) != int(run.get("rounds", len(entries))):
        return [first] * int(run.get("rounds", 1))
    return [first.scaled(float(entry["load_factor"]) / float(base)) for entry in entries]


def revalidate(run_dir: Path) -> list[dict[str, Any]]:
    """Replay every run of a finished ``ssjf bench`` output in the simulator again (with the
    current simulator code) and update its summary.json; returns the runs."""
    summary = json.loads((run_dir / "summary.json").read_text())
    settings = summary["config"]
    config = BenchConfig(
        out_dir=run_dir,
        policies=[],
        batchings=[],
        loads=[],
        max_batch_size=settings["max_batch_size"],
        aging_rate=settings["aging_rate"],
        max_wait_s=settings["max_wait_s"],
        workers=settings.get("workers", 1),
    )
    for run in summary["runs"]:
        name = run_name(run["policy"], run["batching"], run["load"])
        results = read_jobs(run_dir / "jobs" / f"{name}.jsonl")
        rounds = [
            [r for r in results if r.round == index] for index in sorted({r.round for r in results})
        ]
        latency = LatencyModel.load(run_dir / f"latency_{run['batching']}.json")
        run.update(validate(rounds, round_models(summary, run, latency), run["policy"],
                            run["batching"], config))  # fmt: skip
    meta = {
        k: v for k, v in summary.items() if k not in {"runs", "comparisons", "paper", "targets"}
    }
    report.write_summary(run_dir, summary["runs"], meta, summary.get("comparisons"))
    return summary["runs"]
