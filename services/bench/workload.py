"""Benchmark workloads: which prompts arrive when, and how many tokens each answer has.

A workload replays one LLM's real answer lengths (AlpacaEval prompts, e.g. vicuna-13b's
answers) on whatever small model the workers run: each request asks the worker for exactly
``output_tokens`` tokens (``SamplingParams.replay_output_tokens``), so a 2-core CPU reproduces
the length distribution that makes shortest-job-first matter. Lengths are divided by a stated
``length_scale`` so a run takes seconds, not hours; the order of lengths, which is all a
scheduler sees, is unchanged.

Arrivals are Poisson at a target rate, or the Azure LLM inference trace's own timestamps
(bursty, as in production) rescaled to that rate.

Several LLMs at once (``--llm vicuna-13b,gpt4_0314``): a mixed stream, each request for one
of the named LLMs (equally often), each with that LLM's real answer lengths; the scheduler
keeps one queue per LLM and the workers serve every name.

Lengths from the Azure trace (``--lengths azure-conversation``): the trace has no prompt
text, so the AlpacaEval prompts are kept and their answer lengths are mapped quantile to
quantile onto the trace's ``GeneratedTokens`` distribution. The distribution becomes the
production one while the order of lengths, and so what the proxy model can know about it,
stays the LLM's.

Another source of lengths (e.g. the served model's own generation until EOS) plugs in as
one more entry of ``LENGTH_SOURCES``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from services.common.paths import CHECKOUT_ROOT

if TYPE_CHECKING:
    from services.common.alpaca import LengthDataset, PromptId

WORKLOAD_DIR = CHECKOUT_ROOT / "bench" / "workloads"
ARRIVAL_PROCESSES = ("poisson", "azure-conversation", "azure-code")
LENGTH_SOURCES = ("alpaca", "azure-conversation", "azure-code")


@dataclass(frozen=True)
class PromptLength:
    """One prompt and the length of one LLM's real answer to it."""

    prompt_id: int
    prompt: str
    output_tokens: int
    # The LLM whose answer this is (and which the request asks for); "" for the run's one LLM.
    llm: str = ""


@dataclass(frozen=True)
class Request:
    """One request of a run: when it arrives, what it asks, how long its answer is."""

    index: int
    arrival_s: float
    prompt_id: int
    prompt: str
    # Tokens the worker generates (the LLM's real length divided by the length scale).
    output_tokens: int
    # The LLM's real answer length, before scaling.
    true_output_tokens: int
    # The LLM asked for ("" : the run's one LLM).
    llm: str = ""
    # Real generation (services/bench/realgen.py): the LLM answers to EOS, no replay.
    real: bool = False


def vendored_workload_path(llm: str) -> Path:
    return WORKLOAD_DIR / f"alpaca_{llm}.jsonl"


def load_vendored(path: Path) -> list[PromptLength]:
    """Read a workload slice written by ``write_workload_slice``."""
    items = []
    with path.open() as lines:
        for line in lines:
            if line.strip():
                row = json.loads(line)
                items.append(PromptLength(row["prompt_id"], row["prompt"], row["output_tokens"]))
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items


def load_from_data(data_dir: Path, llm: str) -> list[PromptLength]:
    """The test prompts of the full AlpacaEval set with ``llm``'s real answer lengths.

    The split is the predictor's own (by prompt), so the proxy model never saw these prompts.
    The served model's own labels (``SERVED_MODEL_LABELS``, committed) are joined like the
    predictor's training joins them, so ``smollm2-135m-instruct`` is a workload too.
    """
    from services.common.alpaca import add_labels, load_dataset
    from services.common.paths import SERVED_MODEL_LABELS
    from services.predictor.training import split_dataset

    dataset = load_dataset(data_dir / "alpaca_eval")
    if llm not in dataset.lengths and SERVED_MODEL_LABELS.exists():
        dataset = add_labels(dataset, SERVED_MODEL_LABELS)
    return held_out_prompt_lengths(dataset, llm, split_dataset(dataset).test)


