"""Speed levers of the predictor, each measured for its speed AND its held-out tau, in one run.

Engines (each on the 161 held-out prompts, taking turns per prompt so that load from other
processes falls on all alike):

- the previous shipped artifact (6 layers, 256 word pieces, int8);
- the candidate artifact as ONNX int8, ONNX fp32, ONNX int8 after ONNX Runtime's transformer
  fusions (``onnxruntime.transformers.optimizer``), ONNX int8 with one intra-op thread (a
  session option), and PyTorch eager (same weights, same sub-batches);
- a student (fewer layers) when given;
- the prompt-hash cache (a hit: what a repeated prompt costs) and the first-stage model (what
  the scheduler pays at Submit).

``python -m services.predictor.levers --candidate runs/final-mse [--student runs/student3-128]
[--previous services/predictor/artifacts/default]`` prints a table and writes
``bench/results/predictor_levers.json`` with the load average at start and end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from services.common.alpaca import default_data_dir, load_dataset
from services.common.first_stage import FIRST_STAGE_FILE, FirstStageModel
from services.common.machine import describe_machine
from services.common.paths import CHECKOUT_ROOT
from services.predictor.bench import command_line, eager_engine, latency_in_turns, write_result
from services.predictor.core import PredictionCache
from services.predictor.evaluate import score
from services.predictor.export import FP32_MODEL_FILE, MODEL_FILE, TORCH_STATE_FILE
from services.predictor.runtime import ArtifactRuntime
from services.predictor.training import split_dataset

FUSED_FP32_FILE = "model.fused.fp32.onnx"
FUSED_INT8_FILE = "model.fused.int8.onnx"
LLM = "vicuna-13b"
BATCH = 32
REPEATS = 3


def fused_int8(run: Path) -> Path:
    """ONNX Runtime's BERT fusions (LayerNorm, Gelu, ...) on the fp32 graph, then int8."""
    target = run / FUSED_INT8_FILE
    if not target.exists():
        from onnxruntime.transformers.optimizer import optimize_model

        model = optimize_model(
            str(run / FP32_MODEL_FILE), model_type="bert", num_heads=12, hidden_size=384
        )
        model.save_model_to_file(str(run / FUSED_FP32_FILE))
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # The fused contrib ops (BiasGelu, SkipLayerNormalization) defeat shape inference:
        # their outputs are float32.
        quantize_dynamic(
            str(run / FUSED_FP32_FILE),
            str(target),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gather"],
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(default_data_dir() or ""))
    parser.add_argument("--candidate", required=True, help="run directory (with --keep-fp32)")
    parser.add_argument("--student", default="", help="a student run directory")
    parser.add_argument(
        "--previous", default=str(CHECKOUT_ROOT / "runs" / "previous-default"),
        help="the previous shipped artifact",
    )  # fmt: skip
    parser.add_argument(
        "--also", action="append", default=[],
        help="NAME=DIR: another artifact to time beside the others (repeatable)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", default=str(CHECKOUT_ROOT / "bench" / "results" / "predictor_levers.json")
    )
    args = parser.parse_args(argv)
    dataset = load_dataset(args.data)
    test = dataset.subset(split_dataset(dataset).test)
    answered = test.lengths_for(LLM)
    prompts = [p.text for p in test.prompts if p.prompt_id in answered]
    true = [answered[p.prompt_id] for p in test.prompts if p.prompt_id in answered]
    candidate = Path(args.candidate)
    load_start = os.getloadavg()
    runtimes: dict[str, tuple[ArtifactRuntime, str]] = {}

    def add(name: str, directory: Path, model_file: str, threads: int) -> None:
        if (directory / model_file).exists():
            runtime = ArtifactRuntime(directory, intra_op_threads=threads, model_file=model_file)
            runtimes[name] = (runtime, LLM)

    add("previous int8 (6L, 256)", Path(args.previous), MODEL_FILE, args.threads)
    for extra in args.also:
        name, _, directory = extra.partition("=")
        add(name, Path(directory), MODEL_FILE, args.threads)
    add("onnx int8", candidate, MODEL_FILE, args.threads)
    add("onnx fp32", candidate, FP32_MODEL_FILE, args.threads)
    fused_int8(candidate)
    add("onnx int8 fused", candidate, FUSED_INT8_FILE, args.threads)
    add("onnx int8, 1 thread", candidate, MODEL_FILE, 1)
    if args.student:
        add("student int8", Path(args.student), MODEL_FILE, args.threads)
    engines: dict[str, Callable[[list[str]], Any]] = {
        name: runtime.predict_all for name, (runtime, _) in runtimes.items()
    }
    base = runtimes["onnx int8"][0]
    if (candidate / TORCH_STATE_FILE).exists():
        engines["pytorch eager"] = eager_engine(candidate, base, args.threads)
    cache = PredictionCache(len(prompts))
    for prompt, row in zip(prompts, base.predict_all(prompts), strict=True):
        cache.put(prompt, row)
    engines["cache hit"] = lambda batch: [cache.get(prompt) for prompt in batch]
    first_stage = FirstStageModel.load(candidate / FIRST_STAGE_FILE)
    engines["first stage"] = lambda batch: [first_stage.predict(p, LLM) for p in batch]

    column = {name: runtime.column(LLM) for name, (runtime, _) in runtimes.items()}
    taus: dict[str, float] = {}
    for name, call in engines.items():
        if name == "first stage":
            predicted = call(prompts)
        elif name == "cache hit":
            predicted = [row[base.column(LLM)] for row in call(prompts)]
        else:
            out = np.concatenate(
                [call(prompts[i : i + BATCH]) for i in range(0, len(prompts), BATCH)]
            )
            predicted = out[:, column.get(name, base.column(LLM))]
        taus[name] = score(list(map(float, predicted)), true).kendall_tau
    samples: dict[str, list[float]] = {name: [] for name in engines}
    for call in engines.values():
        call(prompts[:1])
    for _ in range(REPEATS):
        for name, values in latency_in_turns(engines, prompts).items():
            samples[name].extend(values)
    throughput: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(REPEATS):
        for name, call in engines.items():
            started = time.perf_counter()
            for i in range(0, len(prompts) - BATCH + 1, BATCH):
                call(prompts[i : i + BATCH])
            done = (len(prompts) // BATCH) * BATCH
            throughput[name].append(done / (time.perf_counter() - started))
    rows = {
        name: {
            "kendall_tau_vicuna": taus[name],
            "p50_ms": statistics.median(samples[name]),
            "p90_ms": float(np.percentile(samples[name], 90)),
            "p50_ms_per_repeat": [
                statistics.median(samples[name][r * len(prompts) : (r + 1) * len(prompts)])
                for r in range(REPEATS)
            ],
            "batch32_prompts_per_s": throughput[name],
        }
        for name in engines
    }
    result = {
        "command": command_line("services.predictor.levers", argv),
        "held_out_prompts": len(prompts),
        "repeats": REPEATS,
        "threads": args.threads,
        "load_average_at_start": load_start,
        "load_average_at_end": os.getloadavg(),
        "machine": (machine := describe_machine()),
        "engines": rows,
    }
    print(
        f"\n{len(prompts)} held-out prompts x {REPEATS} repeats; load average "
        f"{load_start[0]:.1f} at start, {result['load_average_at_end'][0]:.1f} at end, "
        f"{machine['cpus']} cores of {machine['cpu_model']} "
        f"({', '.join(machine['cpu_flags']) or 'no AVX2/AVX-512/VNNI'})"
    )
    print(
        f"{'engine':<26}{'tau':>7}{'p50 ms':>9}{'p90 ms':>9}  {'batch-32 prompts/s (repeats)':<30}"
    )
    for name, row in rows.items():
        rates = ", ".join(f"{rate:.0f}" for rate in row["batch32_prompts_per_s"])
        print(
            f"{name:<26}{row['kendall_tau_vicuna']:>7.3f}{row['p50_ms']:>9.2f}"
            f"{row['p90_ms']:>9.2f}  {rates}"
        )
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
