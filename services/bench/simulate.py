"""``ssjf simulate``: the policy grid in simulated time, for loads and scales a laptop cannot
serve (many workers, a million jobs).

Lengths are the same replayed LLM's (scaled the same way as ``ssjf bench``), the latency
model is the one ``ssjf bench`` fitted to the real worker, and SSJF's scores are the proxy
model's own predictions (the predictor's ONNX artifact, run here on every workload prompt),
or, with ``--prediction-noise``, the true lengths blurred by log-normal noise of that spread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import kendalltau
from tqdm import tqdm

from services.bench import report
from services.bench.calibrate import capacity_rps
from services.bench.latency import LatencyModel
from services.bench.simulator import SimJob, Simulation
from services.bench.workload import Request, build_requests, load_prompt_lengths
from services.common.paths import CHECKOUT_ROOT

SHIPPED_LATENCY_DIR = CHECKOUT_ROOT / "bench" / "workloads"
SATURATED_JOBS = 20_000


@dataclass
class SimulateConfig:
    out_dir: Path
    policies: list[str]
    batchings: list[str]
    loads: list[float]
    requests: int = 100_000
    workers: int = 1
    max_batch_size: int = 4
    length_scale: float = 16.0
    llm: str = "vicuna-13b"
    latency_dir: Path | None = None
    predictor_artifact: Path | None = None
    # > 0: score SSJF by noisy true lengths instead of the proxy model.
    prediction_noise: float = 0.0
    arrivals: str = "poisson"
    seed: int = 0
    aging_rate: float = 0.0
    max_wait_s: float = 0.0
    data_dir: Path | None = None


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


def proxy_predictions(prompts: dict[int, str], llm: str, artifact: Path | None) -> dict[int, float]:
    """The proxy model's predicted length of ``llm``'s answer, per prompt id."""
    from services.predictor.runtime import DEFAULT_ARTIFACT, ArtifactRuntime

    runtime = ArtifactRuntime(artifact or DEFAULT_ARTIFACT, intra_op_threads=2)
    ids = sorted(prompts)
    predictions: dict[int, float] = {}
    for start in range(0, len(ids), 32):
        chunk = ids[start : start + 32]
        answers = runtime.predict([prompts[i] for i in chunk], [llm] * len(chunk))
        predictions.update((i, answer.tokens) for i, answer in zip(chunk, answers, strict=True))
    return predictions


def predicted_scores(
    requests: Sequence[Request], predictions: dict[int, float] | None, noise: float, seed: int
) -> list[float]:
    """SSJF's score per request: the proxy model's prediction for its prompt, or (without
    predictions) the true length times exp(N(0, noise))."""
    if predictions is not None:
        return [predictions[r.prompt_id] for r in requests]
    rng = np.random.default_rng(seed + 2)
    blur = np.exp(rng.normal(0.0, noise, size=len(requests)))
    return [r.true_output_tokens * float(b) for r, b in zip(requests, blur, strict=True)]


def _simulate(
    latency: LatencyModel,
    policy: str,
    batching: str,
    config: SimulateConfig,
    requests: Sequence[Request],
    scores: Sequence[float],
) -> list[SimJob]:
    jobs = [
        SimJob(
            r.index,
            r.arrival_s,
            r.output_tokens,
            score if policy == "ssjf" else float(r.output_tokens),
        )
        for r, score in zip(requests, scores, strict=True)
    ]
    simulation = Simulation(
        latency,
        policy,
        batching,
        config.max_batch_size,
        config.workers,
        aging_rate=config.aging_rate,
        max_wait_s=config.max_wait_s,
    )
    return simulation.run(jobs)


def run_simulations(config: SimulateConfig) -> dict[str, Any]:
    items, source = load_prompt_lengths(config.llm, config.data_dir)
    predictions = None
    if config.prediction_noise <= 0:
        prompts = {item.prompt_id: item.prompt for item in items}
        predictions = proxy_predictions(prompts, config.llm, config.predictor_artifact)
    scaled = [max(1, round(i.output_tokens / config.length_scale)) for i in items]
    meta: dict[str, Any] = {
        "kind": "simulation",
        "workload": {
            "source": source,
            "llm": config.llm,
            "length_scale": config.length_scale,
            "arrivals": config.arrivals,
            "prompts": len(items),
        },
        "config": {k: v for k, v in asdict(config).items() if k != "out_dir"},
        "ssjf_scores": (
            f"proxy model ({config.predictor_artifact or 'the predictor default artifact'})"
            if predictions is not None
            else f"true length x exp(N(0, {config.prediction_noise}))"
        ),
        "latency_models": {},
    }
    runs: list[dict[str, Any]] = []
    jcts: dict[tuple[str, str, float], list[float]] = {}
    saturated: dict[str, dict[str, float]] = {}
    meta["saturated_throughput_rps"] = saturated
    for batching in config.batchings:
        latency, latency_source = load_latency(batching, config.latency_dir)
        # Throughput when every job is queued at once: where batching similar lengths
        # together (SJF's order) finishes the same work sooner.
        backlog = build_requests(
            items, min(config.requests, SATURATED_JOBS), 1.0, config.length_scale, config.seed
        )
        backlog = [replace(r, arrival_s=0.0) for r in backlog]
        backlog_scores = predicted_scores(
            backlog, predictions, config.prediction_noise, config.seed
        )
        saturated[batching] = {}
        for policy in config.policies:
            done = _simulate(latency, policy, batching, config, backlog, backlog_scores)
            saturated[batching][policy] = len(done) / max(job.finish_s for job in done)
        capacity = config.workers * capacity_rps(
            latency, scaled * 4, batching, config.max_batch_size, 1
        )
        meta["latency_models"][batching] = {"source": latency_source, "fcfs_capacity_rps": capacity}
        for load in config.loads:
            requests = build_requests(
                items,
                config.requests,
                load * capacity,
                config.length_scale,
                config.seed,
                config.arrivals,
                config.data_dir,
            )
            scores = predicted_scores(requests, predictions, config.prediction_noise, config.seed)
            tau = kendalltau(scores, [r.output_tokens for r in requests]).statistic
            for policy in tqdm(config.policies, desc=f"{batching} load {load:.2f}", leave=False):
                started = time.perf_counter()
                done = _simulate(latency, policy, batching, config, requests, scores)
                jct = [job.jct_s + latency.overhead_s for job in done]
                ttft = [job.ttft_s + latency.overhead_s for job in done]
                span = max(job.finish_s for job in done) - min(job.arrival_s for job in done)
                runs.append(
                    {
                        "policy": policy,
                        "batching": batching,
                        "load": load,
                        "arrival_rate_rps": load * capacity,
                        "capacity_rps": capacity,
                        "requests": len(requests),
                        "workers": config.workers,
                        **report.summarize(jct, ttft, span),
                        "ssjf_score_kendall_tau": float(tau) if not math.isnan(tau) else None,
                        "sim_wall_s": time.perf_counter() - started,
                    }
                )
                jcts[(policy, batching, load)] = jct
    out = config.out_dir
    report.write_summary(out, runs, meta)
    title = (
        f"SSJF simulated: {config.requests:,} jobs, {config.workers} worker(s), "
        f"{config.llm} lengths / {config.length_scale:g}"
    )
    report.plot_jct_cdf(jcts, out / "jct_cdf.png", title)
    report.plot_mean_jct_vs_load(runs, out / "mean_jct_vs_load.png", title)
    return {**meta, "runs": runs}
