"""``ssjf bench``: the grid of (batching, policy, load) runs on the real stack.

For each batching mode and policy a fresh stack starts (``LocalStack``: embedded Redis,
predictor, scheduler, workers as processes), unless ``--server`` names a running one. The
first stack of each batching mode is calibrated (the latency model of its worker), which
gives FCFS's capacity in that mode; each load is then a Poisson (or Azure-trace) arrival rate
of ``load * capacity``. Every run is replayed in the simulator with the fitted model, the
check that the simulator predicts the real stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from services.bench import report
from services.bench.calibrate import capacity_rps, fit_level, fit_shape, replay_run
from services.bench.latency import LatencyModel
from services.bench.loadgen import RequestResult, run_open_loop
from services.bench.realgen import DEFAULT_LABELS, load_greedy_lengths
from services.bench.workload import PromptLength, build_requests, load_prompt_lengths

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
    # Each run is split into this many rounds, the policies taking turns round by round, so
    # that a shared machine's changing speed hits every policy alike.
    rounds: int = 1
    # Workload jobs sent at once to measure the worker's speed under load (calibrate.py).
    saturation_jobs: int = 40
    length_scale: float = 16.0
    llm: str = "vicuna-13b"
    max_batch_size: int = 4
    workers: int = 1
    arrivals: str = "poisson"
    seed: int = 0
    aging_rate: float = 0.0
    max_wait_s: float = 0.0
    data_dir: Path | None = None
    server: str | None = None
    timeout_s: float = 600.0
    extra_scheduler_args: list[str] = field(default_factory=list)
    extra_worker_args: list[str] = field(default_factory=list)
    # "replay": workers generate exactly the replayed lengths (any model; the tiny one by
    # default). "real": the LLM answers to EOS, greedy (services/bench/realgen.py), with the
    # greedy lengths in ``labels`` as the oracle.
    generation: str = "replay"
    labels: Path | None = None
    model: str = "tiny-llama"


def _scheduler_args(config: BenchConfig) -> list[str]:
    return [
        "--default-llm",
        config.llm,
        "--allow-oracle",
        "--aging-rate",
        str(config.aging_rate),
        "--max-wait-s",
        str(config.max_wait_s),
        *config.extra_scheduler_args,
    ]


@contextlib.contextmanager
def stack_for(config: BenchConfig, policy: str, batching: str) -> Iterator[str]:
    """The address of a stack serving ``policy`` with ``batching``: a fresh local one, or the
    ``--server`` the user started (then its settings are the user's to match)."""
    if config.server:
        yield config.server
        return
    from services.stack.launcher import LocalStack, StackConfig, free_port

    stack_config = StackConfig(
        port=free_port(),
        workers=config.workers,
        policy=policy,
        batching=batching,
        max_batch_size=config.max_batch_size,
        served_model_name=config.llm,
        model=config.model,
        scheduler_args=_scheduler_args(config),
        # One intra-op thread: on a small machine the proxy model shares the cores with the
        # LLM, and ONNX Runtime's spinning worker threads would take the worker's CPU.
        predictor_args=["--threads", "1"],
        worker_args=config.extra_worker_args,
        log_dir=config.out_dir / "logs" / f"{policy}_{batching}",
        log_level="warning",
    )
    with LocalStack(stack_config) as stack:
        yield stack.address


def run_name(policy: str, batching: str, load: float) -> str:
    return f"{policy}_{batching}_load{load:.2f}"


def _run_round(
    address: str,
    items: Sequence[PromptLength],
    config: BenchConfig,
    policy: str,
    rate: float,
    round_index: int,
    label: str,
) -> list[RequestResult]:
    """One open-loop run of ``policy`` at ``rate``; round ``r`` replays seed ``seed + r``."""
    if config.duration_s is None:
        count = config.requests
    else:
        count = max(round(rate * config.duration_s / config.rounds), MIN_REQUESTS)
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
    bar.close()
    for result in results:
        result.round = round_index
    return results


def summarize_rounds(
    rounds: Sequence[Sequence[RequestResult]],
    policy: str,
    batching: str,
    load: float,
    rate: float,
    capacity: float,
) -> dict[str, Any]:
    """One run's numbers from all its rounds' jobs together."""
    results = [r for one_round in rounds for r in one_round]
    ok = [r for r in results if r.ok]
    # Throughput: completed jobs per second of the rounds' spans (arrival to last answer).
    span = sum(
        max((r.finished_s for r in one_round if r.ok), default=0.0)
        - min(r.submitted_s for r in one_round)
        for one_round in rounds
    )
    stats = report.summarize(
        [r.jct_s for r in ok], [r.ttft_s for r in ok], span, failed=len(results) - len(ok)
    )
    run: dict[str, Any] = {
        "policy": policy,
        "batching": batching,
        "load": load,
        "arrival_rate_rps": rate,
        "capacity_rps": capacity,
        "requests": len(results),
        "rounds": len(rounds),
        **stats,
        "server_mean_jct_s": _mean([r.server_completion_s for r in ok]),
        "server_mean_queue_wait_s": _mean([r.server_queue_wait_s for r in ok]),
        "prediction_fallbacks": sum(r.prediction_fallback for r in results),
    }
    if failed := [r for r in results if not r.ok]:
        run["first_error"] = f"{failed[0].state}: {failed[0].error}"
    return run


def validate(
    rounds: Sequence[Sequence[RequestResult]],
    latency: LatencyModel,
    policy: str,
    batching: str,
    config: BenchConfig,
) -> dict[str, float]:
    """The simulator's mean JCT for exactly this run's jobs, each round replayed at the
    worker speed it had."""
    simulated_jct: list[float] = []
    factors: list[float] = []
    for one_round in rounds:
        model, simulated = replay_run(
            one_round,
            latency,
            policy,
            batching,
            config.max_batch_size,
            config.aging_rate,
            config.max_wait_s,
        )
        simulated_jct += [job.jct_s + model.overhead_s for job in simulated]
        factors.append(float(model.source["run_level_factor"]))
    predicted = float(np.mean(simulated_jct))
    measured = float(np.mean([r.jct_s for one_round in rounds for r in one_round if r.ok]))
    return {
        "simulated_mean_jct_s": predicted,
        "simulated_error_pct": 100 * (predicted / measured - 1),
        "run_level_factor": float(np.mean(factors)),
    }


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run the grid; writes summary.json, per-job files, the latency models and the plots."""
    if config.generation == "real":
        items, source = load_greedy_lengths(config.labels or DEFAULT_LABELS)
    else:
        items, source = load_prompt_lengths(config.llm, config.data_dir)
    out = config.out_dir
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    scaled = [max(1, round(item.output_tokens / config.length_scale)) for item in items]
    meta: dict[str, Any] = {
        "kind": "real stack",
        "workload": {
            "source": source,
            "llm": config.llm,
            "prompts": len(items),
            "length_scale": config.length_scale,
            "mean_output_tokens_replayed": float(np.mean(scaled)),
            "arrivals": config.arrivals,
            "generation": config.generation,
        },
        "config": {k: v for k, v in asdict(config).items() if k != "out_dir"},
        "latency_models": {},
    }
    runs: list[dict[str, Any]] = []
    jcts: dict[tuple[str, str, float], list[float]] = {}
    saturation = build_requests(
        items, config.saturation_jobs, 1.0, config.length_scale, config.seed + 1000
    )
    for batching in config.batchings:
        with contextlib.ExitStack() as stacks:
            # One stack per policy, all up at once, and the runs interleave the policies at
            # each load: a shared machine's speed drifts, and so every policy meets the same
            # drift instead of one policy getting the slow minutes.
            addresses = {
                policy: stacks.enter_context(stack_for(config, policy, batching))
                for policy in config.policies
            }
            first = config.policies[0]
            # Calibrated once per mode, so every policy sees the same arrival rates.
            shape = fit_shape(
                addresses[first],
                config.llm,
                _median_prompt(items),
                batching,
                config.max_batch_size,
                first,
            )
            latency = fit_level(
                addresses[first],
                config.llm,
                shape,
                saturation,
                first,
                batching,
                config.max_batch_size,
            )
            latency.save(out / f"latency_{batching}.json")
            capacity = capacity_rps(
                latency, scaled * 4, batching, config.max_batch_size, config.workers
            )
            meta["latency_models"][batching] = {**latency.to_dict(), "fcfs_capacity_rps": capacity}
            log.info("calibrated", extra={"batching": batching, "capacity": capacity})
            for load in config.loads:
                rate = load * capacity
                rounds: dict[str, list[list[RequestResult]]] = {p: [] for p in config.policies}
                for round_index in range(config.rounds):
                    for policy in config.policies:
                        label = f"{run_name(policy, batching, load)} round {round_index + 1}"
                        rounds[policy].append(
                            _run_round(
                                addresses[policy], items, config, policy, rate, round_index, label
                            )
                        )
                for policy in config.policies:
                    run = summarize_rounds(rounds[policy], policy, batching, load, rate, capacity)
                    if config.workers == 1:
                        run.update(validate(rounds[policy], latency, policy, batching, config))
                    runs.append(run)
                    results = [r for one_round in rounds[policy] for r in one_round]
                    jcts[(policy, batching, load)] = [r.jct_s for r in results if r.ok]
                    name = run_name(policy, batching, load)
                    _write_jobs(out / "jobs" / f"{name}.jsonl", results)
                    report.write_summary(out, runs, meta)
                    tqdm.write(
                        f"{name}: mean JCT {run['mean_jct_s']:.3f}s (simulated "
                        f"{run.get('simulated_mean_jct_s', math.nan):.3f}s), p99 "
                        f"{run['p99_jct_s']:.3f}s, {run['completed']}/{run['requests']} done"
                    )
    report.write_summary(out, runs, meta)
    title = f"SSJF on the real stack ({config.llm} lengths / {config.length_scale:g})"
    report.plot_jct_cdf(jcts, out / "jct_cdf.png", title)
    report.plot_mean_jct_vs_load(runs, out / "mean_jct_vs_load.png", title)
    return {**meta, "runs": runs}


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
    )
    for run in summary["runs"]:
        name = run_name(run["policy"], run["batching"], run["load"])
        results = read_jobs(run_dir / "jobs" / f"{name}.jsonl")
        rounds = [
            [r for r in results if r.round == index] for index in sorted({r.round for r in results})
        ]
        latency = LatencyModel.load(run_dir / f"latency_{run['batching']}.json")
        run.update(validate(rounds, latency, run["policy"], run["batching"], config))
    meta = {
        k: v for k, v in summary.items() if k not in {"runs", "comparisons", "paper", "targets"}
    }
    report.write_summary(run_dir, summary["runs"], meta)
    return summary["runs"]
