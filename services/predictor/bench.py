"""``make bench-predictor``: accuracy of each formulation and speed of each engine, on this CPU.

Reads the artifacts of ``ssjf train-predictor --compare --keep-fp32 --out runs/predictor``
(one directory per formulation, each with the int8 ``model.onnx``, ``model.fp32.onnx`` and
the PyTorch weights) and the shipped default artifact, then:

1. scores every formulation (through its ONNX artifact), a TF-IDF ridge and the prompt length
   on the held-out test prompts, for vicuna-13b, gpt4_0314 and llama-2-13b-chat-hf;
2. times one prompt at a time (tokenization included): p50 / p99 latency;
3. times batches of 1, 8 and 32 prompts: prompts/s for ONNX int8, ONNX fp32, PyTorch eager;
4. times the real gRPC service with concurrent single-prompt callers (micro-batching).

Prints tables and writes ``bench/results/predictor.json`` and ``predictor.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from services.common.alpaca import LengthDataset, default_data_dir, load_dataset
from services.common.machine import describe_machine
from services.common.paths import CHECKOUT_ROOT
from services.predictor.evaluate import score
from services.predictor.export import FP32_MODEL_FILE, MODEL_FILE, TORCH_STATE_FILE
from services.predictor.model import FORMULATIONS
from services.predictor.runtime import DEFAULT_ARTIFACT, ArtifactRuntime, similar_length_chunks
from services.predictor.training import split_dataset

TABLE_LLMS = ("vicuna-13b", "gpt4_0314", "llama-2-13b-chat-hf")
BATCH_SIZES = (1, 8, 32)
REPEATS = 3


def _metrics(predicted: Sequence[float], true: Sequence[float]) -> dict[str, float]:
    metrics = score(predicted, true)
    return {"tau": metrics.kendall_tau, "rho": metrics.spearman_rho, "mae": metrics.mae_tokens}


def _true_lengths(test: LengthDataset, llm: str) -> tuple[list[int], list[float]]:
    answered = test.lengths_for(llm)
    keep = [index for index, prompt in enumerate(test.prompts) if prompt.prompt_id in answered]
    return keep, [answered[test.prompts[index].prompt_id] for index in keep]


def accuracy_table(
    dataset: LengthDataset, runs: Path, threads: int
) -> dict[str, dict[str, dict[str, float]]]:
    """{row name: {llm: {tau, rho, mae}}} on the held-out test prompts."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge

    split = split_dataset(dataset)
    train, test = dataset.subset(split.train), dataset.subset(split.test)
    test_texts = [prompt.text for prompt in test.prompts]
    rows: dict[str, dict[str, dict[str, float]]] = {}
    artifacts = [(name, runs / name, MODEL_FILE) for name in FORMULATIONS]
    artifacts += [(f"{name} (fp32)", runs / name, FP32_MODEL_FILE) for name in FORMULATIONS]
    artifacts.append(("shipped default (int8)", DEFAULT_ARTIFACT, MODEL_FILE))
    for name, directory, model_file in tqdm(artifacts, desc="score artifacts", unit="artifact"):
        if not (directory / model_file).exists():
            continue
        runtime = ArtifactRuntime(directory, intra_op_threads=threads, model_file=model_file)
        order = sorted(range(len(test_texts)), key=lambda index: len(test_texts[index]))
        predicted = np.zeros((len(test_texts), len(runtime.llms) + 1))
        for start in range(0, len(order), 32):
            chunk = order[start : start + 32]
            predicted[chunk] = runtime.predict_all([test_texts[index] for index in chunk])
        rows[name] = {}
        for llm in TABLE_LLMS:
            keep, true = _true_lengths(test, llm)
            rows[name][llm] = _metrics(predicted[keep, runtime.llms.index(llm)], true)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    train_features = vectorizer.fit_transform([prompt.text for prompt in train.prompts])
    test_features = vectorizer.transform(test_texts)
    rows["TF-IDF ridge (per LLM)"], rows["prompt length (words)"] = {}, {}
    prompt_tokens = np.array([len(text.split()) for text in test_texts])
    for llm in TABLE_LLMS:
        train_keep, train_true = _true_lengths(train, llm)
        ridge = Ridge(alpha=1.0).fit(train_features[train_keep], np.log1p(train_true))
        keep, true = _true_lengths(test, llm)
        rows["TF-IDF ridge (per LLM)"][llm] = _metrics(
            np.expm1(ridge.predict(test_features[keep])), true
        )
        rows["prompt length (words)"][llm] = _metrics(prompt_tokens[keep], true)
    return rows


