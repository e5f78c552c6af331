"""The submit path in simulated time: how much of oracle SJF's gain SSJF keeps when prediction
is synchronous, asynchronous (two-stage), or first-stage only.

Built on the bench's discrete-event simulator (services/bench/simulator.py: the scheduler's
own queue and policies, workers following the latency model fitted to the real worker):

- ``fcfs`` and ``sjf-oracle``: the references.
- ``ssjf-sync`` (the old path): a job joins the queue only ``delay`` after it arrives, with
  the proxy model's score; its JCT still counts from its arrival.
- ``ssjf-async`` (the new path): a job joins the queue on arrival with the first-stage
  model's score and is re-scored with the proxy model's ``delay`` later, only if still queued
  (as lua/rescore.lua does); an idle worker takes it at once.
- ``ssjf-first-stage``: the first-stage score only (the predictor down).
- ``ssjf-instant``: the proxy model's score with no delay (what the predictor is worth).
- ``ssjf-instant-demote-Kx`` (``--demote-after K``): ``ssjf-instant`` where a job running
  past K times its prediction while another waits gives up its slot and re-enters the queue
  (``Simulation(demote_after=...)``; not with dynamic batching).

``delay`` is the predictor's latency (``--prediction-delay-ms``, default the p50 measured by
``make bench-predictor`` on this CPU). Reported per batching mode: mean JCT and the fraction
of oracle's gain ``(FCFS - X) / (FCFS - oracle)``.

``python -m services.predictor.submit_path_sim --artifact DIR [--requests 100000]
[--load 0.9] [--llm vicuna-13b]`` prints a table and writes
``bench/results/submit_path_sim.json``.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from services.bench.calibrate import capacity_rps
from services.bench.latency import LatencyModel
from services.bench.simulate import load_latency, proxy_predictions
from services.bench.simulator import BATCHING_MODES, SimJob, Simulation
from services.bench.workload import PromptLength, Request, build_requests, load_prompt_lengths
from services.common.first_stage import FIRST_STAGE_FILE, FirstStageModel
from services.common.paths import CHECKOUT_ROOT, SHARED_DATA_DIR
from services.predictor.bench import command_line, write_result
from services.predictor.runtime import DEFAULT_ARTIFACT

VARIANTS = ("fcfs", "sjf-oracle", "ssjf-sync", "ssjf-async", "ssjf-first-stage", "ssjf-instant")


class TwoStageSimulation(Simulation):
    """Simulation whose jobs may be re-scored while queued, ``delay_s`` after arrival."""

    _RESCORE = 2
    # Set by run_two_stage; a plain run() has no re-score events.
    _final: dict[int, float] | None = None
    _delay_s = 0.0

    def run_two_stage(
        self, jobs: Sequence[SimJob], final_scores: Sequence[float], delay_s: float
    ) -> list[SimJob]:
        self._final = {job.index: score for job, score in zip(jobs, final_scores, strict=True)}
        self._delay_s = delay_s
        self.rescored = self.late = 0
        return self.run(jobs)

    def _schedule_extra(self, job: SimJob) -> None:
        if self._final is not None:
            self._push(job.arrival_s + self._delay_s, self._RESCORE, job.index)

    def _handle_extra(self, kind: int, target: int, now: float) -> None:
        assert self._final is not None  # re-score events exist only in run_two_stage
        job = self._by_index[target]
        if self.queue.queue.remove(f"{job.index:012d}"):
            job.predicted_tokens = self._final[target]
            self.queue.push(job, job.arrival_s)  # same arrival: same aging, same ties
            self.rescored += 1
        else:
            self.late += 1


def simulate_variant(
    variant: str,
    latency: Any,
    batching: str,
    max_batch_size: int,
    requests: Sequence[Any],
    first: Sequence[float],
    proxy: Sequence[float],
    delay_s: float,
    demote_after: float = 0.0,
    steps_per_predicted_token: float = 1.0,
) -> dict[str, Any]:
    def job(request: Any, score: float, arrival: float | None = None) -> SimJob:
        at = request.arrival_s if arrival is None else arrival
        return SimJob(request.index, at, request.output_tokens, score)

    policy = {"fcfs": "fcfs", "sjf-oracle": "sjf-oracle"}.get(variant, "ssjf")
    simulation = TwoStageSimulation(
        latency,
        policy,
        batching,
        max_batch_size,
        demote_after=demote_after,
        steps_per_predicted_token=steps_per_predicted_token,
    )
    extra: dict[str, Any] = {}
    if variant in ("fcfs", "sjf-oracle"):
        jobs = [job(r, float(r.output_tokens)) for r in requests]
        done = simulation.run(jobs)
    elif variant == "ssjf-sync":
        jobs = [job(r, p, r.arrival_s + delay_s) for r, p in zip(requests, proxy, strict=True)]
        done = simulation.run(jobs)
        for finished, request in zip(done, requests, strict=True):
            finished.arrival_s = request.arrival_s  # JCT counts from the real arrival
    elif variant == "ssjf-async":
        jobs = [job(r, f) for r, f in zip(requests, first, strict=True)]
        done = simulation.run_two_stage(jobs, proxy, delay_s)
        extra = {
            "rescored": simulation.rescored,
            "dispatched_before_prediction": simulation.late / len(requests),
        }
    else:
        scores = first if variant == "ssjf-first-stage" else proxy
        done = simulation.run([job(r, s) for r, s in zip(requests, scores, strict=True)])
    jct = np.array([d.jct_s + latency.overhead_s for d in done])
    if demote_after:
        extra["demoted"] = simulation.demoted
    return {"mean_jct_s": float(jct.mean()), "p99_jct_s": float(np.percentile(jct, 99)), **extra}


@dataclass
class SteadyState:
    """One batching mode's steady-state workloads: one request list per seed at ``load``, with
    FCFS's and oracle SJF's mean JCT on each, so that any predictor's scores can be rated by
    the fraction of oracle's gain they keep without re-running the references."""

    batching: str
    latency: LatencyModel
    max_batch_size: int
    capacity_rps: float
    workloads: list[list[Request]]
    fcfs_jct_s: list[float]
    oracle_jct_s: list[float]
    # Simulated jobs serve the real length / length_scale steps (a prediction is in tokens).
    length_scale: float = 16.0

    @classmethod
    def build(
        cls,
        items: Sequence[PromptLength],
        batching: str,
        *,
        requests: int,
        load: float,
        seeds: int,
        length_scale: float = 16.0,
        max_batch_size: int = 4,
    ) -> SteadyState:
        latency, _ = load_latency(batching, None)
        scaled = [max(1, round(i.output_tokens / length_scale)) for i in items]
        capacity = capacity_rps(latency, scaled * 4, batching, max_batch_size, 1)
        workloads = [
            build_requests(items, requests, load * capacity, length_scale, seed)
            for seed in range(seeds)
        ]
        state = cls(batching, latency, max_batch_size, capacity, workloads, [], [], length_scale)
        for workload in workloads:
            state.fcfs_jct_s.append(state.simulate("fcfs", workload)["mean_jct_s"])
            state.oracle_jct_s.append(state.simulate("sjf-oracle", workload)["mean_jct_s"])
        return state

    def simulate(
        self,
        variant: str,
        workload: Sequence[Request],
        first: Sequence[float] = (),
        proxy: Sequence[float] = (),
        delay_s: float = 0.0,
        demote_after: float = 0.0,
    ) -> dict[str, Any]:
        fresh = [replace(r) for r in workload]
        return simulate_variant(
            variant,
            self.latency,
            self.batching,
            self.max_batch_size,
            fresh,
            first,
            proxy,
            delay_s,
            demote_after,
            1.0 / self.length_scale,
        )

    def fraction(self, seed: int, mean_jct_s: float) -> float:
        """``(FCFS - X) / (FCFS - oracle)`` on seed ``seed``'s workload."""
        fcfs, oracle = self.fcfs_jct_s[seed], self.oracle_jct_s[seed]
        return (fcfs - mean_jct_s) / (fcfs - oracle)

    def fractions_for(self, scores: Mapping[Any, float], demote_after: float = 0.0) -> list[float]:
        """Per seed, the fraction of oracle's gain of SSJF scoring each job by ``scores`` (its
        prompt id's predicted length), known on arrival; with ``demote_after``, a job running
        past that many times its prediction gives way (``Simulation``)."""
        fractions = []
        for seed, workload in enumerate(self.workloads):
            predicted = [scores[r.prompt_id] for r in workload]
            row = self.simulate(
                "ssjf-instant", workload, proxy=predicted, demote_after=demote_after
            )
            fractions.append(self.fraction(seed, row["mean_jct_s"]))
        return fractions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", default=str(DEFAULT_ARTIFACT))
    parser.add_argument("--llm", default="vicuna-13b")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--load", type=float, default=0.9)
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--length-scale", type=float, default=16.0)
    parser.add_argument("--prediction-delay-ms", type=float, default=10.0)
    parser.add_argument("--seeds", type=int, default=3, help="independent workloads (rounds)")
    parser.add_argument("--batchings", default=",".join(BATCHING_MODES))
    parser.add_argument(
        "--demote-after",
        default="",
        help="comma-separated factors, e.g. 2,4: also simulate ssjf-instant where a job running "
        "past that many times its prediction gives its slot to a waiting one and re-enters the "
        "queue (preemption with its context recomputed; not with dynamic batching)",
    )
    parser.add_argument(
        "--out", default=str(CHECKOUT_ROOT / "bench" / "results" / "submit_path_sim.json")
    )
    args = parser.parse_args(argv)
    try:
        demote_factors = [float(factor) for factor in filter(None, args.demote_after.split(","))]
    except ValueError:
        parser.error(f"--demote-after takes numbers, e.g. 2,4, not {args.demote_after!r}")
    if any(not math.isfinite(factor) or factor < 1 for factor in demote_factors):
        parser.error("--demote-after factors must be >= 1 (times the prediction)")
    artifact = Path(args.artifact)
    data_dir = SHARED_DATA_DIR if (SHARED_DATA_DIR / "alpaca_eval").is_dir() else None
    items, source = load_prompt_lengths(args.llm, data_dir)
    prompts = {item.prompt_id: item.prompt for item in items}
    proxy_by_key, _ = proxy_predictions(items, args.llm, artifact)
    first_stage = FirstStageModel.load(artifact / FIRST_STAGE_FILE)
    first_by_id = {pid: first_stage.predict(text, args.llm) for pid, text in prompts.items()}
    delay_s = args.prediction_delay_ms / 1e3
    result: dict[str, Any] = {
        "command": command_line("services.predictor.submit_path_sim", argv),
        "workload": source,
        "llm": args.llm,
        "artifact": str(artifact),
        "first_stage": first_stage.version,
        "requests": args.requests,
        "load": args.load,
        "seeds": args.seeds,
        "prediction_delay_ms": args.prediction_delay_ms,
        "load_average_1m_at_start": os.getloadavg()[0],
        "modes": {},
    }
    for batching in args.batchings.split(","):
        state = SteadyState.build(
            items,
            batching,
            requests=args.requests,
            load=args.load,
            seeds=args.seeds,
            length_scale=args.length_scale,
            max_batch_size=args.max_batch_size,
        )
        mode: dict[str, Any] = {"capacity_rps": state.capacity_rps, "variants": {}}
        # Each seed's jobs scored by both stages, once for all the variants.
        scored = [
            (
                [first_by_id[r.prompt_id] for r in workload],
                [proxy_by_key[(r.llm or args.llm, r.prompt_id)] for r in workload],
            )
            for workload in state.workloads
        ]
        demotions = [
            (f"ssjf-instant-demote-{factor:g}x", factor)
            for factor in demote_factors
            if batching != "dynamic"
        ]
        for label, demote_after in [*((variant, 0.0) for variant in VARIANTS), *demotions]:
            variant = "ssjf-instant" if demote_after else label
            rows = []
            for seed, (workload, (first, proxy)) in enumerate(
                zip(state.workloads, scored, strict=True)
            ):
                if variant == "fcfs":
                    row = {"mean_jct_s": state.fcfs_jct_s[seed]}
                elif variant == "sjf-oracle":
                    row = {"mean_jct_s": state.oracle_jct_s[seed]}
                else:
                    row = state.simulate(variant, workload, first, proxy, delay_s, demote_after)
                row["fraction"] = state.fraction(seed, row["mean_jct_s"])
                rows.append(row)
            fractions = [row["fraction"] for row in rows]
            mode["variants"][label] = {
                "mean_jct_s": [row["mean_jct_s"] for row in rows],
                "fraction_of_oracle_gain": fractions,
                "fraction_mean": float(np.mean(fractions)),
                "fraction_min": float(np.min(fractions)),
                "fraction_max": float(np.max(fractions)),
                **{
                    key: float(np.mean([row[key] for row in rows]))
                    for key in ("dispatched_before_prediction", "demoted")
                    if key in rows[0]
                },
            }
        result["modes"][batching] = mode
        print(f"\n{batching} batching, load {args.load}, {args.requests} jobs x {args.seeds} seeds")
        print(f"{'variant':<28}{'mean JCT s':>12}{'oracle gain (min..max)':>30}")
        for variant, row in mode["variants"].items():
            print(
                f"{variant:<28}{np.mean(row['mean_jct_s']):>12.3f}"
                f"{row['fraction_mean']:>14.3f} "
                f"({row['fraction_min']:.3f}..{row['fraction_max']:.3f})"
            )
    result["load_average_1m_at_end"] = os.getloadavg()[0]
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
