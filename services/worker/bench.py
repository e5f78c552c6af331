"""``make bench-worker``: the engine's speed per batching mode, and its cost model.

Three measurements on the engine itself (no gRPC, no scheduler), with the worker's model:
1. modes: the same offline workload (jobs with replayed answer lengths, all arriving at
   once, taken in arrival order) under none, dynamic and continuous batching: tokens/s,
   decoding-step latency, mean batch size and mean job completion time;
2. decode step latency per batch size and context length (the simulator's per-step cost);
3. prefill latency per prompt length, with a linear fit (cost per prompt token);
4. with ``--compare-kv-cache BxC,...``: the decoding step with the engine's in-place KV cache
   (``services.worker.kv_cache``) against transformers' per-step concatenation, in
   interleaved rounds at batch size B and context C.

Writes bench/results/worker.json and worker.png and prints tables. Run:
    .venv/bin/python -m services.worker.bench            (what ``make bench-worker`` runs)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers.cache_utils import DynamicLayer

from services.common.machine import describe_machine
from services.common.paths import CHECKOUT_ROOT
from services.worker.engine import Batching, Engine, StepStat
from services.worker.jobs import GenerationRequest, Sampling
from services.worker.kv_cache import GrowingLayer
from services.worker.model import LoadedModel, load_model

DEFAULT_OUT = CHECKOUT_ROOT / "bench" / "results" / "worker.json"


def _median_decode_ms(
    model: LoadedModel, batch_size: int, context: int, steps: int, seed: int
) -> float:
    """Median decoding-step latency for ``batch_size`` rows at about ``context`` tokens."""
    rng = random.Random(seed)
    stats: list[StepStat] = []
    # The cache budget must not hold rows back: the sweep measures exactly batch_size rows.
    budget = batch_size * (context + steps + 1)
    engine = Engine(
        model, Batching.DYNAMIC, batch_size, on_step=stats.append, max_batch_total_tokens=budget
    )
    for index in range(batch_size):
        engine.submit(
            GenerationRequest(
                f"sweep-{index}",
                _prompt_ids(model, rng, context),
                Sampling(steps + 1, replay_output_tokens=steps + 1),
            )
        )
    while engine.has_work():
        engine.step()
    return _percentile([s.seconds * 1e3 for s in stats if s.kind == "decode"], 50)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def _prompt_ids(model: LoadedModel, rng: random.Random, length: int) -> tuple[int, ...]:
    """A prompt of exactly ``length`` ids drawn from ordinary (non-special) tokens."""
    special = set(model.tokenizer.all_special_ids)
    vocab = model.tokenizer.vocab_size
    ids: list[int] = []
    while len(ids) < length:
        candidate = rng.randrange(1000, vocab)
        if candidate not in special:
            ids.append(candidate)
    return tuple(ids)


def workload(model: LoadedModel, jobs: int, seed: int) -> list[GenerationRequest]:
    """Jobs with log-normal prompt and answer lengths (chat-like: many short answers, a few
    long ones), replayed so every mode generates exactly the same tokens."""
    rng = random.Random(seed)
    requests = []
    for index in range(jobs):
        prompt_len = int(min(512, max(8, rng.lognormvariate(4.0, 0.7))))
        answer_len = int(min(256, max(4, rng.lognormvariate(3.8, 0.9))))
        requests.append(
            GenerationRequest(
                f"bench-{index}",
                _prompt_ids(model, rng, prompt_len),
                Sampling(max_new_tokens=answer_len, replay_output_tokens=answer_len),
            )
        )
    return requests


def run_mode(
    model: LoadedModel, batching: Batching, max_batch_size: int, requests: list[GenerationRequest]
) -> dict[str, object]:
    steps: list[StepStat] = []
    engine = Engine(model, batching, max_batch_size, on_step=steps.append)
    for request in requests:
        engine.submit(request)
    finished_at: dict[str, float] = {}
    total_tokens = sum(r.sampling.replay_output_tokens for r in requests)
    started = time.perf_counter()
    with tqdm(total=total_tokens, desc=f"{batching.value:>10}", unit="tok", leave=False) as bar:
        while engine.has_work():
            for update in engine.step():
                bar.update(len(update.tokens))
                if update.outcome is not None:
                    finished_at[update.job_id] = time.perf_counter() - started
    wall = time.perf_counter() - started
    decode_ms = [s.seconds * 1e3 for s in steps if s.kind == "decode"]
    decode_sizes = [s.batch_size for s in steps if s.kind == "decode"]
    prefill_s = sum(s.seconds for s in steps if s.kind == "prefill")
    return {
        "batching": batching.value,
        "max_batch_size": engine.max_batch_size,
        "jobs": len(requests),
        "generated_tokens": total_tokens,
        "wall_s": wall,
        "tokens_per_s": total_tokens / wall,
        "decode_steps": len(decode_ms),
        "decode_step_ms_p50": _percentile(decode_ms, 50),
        "decode_step_ms_p99": _percentile(decode_ms, 99),
        "mean_decode_batch": statistics.fmean(decode_sizes) if decode_sizes else 0.0,
        "prefill_s_total": prefill_s,
        "mean_jct_s": statistics.fmean(finished_at.values()),
    }


def decode_sweep(
    model: LoadedModel, batch_sizes: list[int], contexts: list[int], steps: int, seed: int
) -> list[dict[str, float]]:
    """Median decoding-step latency for b rows at about ``context`` tokens each."""
    points = []
    for context in contexts:
        for batch_size in tqdm(batch_sizes, desc=f"decode@{context}", leave=False):
            step_ms = _median_decode_ms(model, batch_size, context, steps, seed)
            points.append(
                {
                    "batch_size": batch_size,
                    "context": context,
                    "step_ms_p50": step_ms,
                    "ms_per_token": step_ms / batch_size,
                }
            )
    return points


def compare_kv_cache(
    model: LoadedModel, points: list[tuple[int, int]], rounds: int, steps: int, seed: int
) -> list[dict[str, object]]:
    """Decoding-step p50 with the in-place cache and with transformers' ``torch.cat`` append,
    alternating within each round so that the machine's drift hits both alike."""
    in_place = GrowingLayer.update
    results = []
    with tqdm(total=rounds * len(points) * 2, desc="kv cache", unit="run") as progress:
        runs: dict[tuple[int, int], dict[str, list[float]]] = {
            point: {"in_place": [], "concatenate": []} for point in points
        }
        try:
            for _ in range(rounds):
                for point in points:
                    for variant, update in (
                        ("concatenate", DynamicLayer.update),
                        ("in_place", in_place),
                    ):
                        GrowingLayer.update = update  # type: ignore[method-assign]
                        runs[point][variant].append(_median_decode_ms(model, *point, steps, seed))
                        progress.update()
        finally:
            GrowingLayer.update = in_place  # type: ignore[method-assign]
    for (batch_size, context), variants in runs.items():
        ratios = [
            new / old
            for new, old in zip(variants["in_place"], variants["concatenate"], strict=True)
        ]
        results.append(
            {
                "batch_size": batch_size,
                "context": context,
                "steps_per_run": steps,
                "step_ms_p50_in_place": variants["in_place"],
                "step_ms_p50_concatenate": variants["concatenate"],
                "in_place_over_concatenate": {"min": min(ratios), "max": max(ratios)},
            }
        )
    return results