def latency_in_turns(
    engines: dict[str, Callable[[list[Any]], Any]], prompts: Sequence[Any], desc: str = ""
) -> dict[str, list[float]]:
    """Milliseconds of each engine on each single prompt, the engines taking turns per prompt
    so that load from other processes on a shared machine falls on all of them alike (a
    progress bar when ``desc`` is given)."""
    samples: dict[str, list[float]] = {name: [] for name in engines}
    for prompt in tqdm(prompts, desc=desc, unit="prompt", disable=not desc):
        for name, call in engines.items():
            started = time.perf_counter()
            call([prompt])
            samples[name].append((time.perf_counter() - started) * 1e3)
    return samples


def prompts_per_second(call: Callable[[list[Any]], Any], prompts: list[Any], batch: int) -> float:
    """Prompts per second over ``prompts`` in consecutive batches of ``batch``."""
    call(prompts[:batch])  # warm this shape family
    started = time.perf_counter()
    for start in range(0, len(prompts) - batch + 1, batch):
        call(prompts[start : start + batch])
    done = (len(prompts) // batch) * batch
    return done / (time.perf_counter() - started)


def command_line(module: str, argv: list[str] | None) -> str:
    """The command a result came from, for its JSON."""
    return f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)


def run_record(module: str, argv: list[str] | None) -> dict[str, Any]:
    """A rating's JSON as it starts: the command it came from and the machine's load."""
    return {"command": command_line(module, argv), "load_average_1m_at_start": os.getloadavg()[0]}


def finish_record(path: str | Path, result: dict[str, Any], started: float) -> Path:
    """Stamp a rating's JSON with its minutes since ``started`` (``time.monotonic``) and the
    load at its end, and write it."""
    result["minutes"] = (time.monotonic() - started) / 60
    result["load_average_1m_at_end"] = os.getloadavg()[0]
    return write_result(path, result)


