"""Fitting the latency model to the real worker, through the running stack.

1. Shape. Bursts of ``b`` identical replay jobs of ``n`` tokens go to the idle stack; the
   scheduler's timings give how long the worker held them (first lease to last token). For
   each batch size, time against tokens is a line whose slope is the decoding step time at
   that batch size and whose value at one token is the cost of prefilling that many jobs
   together. What a lone job's completion time has beyond its worker time is the serving
   overhead (submission, prediction, lease hand-off, relay).
2. Level. A loaded stack is slower per step than an idle one: on a small machine the
   scheduler relaying every token, Redis and the client share the CPU with the model. So a
   burst of real workload jobs is served at saturation, the simulator replays the same burst
   with the fitted model, and every worker cost is scaled by measured / simulated busy time.
   The simulator's capacity then equals the capacity measured under load.

Measuring through the stack rather than the engine alone means the model includes every cost
a served job pays, which is what the simulator must reproduce.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from services.bench.latency import LatencyModel, TimedRun, fit_step_times
from services.bench.loadgen import RequestResult, run_open_loop
from services.bench.simulator import SimJob, Simulation
from services.bench.workload import Request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationPlan:
    batch_sizes: tuple[int, ...]
    token_counts: tuple[int, ...] = (4, 48)
    repeats: int = 2


def plan_for(batching: str, max_batch_size: int) -> CalibrationPlan:
    """Batch sizes worth measuring: 1 only without batching, else 1, 2, 4, ... up to the max."""
    if batching == "none":
        return CalibrationPlan(batch_sizes=(1,))
    sizes = sorted({1, *(2**k for k in range(1, 8) if 2**k < max_batch_size), max_batch_size})
    return CalibrationPlan(batch_sizes=tuple(sizes))


def worker_span_s(results: Sequence[RequestResult]) -> float:
    """First lease to last token of a burst, from the server's timings (client clock)."""
    starts = [r.submitted_s + r.server_queue_wait_s for r in results]
    ends = [r.submitted_s + r.server_completion_s for r in results]
    return max(ends) - min(starts)


async def measure(
    address: str, llm: str, prompt: str, plan: CalibrationPlan, oracle: bool = False
) -> tuple[list[TimedRun], list[float]]:
    """Runs the plan; returns the timed bursts and each lone job's serving overhead."""
    runs: list[TimedRun] = []
    overheads: list[float] = []
    bursts = plan.repeats * len(plan.batch_sizes) * len(plan.token_counts)
    for _ in range(plan.repeats):
        for batch in plan.batch_sizes:
            for tokens in plan.token_counts:
                # Calibration takes minutes on a slow worker: say where it is.
                log.info(
                    "calibration burst",
                    extra={"burst": f"{len(runs) + 1}/{bursts}", "jobs": batch, "tokens": tokens},
                )
                burst = [Request(i, 0.0, -1, prompt, tokens, tokens) for i in range(batch)]
                results = await run_open_loop(address, burst, llm, oracle=oracle)
                failed = [r for r in results if not r.ok]
                if failed:
                    raise RuntimeError(
                        f"calibration job failed: {failed[0].state} {failed[0].error}"
                    )
                runs.append(TimedRun(batch, tokens, worker_span_s(results)))
                if batch == 1:
                    only = results[0]
                    overheads.append(only.jct_s - worker_span_s(results))
    return runs, overheads


def simulate_measured(
    results: Sequence[RequestResult],
    latency: LatencyModel,
    policy: str,
    batching: str,
    max_batch_size: int,
    workers: int = 1,
    aging_rate: float = 0.0,
    max_wait_s: float = 0.0,
) -> list[SimJob]:
    """Replay exactly the measured requests in the simulator: their actual submission times,
    and for SSJF the predictions the server made. Failed requests are left out."""
    jobs = []
    for r in results:
        if r.ok:
            score = r.predicted_output_tokens if policy == "ssjf" else float(r.output_tokens)
            jobs.append(SimJob(r.index, r.submitted_s, r.output_tokens, score))
    simulation = Simulation(
        latency, policy, batching, max_batch_size, workers, aging_rate, max_wait_s
    )
    return simulation.run(jobs)


def fit_shape(
    address: str, llm: str, prompt: str, batching: str, max_batch_size: int, policy: str
) -> LatencyModel:
    """Step and prefill costs per batch size, and the serving overhead, on an idle stack."""
    plan = plan_for(batching, max_batch_size)
    runs, overheads = asyncio.run(measure(address, llm, prompt, plan, policy == "sjf-oracle"))
    steps, prefills = fit_step_times(runs)
    return LatencyModel(
        steps,
        prefills,
        float(np.median(overheads)),
        source={
            "method": "bursts of replay jobs through the idle stack",
            "batching": batching,
            "max_batch_size": max_batch_size,
            "token_counts": list(plan.token_counts),
            "repeats": plan.repeats,
            "measurements": [vars(run) for run in runs],
        },
    )