def held_out_prompt_lengths(
    dataset: LengthDataset, llm: str, test_ids: Collection[PromptId]
) -> list[PromptLength]:
    """The prompts of ``test_ids`` (the predictor's held-out split) that ``llm`` answered, in
    ``dataset``'s file order. The caller passes the split it scores, so the two cannot differ."""
    held_out = set(test_ids)
    lengths = dataset.lengths_for(llm)
    return [
        PromptLength(prompt.prompt_id, prompt.text, lengths[prompt.prompt_id])
        for prompt in dataset.prompts
        if prompt.prompt_id in held_out and prompt.prompt_id in lengths
    ]


def llm_names(llm: str) -> list[str]:
    """``vicuna-13b,gpt4_0314`` -> the LLMs of a (mixed) stream."""
    names = [name.strip() for name in llm.split(",") if name.strip()]
    if not names:
        raise ValueError("no LLM named")
    return names


def load_workload(
    llm: str, data_dir: Path | None, lengths: str = "alpaca"
) -> tuple[list[PromptLength], str]:
    """The prompts and answer lengths of one LLM or a comma-separated mix (each item tagged
    with its LLM), lengths optionally mapped onto an Azure trace's distribution."""
    names = llm_names(llm)
    items: list[PromptLength] = []
    sources = []
    for name in names:
        one, source = load_prompt_lengths(name, data_dir)
        if lengths != "alpaca":
            one = map_lengths_to(one, azure_generated_tokens(lengths, data_dir))
        items += [replace(item, llm=name) for item in one]
        sources.append(source)
    if lengths != "alpaca":
        sources.append(f"lengths mapped by quantile onto {azure_lengths_path(lengths, data_dir)}")
    return items, "; ".join(sources)


def azure_lengths_path(lengths: str, data_dir: Path | None) -> Path:
    kind = lengths.removeprefix("azure-")
    if kind not in ("conversation", "code"):
        raise ValueError(f"unknown length source {lengths!r}; use one of {LENGTH_SOURCES}")
    if data_dir is not None and (full := data_dir / "azure_llm_2023" / f"{kind}.csv").exists():
        return full
    return WORKLOAD_DIR / f"azure_{kind}_generated_tokens.csv"


def azure_generated_tokens(lengths: str, data_dir: Path | None) -> np.ndarray:
    """The ``GeneratedTokens`` column of an Azure trace (full, or the vendored column)."""
    path = azure_lengths_path(lengths, data_dir)
    with path.open() as rows:
        values = np.array([int(row["GeneratedTokens"]) for row in csv.DictReader(rows)])
    if len(values) == 0:
        raise ValueError(f"{path}: no GeneratedTokens")
    return values


def map_lengths_to(items: Sequence[PromptLength], target: np.ndarray) -> list[PromptLength]:
    """Each item's length replaced by the same quantile of ``target``: the item at mid-rank
    quantile q (ties share their mean rank) gets ``quantile(target, q)``. Order is kept."""
    from scipy.stats import rankdata

    ranks = rankdata([item.output_tokens for item in items])  # 1..n, ties averaged
    quantiles = (ranks - 0.5) / len(items)
    mapped = np.quantile(np.sort(target), quantiles, method="inverted_cdf")
    return [
        replace(item, output_tokens=max(1, int(tokens)))
        for item, tokens in zip(items, mapped, strict=True)
    ]


def load_prompt_lengths(llm: str, data_dir: Path | None) -> tuple[list[PromptLength], str]:
    """The full data set's held-out prompts when ``data_dir`` exists, else the vendored slice.

    Returns the items and a description of where they came from.
    """
    if data_dir is not None and (data_dir / "alpaca_eval").is_dir():
        return load_from_data(data_dir, llm), f"{data_dir}/alpaca_eval (held-out prompts)"
    path = vendored_workload_path(llm)
    if not path.exists():
        known = sorted(p.stem.removeprefix("alpaca_") for p in WORKLOAD_DIR.glob("alpaca_*.jsonl"))
        raise FileNotFoundError(
            f"no workload for LLM {llm!r}: {path} is missing and no --data directory was given "
            f"(vendored LLMs: {', '.join(known) or 'none'})"
        )
    return load_vendored(path), str(path.relative_to(CHECKOUT_ROOT))