def write_result(path: str | Path, result: dict[str, Any]) -> Path:
    """Write a benchmark's JSON result (creating its directory) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out


def eager_engine(
    run: Path, runtime: ArtifactRuntime, threads: int
) -> Callable[[list[str]], np.ndarray]:
    """PyTorch eager on ``run``'s weights doing the same work as ``runtime.predict_all``
    (same tokenization, same similar-length sub-batches)."""
    import torch

    from services.predictor.model import LengthModel

    torch.set_num_threads(threads)
    eager = LengthModel.from_state_dict(
        runtime.formulation, torch.load(run / TORCH_STATE_FILE, weights_only=True)
    )

    def torch_call(batch: list[str]) -> np.ndarray:
        rows = runtime.tokenizer.token_ids(batch)
        tokens = np.empty((len(rows), len(runtime.llms) + 1), dtype=np.float32)
        with torch.inference_mode():
            for chunk in similar_length_chunks([len(row) for row in rows]):
                input_ids, mask = runtime.tokenizer.pad([rows[index] for index in chunk])
                tokens[chunk] = eager.predict_tokens(
                    torch.from_numpy(input_ids), torch.from_numpy(mask)
                ).numpy()
        return tokens

    return torch_call


def speed(run: Path, prompts: list[str], threads: int) -> dict[str, Any]:
    int8 = ArtifactRuntime(run, intra_op_threads=threads)
    fp32 = ArtifactRuntime(run, intra_op_threads=threads, model_file=FP32_MODEL_FILE)
    torch_call = eager_engine(run, int8, threads)

    engines: dict[str, Callable[[list[str]], Any]] = {
        "onnx-int8": int8.predict_all,
        "onnx-fp32": fp32.predict_all,
        "pytorch-eager": torch_call,
    }
    # The engines take turns (per prompt, per batch size, per repeat) so that load from other
    # processes on a shared machine falls on all of them alike; throughput keeps the best of
    # REPEATS runs (the least disturbed), latency reports the percentiles of every call.
    for call in engines.values():
        call(prompts[:1])
    samples = latency_in_turns(engines, prompts, "single-prompt latency")
    latency = {
        name: {
            "p50_ms": statistics.median(values),
            "p99_ms": float(np.percentile(values, 99)),
            "mean_ms": statistics.fmean(values),
        }
        for name, values in samples.items()
    }
    throughput: dict[str, dict[str, float]] = {name: {} for name in engines}
    for batch in tqdm(BATCH_SIZES, desc="batched throughput", unit="batch size"):
        for _ in range(REPEATS):
            for name, call in engines.items():
                rate = prompts_per_second(call, prompts, batch)
                throughput[name][str(batch)] = max(rate, throughput[name].get(str(batch), 0.0))
    return {"latency": latency, "throughput_prompts_per_s": throughput}


async def _service_throughput(prompts: list[str], threads: int, concurrency: int) -> dict[str, Any]:
    """Concurrent single-prompt Predict calls against the real gRPC service, in process."""
    import grpc

    from services.pb import predictor_pb2, predictor_pb2_grpc
    from services.predictor.core import LengthPredictor
    from services.predictor.server import predictor_host

    predictor = LengthPredictor(ArtifactRuntime(DEFAULT_ARTIFACT, intra_op_threads=threads))
    host = predictor_host(predictor, host="127.0.0.1", port=0)
    port = await host.start()
    await predictor.start()
    queue = list(prompts)
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = predictor_pb2_grpc.PredictorStub(channel)

        async def caller() -> None:
            while queue:
                prompt = queue.pop()
                started = time.perf_counter()
                await stub.Predict(predictor_pb2.PredictRequest(prompt=prompt))
                latencies.append((time.perf_counter() - started) * 1e3)

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    batches = predictor.batcher.batches_run
    await predictor.stop()
    await host.server.stop(grace=None)
    return {
        "concurrency": concurrency,
        "prompts_per_s": len(prompts) / elapsed,
        "p50_ms": statistics.median(latencies),
        "p99_ms": float(np.percentile(latencies, 99)),
        "mean_batch_size": len(prompts) / max(batches, 1),
    }


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    throughput = result["speed"]["throughput_prompts_per_s"]
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.25
    for offset, (engine, by_batch) in enumerate(throughput.items()):
        xs = np.arange(len(BATCH_SIZES)) + (offset - 1) * width
        axis.bar(xs, [by_batch[str(batch)] for batch in BATCH_SIZES], width, label=engine)
    axis.set_xticks(np.arange(len(BATCH_SIZES)), [f"batch {batch}" for batch in BATCH_SIZES])
    axis.set_ylabel("prompts / s")
    axis.set_title(f"Predictor throughput on {result['machine']['cpus']} CPU cores")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(default_data_dir() or ""), help="shared-format data")
    parser.add_argument("--runs", default=str(CHECKOUT_ROOT / "runs" / "predictor"))
    parser.add_argument(
        "--speed-formulation",
        default=None,
        help="run whose engines are timed (default: the shipped formulation)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", default=str(CHECKOUT_ROOT / "bench" / "results" / "predictor.json")
    )
    args = parser.parse_args(argv)
    if not args.data:
        raise SystemExit("no data: pass --data (../shared/data/alpaca_eval)")
    dataset = load_dataset(args.data)
    runs = Path(args.runs)
    shipped = ArtifactRuntime(DEFAULT_ARTIFACT)
    speed_run = runs / (args.speed_formulation or shipped.formulation)
    test = dataset.subset(split_dataset(dataset).test)
    prompts = [prompt.text for prompt in test.prompts]
    result: dict[str, Any] = {
        "command": "make bench-predictor",
        "machine": {
            **describe_machine(),
            # Other processes on the machine slow every timing below: read them with this.
            "load_average_1m_at_start": os.getloadavg()[0],
        },
        "threads": args.threads,
        "held_out_prompts": len(prompts),
        "shipped_version": shipped.version,
        "shipped_formulation": shipped.formulation,
        "accuracy": accuracy_table(dataset, runs, args.threads),
        "speed_run": str(speed_run),
        "speed": speed(speed_run, prompts, args.threads),
        "service": asyncio.run(_service_throughput(prompts * 2, args.threads, concurrency=32)),
    }
    result["machine"]["load_average_1m_at_end"] = os.getloadavg()[0]
    print(f"\nHeld-out test prompts: {len(prompts)} (split by prompt, seed 0)")
    print(f"{'model':<28}" + "".join(f"{llm:>30}" for llm in TABLE_LLMS))
    print(f"{'':<28}" + "".join(f"{'tau   rho    MAE':>30}" for _ in TABLE_LLMS))
    for name, by_llm in result["accuracy"].items():
        cells = "".join(
            f"{by_llm[llm]['tau']:>14.3f}{by_llm[llm]['rho']:>7.3f}{by_llm[llm]['mae']:>9.1f}"
            for llm in TABLE_LLMS
        )
        print(f"{name:<28}{cells}")
    print(
        f"\nSpeed ({args.threads} threads, run {speed_run.name}; 1-min load average "
        f"{result['machine']['load_average_1m_at_start']:.1f} at start, "
        f"{result['machine']['load_average_1m_at_end']:.1f} at end, on {os.cpu_count()} cores):"
    )
    print(
        f"{'engine':<16}{'p50 ms':>9}{'p99 ms':>9}"
        + "".join(f"{f'b={b} /s':>11}" for b in BATCH_SIZES)
    )
    for engine, latency in result["speed"]["latency"].items():
        by_batch = result["speed"]["throughput_prompts_per_s"][engine]
        print(
            f"{engine:<16}{latency['p50_ms']:>9.2f}{latency['p99_ms']:>9.2f}"
            + "".join(f"{by_batch[str(b)]:>11.1f}" for b in BATCH_SIZES)
        )
    service = result["service"]
    print(
        f"\ngRPC service, {service['concurrency']} concurrent callers: "
        f"{service['prompts_per_s']:.1f} prompts/s, p50 {service['p50_ms']:.1f} ms, "
        f"p99 {service['p99_ms']:.1f} ms, mean batch {service['mean_batch_size']:.1f}"
    )
    out = write_result(args.out, result)
    _plot(result, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