def fit_level(
    address: str,
    llm: str,
    shape: LatencyModel,
    saturation: Sequence[Request],
    policy: str,
    batching: str,
    max_batch_size: int,
    workers: int = 1,
) -> LatencyModel:
    """``shape`` with every worker cost scaled so that the simulator's span for a burst of
    ``saturation`` jobs (all sent at once) on ``workers`` workers equals the stack's measured
    one: with several workers on one machine this is each worker's speed while all of them
    are busy."""
    burst = [replace(request, arrival_s=0.0) for request in saturation]
    log.info("calibration under load", extra={"jobs_at_once": len(burst), "policy": policy})
    results = asyncio.run(run_open_loop(address, burst, llm, oracle=policy == "sjf-oracle"))
    if failed := [r for r in results if not r.ok]:
        raise RuntimeError(f"calibration job failed: {failed[0].state} {failed[0].error}")
    measured = worker_span_s(results)
    simulated = simulate_measured(results, shape, policy, batching, max_batch_size, workers)
    factor = measured / (max(j.finish_s for j in simulated) - min(j.start_s for j in simulated))
    return shape.scaled(
        factor,
        method=f"{shape.source.get('method')}, scaled to the busy time of {len(burst)} "
        f"workload jobs sent at once ({policy}, {workers} worker(s))",
        load_factor=factor,
        saturation_busy_s=measured,
        idle_step_by_batch=shape.step_by_batch,
        idle_prefill_by_batch=shape.prefill_by_batch,
    )


def busy_time_s(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: time some job was on a worker."""
    total, reached = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


def summed_busy_s(spans: Iterable[tuple[str | int, float, float]]) -> float:
    """Worker-seconds of service: per worker, the time it held at least one job (the union
    of its jobs' ``(worker, start, end)`` spans), summed over the workers."""
    by_worker: dict[str | int, list[tuple[float, float]]] = {}
    for worker, start, end in spans:
        by_worker.setdefault(worker, []).append((start, end))
    return sum(busy_time_s(intervals) for intervals in by_worker.values())


class UnattributedJobs(ValueError):
    """Several workers, but some jobs do not say which worker served them."""


def measured_busy_s(results: Sequence[RequestResult], workers: int = 1) -> float:
    """Worker-seconds the stack's workers held these jobs (lease to last token), from the
    server's timings; with several workers, per worker by the job's ``worker_id``."""
    done = [r for r in results if r.ok]
    if workers > 1 and any(not r.worker_id for r in done):
        raise UnattributedJobs("several workers, but some jobs do not say which worker served them")
    return summed_busy_s(
        (
            r.worker_id if workers > 1 else "",
            r.submitted_s + r.server_queue_wait_s,
            r.submitted_s + r.server_completion_s,
        )
        for r in done
    )


def replay_run(
    results: Sequence[RequestResult],
    latency: LatencyModel,
    policy: str,
    batching: str,
    max_batch_size: int,
    aging_rate: float = 0.0,
    max_wait_s: float = 0.0,
    workers: int = 1,
    max_iterations: int = 30,
    tolerance: float = 1e-3,
) -> tuple[LatencyModel, list[SimJob]]:
    """Simulate a measured run at the worker speed it actually had.

    The run's service demand is an input: ``latency``'s worker costs are scaled until the
    simulated worker-seconds of service (per worker, the time some job was on it; summed
    over the workers) equal the measured ones. Fixed-point steps: busy time grows a little
    less than proportionally with step cost, as slower steps make bigger batches. Its
    output, each job's waiting and completion time, is the prediction to check against the
    measurement. Several workers need each job's ``worker_id`` (ValueError otherwise).
    """
    measured = measured_busy_s(results, workers)

    def simulate(model: LatencyModel) -> list[SimJob]:
        return simulate_measured(
            results, model, policy, batching, max_batch_size, workers, aging_rate, max_wait_s
        )

    model, factor = latency, 1.0
    for _ in range(max_iterations):
        simulated = summed_busy_s((j.worker, j.start_s, j.finish_s) for j in simulate(model))
        correction = measured / simulated
        factor *= correction
        model = latency.scaled(factor, run_level_factor=factor, run_busy_s=measured)
        if abs(correction - 1) < tolerance:
            break
    return model, simulate(model)


def capacity_rps(
    latency: LatencyModel,
    token_counts: Sequence[int],
    batching: str,
    max_batch_size: int,
    workers: int = 1,
) -> float:
    """Jobs per second the workers finish under FCFS when the queue never empties.

    Simulated with the fitted model on the workload's own lengths (all jobs queued at time
    0), so "load 0.9" means arrivals at 90% of what FCFS can serve in that batching mode.
    """
    jobs = [SimJob(i, 0.0, tokens, float(tokens)) for i, tokens in enumerate(token_counts)]
    done = Simulation(latency, "fcfs", batching, max_batch_size, workers).run(jobs)
    return len(done) / max(job.finish_s for job in done)