def prefill_sweep(
    model: LoadedModel, lengths: list[int], repeats: int, seed: int
) -> dict[str, object]:
    """Prefill latency of one prompt per length, and its linear fit in prompt tokens."""
    rng = random.Random(seed)
    points = []
    for length in tqdm(lengths, desc="prefill", leave=False):
        timings = []
        for repeat in range(repeats):
            stats: list[StepStat] = []
            engine = Engine(model, Batching.NONE, 1, on_step=stats.append)
            engine.submit(
                GenerationRequest(f"prefill-{repeat}", _prompt_ids(model, rng, length), Sampling(1))
            )
            engine.step()
            timings.append(stats[0].seconds * 1e3)
        points.append({"prompt_tokens": length, "ms_p50": statistics.median(timings)})
    slope, intercept = np.polyfit(
        [p["prompt_tokens"] for p in points], [p["ms_p50"] for p in points], 1
    )
    return {"points": points, "ms_per_prompt_token": slope, "intercept_ms": intercept}


def fit_decode(points: list[dict[str, float]]) -> list[dict[str, float]]:
    """Per context: step_ms ~= base_ms + per_sequence_ms * batch_size."""
    fits = []
    for context in sorted({p["context"] for p in points}):
        row = [p for p in points if p["context"] == context]
        slope, intercept = np.polyfit(
            [p["batch_size"] for p in row], [p["step_ms_p50"] for p in row], 1
        )
        fits.append({"context": context, "base_ms": intercept, "per_sequence_ms": slope})
    return fits