def write_workload_slice(items: Sequence[PromptLength], path: Path) -> None:
    """Vendor a slice of the data set into the repository, one JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for item in items:
            row = {"prompt_id": item.prompt_id, "prompt": item.prompt}
            out.write(json.dumps({**row, "output_tokens": item.output_tokens}) + "\n")


def scale_length(tokens: int, length_scale: float) -> int:
    """``tokens / length_scale`` rounded, at least 1 (every answer has a token)."""
    return max(1, round(tokens / length_scale))


def poisson_arrivals(count: int, rate_rps: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (seconds from 0) of a Poisson process with ``rate_rps``."""
    gaps = rng.exponential(1.0 / rate_rps, size=count)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def azure_trace_path(kind: str, data_dir: Path | None) -> Path:
    """The full trace under ``data_dir`` when present, else the vendored slice."""
    if data_dir is not None:
        full = data_dir / "azure_llm_2023" / f"{kind}.csv"
        if full.exists():
            return full
    return WORKLOAD_DIR / f"azure_{kind}_timestamps.csv"


def read_azure_offsets(path: Path) -> np.ndarray:
    """Arrival offsets in seconds from a trace CSV with a ``TIMESTAMP`` column, sorted."""
    with path.open() as rows:
        stamps = [row["TIMESTAMP"] for row in csv.DictReader(rows)]
    if len(stamps) < 2:
        raise ValueError(f"{path}: need at least two timestamps")
    # The trace has 7 fractional digits; datetime takes at most 6.
    times = np.array(sorted(datetime.fromisoformat(s[:26]).timestamp() for s in stamps))
    return times - times[0]


def trace_arrivals(
    offsets: np.ndarray, count: int, rate_rps: float, rng: np.random.Generator
) -> np.ndarray:
    """``count`` consecutive arrivals from a random point of a trace, rescaled to ``rate_rps``.

    The gaps keep the trace's shape (its bursts); only the time unit changes, so the mean
    rate of the window is exactly ``rate_rps``.
    """
    gaps = np.diff(offsets)
    if len(gaps) < count:
        reps = math.ceil(count / len(gaps))
        gaps = np.tile(gaps, reps)
    start = int(rng.integers(0, len(gaps) - count + 1))
    window = gaps[start : start + count].astype(float)
    window[0] = 0.0
    mean_gap = window[1:].mean() if count > 1 else 1.0
    if mean_gap <= 0:
        raise ValueError("trace window has no time span; choose another seed")
    return np.cumsum(window / mean_gap / rate_rps)


def build_requests(
    items: Sequence[PromptLength],
    count: int,
    rate_rps: float,
    length_scale: float,
    seed: int,
    arrivals: str = "poisson",
    data_dir: Path | None = None,
) -> list[Request]:
    """``count`` requests: prompts drawn with replacement, arrival times from ``arrivals``.

    The same seed gives the same prompts in the same order whatever the rate, and the same
    arrival pattern stretched to each rate, so runs at different loads and with different
    policies see the same jobs (common random numbers).
    """
    if rate_rps <= 0:
        raise ValueError(f"arrival rate must be positive, got {rate_rps}")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(items), size=count)
    if arrivals == "poisson":
        # Unit-rate arrivals divided by the rate: the same pattern at every load.
        times = poisson_arrivals(count, 1.0, np.random.default_rng(seed + 1)) / rate_rps
    elif arrivals.startswith("azure-"):
        offsets = read_azure_offsets(azure_trace_path(arrivals.removeprefix("azure-"), data_dir))
        times = trace_arrivals(offsets, count, rate_rps, np.random.default_rng(seed + 1))
    else:
        raise ValueError(f"unknown arrival process {arrivals!r}; use {ARRIVAL_PROCESSES}")
    return [
        Request(
            index=i,
            arrival_s=float(times[i]),
            prompt_id=items[pick].prompt_id,
            prompt=items[pick].prompt,
            output_tokens=scale_length(items[pick].output_tokens, length_scale),
            true_output_tokens=items[pick].output_tokens,
            llm=items[pick].llm,
        )
        for i, pick in enumerate(picks)
    ]
