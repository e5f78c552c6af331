"""``ssjf simulate``: the policy grid in simulated time, for loads and scales a laptop cannot
serve (many workers, a million jobs), with confidence intervals, throughput at a latency SLO
and a starvation report.

Lengths are the same replayed LLM's (scaled the same way as ``ssjf bench``), the latency
model is the one ``ssjf bench`` fitted to the real worker, and SSJF's (and HRRN's) scores are
the proxy model's own predictions (the predictor's ONNX artifact, run here on every workload
prompt), or, with ``--prediction-noise``, the true lengths blurred by log-normal noise of that
spread.

Each point (batching, load) is ``--rounds`` independent rounds (seeds seed, seed+1, ...) of
``requests / rounds`` jobs; every policy serves the same jobs in a round, and the intervals
are ``stats.paired_bootstrap``'s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import kendalltau
from tqdm import tqdm

from services.bench import report, stats
from services.bench.calibrate import capacity_rps
from services.bench.latency import LatencyModel
from services.bench.simulator import SimJob, Simulation, aging_for, base_policy, guard_for
from services.bench.workload import PromptLength, Request, build_requests, load_workload
from services.common.paths import CHECKOUT_ROOT

SHIPPED_LATENCY_DIR = CHECKOUT_ROOT / "bench" / "workloads"
SATURATED_JOBS = 20_000
# Policies scored by the proxy model's prediction.
PREDICTED = ("ssjf", "hrrn")


@dataclass
class SimulateConfig:
    out_dir: Path
    policies: list[str]
    batchings: list[str]
    loads: list[float]
    requests: int = 100_000
    rounds: int = 10
    workers: int = 1
    max_batch_size: int = 4
    length_scale: float = 16.0
    llm: str = "vicuna-13b"
    lengths: str = "alpaca"
    latency_dir: Path | None = None
    predictor_artifact: Path | None = None
    # > 0: score SSJF by noisy true lengths instead of the proxy model.
    prediction_noise: float = 0.0
    # CPU milliseconds each prediction takes from the workers (predictor on the workers' host);
    # charged only to the policies that ask for a prediction.
    prediction_cpu_ms: float = 0.0
    arrivals: str = "poisson"
    seed: int = 0
    aging_rate: float = 0.0
    max_wait_s: float = 0.0
    data_dir: Path | None = None
    resamples: int = 1000
    # Throughput at a latency SLO: the SLO is this many times the unloaded mean JCT.
    slo_search: bool = False
    slo_factor: float = 5.0
    p99_slo_factor: float = 3.0
    slo_requests: int = 20_000
    slo_seeds: int = 3
    extra: dict[str, Any] = field(default_factory=dict)


def load_latency(batching: str, directory: Path | None) -> tuple[LatencyModel, str]:
    """``latency_<batching>.json`` from ``directory`` (a bench output), else the model shipped
    in bench/workloads (fitted on this project's 2-core CPU)."""
    name = f"latency_{batching}.json"
    for candidate in [directory / name] if directory else []:
        if candidate.exists():
            return LatencyModel.load(candidate), str(candidate)
    shipped = SHIPPED_LATENCY_DIR / name
    if not shipped.exists():
        raise FileNotFoundError(
            f"no latency model for batching {batching!r}: run ssjf bench "
            f"first, or pass --latency-dir"
        )
    return LatencyModel.load(shipped), str(shipped.relative_to(CHECKOUT_ROOT))


Predictions = dict[tuple[str, int], float]


def proxy_predictions(
    items: Sequence[PromptLength], default_llm: str, artifact: Path | None
) -> tuple[Predictions, str]:
    """The proxy model's predicted answer length per (LLM, prompt id), and its version."""
    from services.predictor.runtime import DEFAULT_ARTIFACT, ArtifactRuntime

    runtime = ArtifactRuntime(artifact or DEFAULT_ARTIFACT, intra_op_threads=2)
    keys = sorted({(item.llm or default_llm, item.prompt_id) for item in items})
    prompts = {item.prompt_id: item.prompt for item in items}
    predictions: Predictions = {}
    for start in range(0, len(keys), 32):
        chunk = keys[start : start + 32]
        answers = runtime.predict([prompts[pid] for _, pid in chunk], [llm for llm, _ in chunk])
        predictions.update((key, answer.tokens) for key, answer in zip(chunk, answers, strict=True))
    return predictions, runtime.version


def predicted_scores(
    requests: Sequence[Request],
    predictions: Predictions | None,
    noise: float,
    seed: int,
    default_llm: str = "",
) -> list[float]:
    """SSJF's score per request: the proxy model's prediction for its prompt, or (without
    predictions) the true length times exp(N(0, noise))."""
    if predictions is not None:
        return [predictions[(r.llm or default_llm, r.prompt_id)] for r in requests]
    rng = np.random.default_rng(seed + 2)
    blur = np.exp(rng.normal(0.0, noise, size=len(requests)))
    return [r.true_output_tokens * float(b) for r, b in zip(requests, blur, strict=True)]


def simulate_policy(
    latency: LatencyModel,
    spec: str,
    batching: str,
    config: SimulateConfig,
    requests: Sequence[Request],
    scores: Sequence[float],
) -> tuple[list[SimJob], Simulation]:
    """One policy (a grid entry, e.g. ``ssjf:noguard``) serving ``requests``."""
    policy = base_policy(spec)
    jobs = [
        SimJob(
            r.index,
            r.arrival_s,
            r.output_tokens,
            # The simulated job serves output_tokens (the real length / length_scale); a
            # prediction of the real length is brought to the same scale, so that an aging
            # rate (tokens of credit per second) weighs SSJF's and the oracle's keys alike.
            score / config.length_scale if policy in PREDICTED else float(r.output_tokens),
            prompt_chars=len(r.prompt),
            llm=r.llm,
        )
        for r, score in zip(requests, scores, strict=True)
    ]
    simulation = Simulation(
        latency,
        policy,
        batching,
        config.max_batch_size,
        config.workers,
        aging_rate=aging_for(spec, config.aging_rate),
        max_wait_s=guard_for(spec, config.max_wait_s),
        prediction_cpu_s=config.prediction_cpu_ms / 1e3 if policy in PREDICTED else 0.0,
    )
    return simulation.run(jobs), simulation


def realized_utilization(done: Sequence[SimJob], simulation: Simulation) -> float:
    """Worker busy time over (workers x first arrival to last completion)."""
    span = max(job.finish_s for job in done) - min(job.arrival_s for job in done)
    return simulation.busy_s / (len(simulation.workers) * span) if span > 0 else math.nan


@dataclass
class Workload:
    items: list[PromptLength]
    source: str
    predictions: Predictions | None
    predictor_version: str | None


def load_simulation_workload(config: SimulateConfig) -> Workload:
    items, source = load_workload(config.llm, config.data_dir, config.lengths)
    predictions, version = None, None
    if config.prediction_noise <= 0 and any(base_policy(p) in PREDICTED for p in config.policies):
        predictions, version = proxy_predictions(items, config.llm, config.predictor_artifact)
    return Workload(items, source, predictions, version)


def _requests(
    workload: Workload, config: SimulateConfig, count: int, rate: float, seed: int
) -> tuple[list[Request], list[float]]:
    requests = build_requests(
        workload.items,
        count,
        rate,
        config.length_scale,
        seed,
        config.arrivals,
        config.data_dir,
    )
    scores = predicted_scores(
        requests, workload.predictions, config.prediction_noise, seed, config.llm
    )
    return requests, scores


def run_point(
    latency: LatencyModel,
    batching: str,
    load: float,
    capacity: float,
    workload: Workload,
    config: SimulateConfig,
) -> tuple[list[dict[str, Any]], list[dict[str, np.ndarray]], dict[str, list[float]]]:
    """Every policy at one (batching, load): ``config.rounds`` rounds of the same jobs.

    Returns the runs (one per policy), the per-round JCTs (for the intervals) and the pooled
    JCTs per policy (for the plots)."""
    per_round = max(config.requests // config.rounds, 1)
    rounds: list[dict[str, np.ndarray]] = []
    collected: dict[str, dict[str, list[float]]] = {
        p: {"jct": [], "ttft": [], "wait": [], "util": [], "span": [], "tau": []}
        for p in config.policies
    }
    for round_index in range(config.rounds):
        seed = config.seed + round_index
        requests, scores = _requests(workload, config, per_round, load * capacity, seed)
        tau = kendalltau(scores, [r.output_tokens for r in requests]).statistic
        this_round = {}
        for spec in config.policies:
            done, simulation = simulate_policy(latency, spec, batching, config, requests, scores)
            jct = np.array([job.jct_s + latency.overhead_s for job in done])
            this_round[spec] = jct
            got = collected[spec]
            got["jct"] += jct.tolist()
            got["ttft"] += [job.ttft_s + latency.overhead_s for job in done]
            got["wait"] += [job.start_s - job.arrival_s for job in done]
            got["util"].append(realized_utilization(done, simulation))
            got["span"].append(
                max(job.finish_s for job in done) - min(job.arrival_s for job in done)
            )
            got["tau"].append(float(tau))
        rounds.append(this_round)
    runs = []
    for spec in config.policies:
        got = collected[spec]
        runs.append(
            {
                "policy": spec,
                "batching": batching,
                "load": load,
                "arrival_rate_rps": load * capacity,
                "capacity_rps": capacity,
                "requests": per_round * config.rounds,
                "rounds": config.rounds,
                "workers": config.workers,
                "max_wait_s": guard_for(spec, config.max_wait_s),
                "aging_rate": aging_for(spec, config.aging_rate),
                **report.summarize(got["jct"], got["ttft"], sum(got["span"]), 0, got["wait"]),
                "realized_utilization": float(np.mean(got["util"])),
                "ssjf_score_kendall_tau": float(np.nanmean(got["tau"])),
            }
        )
    return runs, rounds, {spec: collected[spec]["jct"] for spec in config.policies}


def slo_throughput(
    latency: LatencyModel,
    batching: str,
    capacity: float,
    workload: Workload,
    config: SimulateConfig,
) -> dict[str, Any]:
    """Per policy: the highest arrival rate keeping mean JCT under ``slo_factor`` x the
    unloaded mean JCT, and separately p99 JCT under ``p99_slo_factor`` x the unloaded p99 JCT
    (stats.SloTargets); over ``slo_seeds`` job streams (each searched with the same jobs at
    every rate), with the SSJF/FCFS ratios and their spread."""
    reference, _ = _requests(workload, config, config.slo_requests, capacity, config.seed)
    targets = stats.SloTargets.from_solo_jcts(
        [latency.solo_jct_s(r.output_tokens) for r in reference],
        config.slo_factor,
        config.p99_slo_factor,
    )
    statistics = targets.statistics()
    found: dict[str, dict[str, list[stats.SloSearch]]] = {
        spec: {name: [] for name in statistics} for spec in config.policies
    }
    for seed_offset in range(config.slo_seeds):
        seed = config.seed + 100 + seed_offset
        for spec in config.policies:
            cache: dict[float, np.ndarray] = {}

            def jcts(
                rate: float,
                spec: str = spec,
                seed: int = seed,
                cache: dict[float, np.ndarray] = cache,
            ) -> np.ndarray:
                if rate not in cache:
                    requests, scores = _requests(workload, config, config.slo_requests, rate, seed)
                    done, _ = simulate_policy(latency, spec, batching, config, requests, scores)
                    cache[rate] = np.array([job.jct_s + latency.overhead_s for job in done])
                return cache[rate]

            for name, (statistic, limit) in statistics.items():
                search = stats.max_rate_under_slo(
                    lambda rate, statistic=statistic: statistic(jcts(rate)),
                    limit,
                    low=0.1 * capacity,
                    high=1.2 * capacity,
                )
                found[spec][name].append(search)
    result: dict[str, Any] = {
        **targets.describe(),
        "jobs_per_evaluation": config.slo_requests,
        "job_streams": config.slo_seeds,
        "capacity_rps": capacity,
        "policies": {},
        "ratios_to_fcfs": {},
    }
    for spec in config.policies:
        result["policies"][spec] = {
            name: {
                "max_rate_rps": float(np.mean([s.max_rate for s in searches])),
                "max_load": float(np.mean([s.max_rate for s in searches])) / capacity,
                "per_stream_rps": [s.max_rate for s in searches],
                "any_lower_bound_only": any(s.unbounded for s in searches),
                "any_infeasible": any(s.infeasible for s in searches),
            }
            for name, searches in found[spec].items()
        }
    if "fcfs" in found:
        for spec in config.policies:
            if spec == "fcfs":
                continue
            result["ratios_to_fcfs"][spec] = {}
            for name in statistics:
                ratios = [
                    s.max_rate / f.max_rate if f.max_rate > 0 else math.nan
                    for s, f in zip(found[spec][name], found["fcfs"][name], strict=True)
                ]
                result["ratios_to_fcfs"][spec][name] = {
                    "value": float(np.mean(ratios)),
                    "per_stream": ratios,
                    "half_width_95": stats.half_width_t(ratios),
                }
    return result


def format_slo(slo_results: dict[str, dict[str, Any]]) -> str:
    lines = []
    for batching, result in slo_results.items():
        slos = "; ".join(
            f"{name} JCT under {result['slo'][name]} = {result['slo_s'][name]:.3f}s"
            for name in ("mean", "p99")
        )
        lines.append(
            f"{batching}: SLO {slos}; max arrival rate (load) keeping it, mean over "
            f"{result['job_streams']} job streams"
        )
        for spec, entry in result["policies"].items():
            ratio = result["ratios_to_fcfs"].get(spec, {})
            cells = []
            for name in ("mean", "p99"):
                text = f"{name} {entry[name]['max_rate_rps']:.2f}/s ({entry[name]['max_load']:.2f})"
                if name in ratio:
                    text += f" x{ratio[name]['value']:.2f}±{ratio[name]['half_width_95']:.2f}"
                cells.append(text)
            lines.append(f"  {spec:<13} " + "; ".join(cells))
    lines.append(
        f"  (x: ratio to FCFS ± 95% t half-width over streams; paper: "
        f"{report.PAPER['throughput_gain']} throughput)"
    )
    return "\n".join(lines)


def run_simulations(config: SimulateConfig) -> dict[str, Any]:
    workload = load_simulation_workload(config)
    meta: dict[str, Any] = {
        "kind": "simulation",
        "provenance": report.provenance(workload.predictor_version),
        "workload": {
            "source": workload.source,
            "llm": config.llm,
            "lengths": config.lengths,
            "length_scale": config.length_scale,
            "arrivals": config.arrivals,
            "prompts": len(workload.items),
        },
        "config": {k: v for k, v in asdict(config).items() if k != "out_dir"},
        "ssjf_scores": (
            f"proxy model {workload.predictor_version}"
            if workload.predictions is not None
            else f"true length x exp(N(0, {config.prediction_noise}))"
        ),
        "latency_models": {},
    }
    runs: list[dict[str, Any]] = []
    jcts: dict[tuple[str, str, float], list[float]] = {}
    points: dict[tuple[str, float], list[dict[str, np.ndarray]]] = {}
    saturated: dict[str, dict[str, float]] = {}
    slo_results: dict[str, Any] = {}
    meta["saturated_throughput_rps"] = saturated
    scaled = [max(1, round(i.output_tokens / config.length_scale)) for i in workload.items]
    for batching in config.batchings:
        latency, latency_source = load_latency(batching, config.latency_dir)
        # Throughput when every job is queued at once: where batching similar lengths
        # together (SJF's order) finishes the same work sooner.
        backlog, backlog_scores = _requests(
            workload, config, min(config.requests, SATURATED_JOBS), 1.0, config.seed
        )
        backlog = [replace(r, arrival_s=0.0) for r in backlog]
        saturated[batching] = {}
        for spec in config.policies:
            done, _ = simulate_policy(latency, spec, batching, config, backlog, backlog_scores)
            saturated[batching][spec] = len(done) / max(job.finish_s for job in done)
        capacity = config.workers * capacity_rps(
            latency, scaled * 4, batching, config.max_batch_size, 1
        )
        meta["latency_models"][batching] = {"source": latency_source, "fcfs_capacity_rps": capacity}
        for load in tqdm(config.loads, desc=f"simulate {batching}", leave=False):
            started = time.perf_counter()
            point_runs, rounds, pooled = run_point(
                latency, batching, load, capacity, workload, config
            )
            for run in point_runs:
                run["sim_wall_s"] = time.perf_counter() - started
            runs += point_runs
            points[(batching, load)] = rounds
            for spec, values in pooled.items():
                jcts[(spec, batching, load)] = values
        if config.slo_search:
            slo_results[batching] = slo_throughput(latency, batching, capacity, workload, config)
    compared = report.interval_comparisons(points, config.resamples, config.seed)
    meta["slo_throughput"] = slo_results
    meta["provenance"]["load_average_at_end"] = report.load_average()
    out = config.out_dir
    report.write_summary(out, runs, meta, compared)
    title = (
        f"SSJF simulated: {config.requests:,} jobs per point, {config.workers} worker(s), "
        f"{config.llm} lengths / {config.length_scale:g}"
    )
    report.plot_jct_cdf(jcts, out / "jct_cdf.png", title)
    report.plot_mean_jct_vs_load(runs, out / "mean_jct_vs_load.png", title)
    report.plot_ratios(compared, out / "ratios.png", title)
    return {**meta, "runs": runs, "comparisons": compared}


def size_study(
    config: SimulateConfig, sizes: Sequence[int], replications: int = 30, load: float = 0.9
) -> dict[str, Any]:
    """How many jobs a point needs: for each size, the spread of SSJF/FCFS mean JCT over
    independent replications (the truth about the interval's width) beside the bootstrap's
    half-width from single replications (what a run reports). One round per replication,
    as a real-stack point of that many jobs in one round would be."""
    workload = load_simulation_workload(config)
    scaled = [max(1, round(i.output_tokens / config.length_scale)) for i in workload.items]
    rows = []
    for batching in config.batchings:
        latency, _ = load_latency(batching, config.latency_dir)
        capacity = config.workers * capacity_rps(
            latency, scaled * 4, batching, config.max_batch_size, 1
        )
        for size in sizes:
            ratios, bootstrap_half = [], []
            for replication in tqdm(range(replications), desc=f"{batching} {size}", leave=False):
                seed = config.seed + 1000 * size + replication
                requests, scores = _requests(workload, config, size, load * capacity, seed)
                jct = {}
                for spec in ("fcfs", "ssjf"):
                    done, _ = simulate_policy(latency, spec, batching, config, requests, scores)
                    jct[spec] = np.array([job.jct_s + latency.overhead_s for job in done])
                ratios.append(jct["ssjf"].mean() / jct["fcfs"].mean())
                if replication < 5:
                    interval = stats.paired_bootstrap(
                        [jct], {"r": stats.mean_ratio("ssjf", "fcfs")}, resamples=400, seed=seed
                    )["r"]
                    bootstrap_half.append(interval.half_width)
            rows.append(
                {
                    "batching": batching,
                    "load": load,
                    "jobs": size,
                    "replications": replications,
                    "mean_ratio": float(np.mean(ratios)),
                    "replication_half_width_95": float(1.96 * np.std(ratios, ddof=1)),
                    "bootstrap_half_width_95": float(np.mean(bootstrap_half)),
                }
            )
            tqdm.write(
                f"{batching:<10} {size:>6} jobs: SSJF/FCFS {rows[-1]['mean_ratio']:.3f}, "
                f"95% half-width over replications {rows[-1]['replication_half_width_95']:.3f}, "
                f"bootstrap {rows[-1]['bootstrap_half_width_95']:.3f}"
            )
    return {
        "provenance": report.provenance(workload.predictor_version),
        "config": {k: v for k, v in asdict(config).items() if k != "out_dir"},
        "rows": rows,
    }