def print_tables(result: dict[str, object]) -> None:
    print(
        f"\nworker engine on {result['device']} ({result['dtype']}), model {result['model']}, "
        f"{result['torch_threads']} torch threads"
    )
    print(
        f"\n{'batching':<11}{'B':>3}{'jobs':>6}{'tokens':>8}{'wall s':>8}{'tok/s':>8}"
        f"{'step p50':>10}{'step p99':>10}{'mean B':>8}{'mean JCT s':>12}"
    )
    for mode in result["modes"]:
        print(
            f"{mode['batching']:<11}{mode['max_batch_size']:>3}{mode['jobs']:>6}"
            f"{mode['generated_tokens']:>8}{mode['wall_s']:>8.1f}{mode['tokens_per_s']:>8.0f}"
            f"{mode['decode_step_ms_p50']:>8.1f}ms{mode['decode_step_ms_p99']:>8.1f}ms"
            f"{mode['mean_decode_batch']:>8.2f}{mode['mean_jct_s']:>12.2f}"
        )
    print("\ndecode step latency (ms, p50) by batch size")
    contexts = sorted({p["context"] for p in result["decode_step"]})
    sizes = sorted({p["batch_size"] for p in result["decode_step"]})
    print(f"{'context':>8}" + "".join(f"{'B=' + str(b):>9}" for b in sizes))
    for context in contexts:
        cells = {
            p["batch_size"]: p["step_ms_p50"]
            for p in result["decode_step"]
            if p["context"] == context
        }
        print(f"{context:>8}" + "".join(f"{cells[b]:>9.2f}" for b in sizes))
    for fit in result["decode_fit"]:
        print(
            f"  context {fit['context']}: step ms ~= {fit['base_ms']:.2f} + "
            f"{fit['per_sequence_ms']:.2f} x batch size"
        )
    prefill = result["prefill"]
    print(
        "\nprefill latency (ms, p50) by prompt tokens: "
        + ", ".join(f"{p['prompt_tokens']}: {p['ms_p50']:.1f}" for p in prefill["points"])
    )
    print(
        f"  prefill ms ~= {prefill['intercept_ms']:.2f} + "
        f"{prefill['ms_per_prompt_token']:.4f} x prompt tokens"
    )
    if result.get("kv_cache"):
        print("\nKV cache: decode step p50 (ms) per round, in place vs concatenation")
        for point in result["kv_cache"]:
            ratio = point["in_place_over_concatenate"]
            print(
                f"  B={point['batch_size']:<3} context {point['context']:<5} in place "
                + ", ".join(f"{ms:.1f}" for ms in point["step_ms_p50_in_place"])
                + " | concatenate "
                + ", ".join(f"{ms:.1f}" for ms in point["step_ms_p50_concatenate"])
                + f" | ratio {ratio['min']:.2f}-{ratio['max']:.2f}"
            )


def plot(result: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for context in sorted({p["context"] for p in result["decode_step"]}):
        row = [p for p in result["decode_step"] if p["context"] == context]
        left.plot(
            [p["batch_size"] for p in row],
            [p["step_ms_p50"] for p in row],
            "o-",
            label=f"context {context}",
        )
    left.set(xlabel="batch size", ylabel="decode step (ms, p50)", title="decode step cost")
    left.legend()
    modes = result["modes"]
    right.bar([m["batching"] for m in modes], [m["tokens_per_s"] for m in modes])
    right.set(ylabel="tokens/s", title=f"throughput, {modes[0]['jobs']} jobs")
    figure.suptitle(f"SSJF worker engine: {result['model']} on {result['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _batch_by_context(point: str) -> tuple[int, int]:
    batch_size, _, context = point.partition("x")
    return int(batch_size), int(context)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--jobs", type=int, default=32, help="jobs in the per-mode workload")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--contexts", default="128,512")
    parser.add_argument("--prefill-lengths", default="16,64,128,256,512,1024")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: on a shared 2-core machine, 2 threads stall on each\n"
        "other and step latency explodes)",
    )
    parser.add_argument(
        "--compare-kv-cache",
        default="",
        metavar="BxC,...",
        help="also time the decoding step with the in-place KV cache against transformers'\n"
        "concatenation at these batch sizes x contexts, e.g. 8x512,16x1024 (default: skip)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of that comparison"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = load_model(args.model, args.device, args.dtype)
    Engine(model, Batching.CONTINUOUS, 2).warm_up()
    requests = workload(model, args.jobs, args.seed)
    modes = [run_mode(model, mode, args.max_batch_size, requests) for mode in Batching]
    decode = decode_sweep(
        model,
        [int(b) for b in args.batch_sizes.split(",")],
        [int(c) for c in args.contexts.split(",")],
        steps=16,
        seed=args.seed,
    )
    result = {
        "command": " ".join(
            [
                Path(sys.executable).name,
                "-m",
                "services.worker.bench",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
        "model": args.model,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "machine": describe_machine(),
        "torch": torch.__version__,
        "modes": modes,
        "decode_step": decode,
        "decode_fit": fit_decode(decode),
        "prefill": prefill_sweep(
            model, [int(n) for n in args.prefill_lengths.split(",")], repeats=3, seed=args.seed
        ),
        "kv_cache": compare_kv_cache(
            model,
            [_batch_by_context(point) for point in args.compare_kv_cache.split(",") if point],
            args.rounds,
            steps=48,
            seed=args.seed,
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print_tables(result)
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
