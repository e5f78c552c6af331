"""Send a prompt set through a running stack and record each answer, resumably.

Writes, into one output directory, the shared data format (``../shared/data/README.md``):
- ``prompts.jsonl``: the whole prompt set (``prompt_id``, ``source``, ``prompt``,
  ``prompt_tokens`` as given by the input file);
- ``lengths.csv``: ``model,prompt_id,output_tokens,output_chars`` for every answered prompt,
  ``output_tokens`` counted in the served LLM's own tokens;
- ``outputs.jsonl``: one object per answered prompt: the text, its length, why it ended
  (``eos`` or ``length``: cut by max_new_tokens), the sampling settings and timings.

``outputs.jsonl`` is the record of what is done: a restarted collect reads it, skips those
prompt ids and appends the rest; ``lengths.csv`` is rewritten from it at start, so a crash
between the two files loses nothing. Jobs that fail are not recorded and are retried by the
next run.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import grpc

from services.common.alpaca import LENGTHS_FILE, PROMPTS_FILE, Prompt, load_prompts
from services.common.channels import dial_aio
from services.common.grpc_server import CHANNEL_OPTIONS
from services.pb import common_pb2, scheduler_pb2_grpc
from services.stack.client import GenerateOptions, build_request

log = logging.getLogger(__name__)

OUTPUTS_FILE = "outputs.jsonl"
LENGTHS_HEADER = ["model", "prompt_id", "output_tokens", "output_chars"]


@dataclass(frozen=True)
class CollectConfig:
    prompts: Path
    out: Path
    # Every prompt's request: server, LLM and sampling (its prompt is replaced per prompt).
    request: GenerateOptions
    # Name written in lengths.csv's model column (default: the request's llm, else "default").
    label: str = ""
    concurrency: int = 16
    # Only the first N prompts of the set after a seeded shuffle (0: all, in file order).
    subset: int = 0
    subset_seed: int = 0
    # Send the prompts in order of length (characters), shortest first, so that the prompts
    # in flight together have similar lengths: a worker's left-padded batch pads every row to
    # its longest prompt, and one 6,000-token prompt among short ones slows them all.
    shortest_first: bool = False


@dataclass
class Answer:
    prompt_id: int
    source: str
    output: str
    output_tokens: int
    output_chars: int
    finish_reason: str
    completion_s: float
    time_to_first_token_s: float
    job_id: str
    settings: dict[str, Any] = field(default_factory=dict)


def select_prompts(config: CollectConfig) -> list[Prompt]:
    prompts = load_prompts(config.prompts)
    if config.subset:
        shuffled = list(prompts)
        random.Random(config.subset_seed).shuffle(shuffled)
        chosen = {prompt.prompt_id for prompt in shuffled[: config.subset]}
        prompts = [prompt for prompt in prompts if prompt.prompt_id in chosen]
    return prompts


def read_done(out: Path) -> list[dict[str, Any]]:
    """Answers already recorded; a torn last line (a killed run) is cut off the file."""
    path = out / OUTPUTS_FILE
    if not path.exists():
        return []
    records, good_bytes = [], 0
    with path.open("rb") as lines:
        for raw in lines:
            try:
                records.append(json.loads(raw))
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            good_bytes += len(raw)
    if good_bytes != path.stat().st_size:
        with path.open("rb+") as file:
            file.truncate(good_bytes)
        if good_bytes and not path.read_bytes().endswith(b"\n"):
            with path.open("ab") as file:
                file.write(b"\n")
    return records


def write_prompts(prompts: list[Prompt], out: Path) -> None:
    with (out / PROMPTS_FILE).open("w", encoding="utf-8") as lines:
        for prompt in prompts:
            record = {"prompt_id": prompt.prompt_id, **prompt.extra, "prompt": prompt.text}
            lines.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_lengths(records: list[dict[str, Any]], label: str, out: Path) -> None:
    with (out / LENGTHS_FILE).open("w", encoding="utf-8", newline="") as rows:
        writer = csv.writer(rows)
        writer.writerow(LENGTHS_HEADER)
        for record in sorted(records, key=lambda record: record["prompt_id"]):
            writer.writerow(
                [label, record["prompt_id"], record["output_tokens"], record["output_chars"]]
            )


def settings_of(config: CollectConfig) -> dict[str, Any]:
    """What each answer records of how it was asked for."""
    settings = asdict(config.request)
    for name in ("server", "prompt", "request_id", "timeout_s", "priority", "security"):
        settings.pop(name)
    return settings


async def answer_one(
    stub: scheduler_pb2_grpc.SchedulerStub, config: CollectConfig, prompt: Prompt
) -> Answer:
    """Generate one answer; raises RuntimeError when the job does not end DONE."""
    texts: list[str] = []
    job_id = ""
    request = build_request(replace(config.request, prompt=prompt.text))
    call = stub.Generate(request, timeout=config.request.timeout_s)
    async for event in call:
        kind = event.WhichOneof("event")
        job_id = job_id or event.job_id
        if kind == "token":
            texts.append(event.token.text)
        elif kind == "summary":
            summary = event.summary
            if summary.state != common_pb2.JOB_STATE_DONE:
                state = common_pb2.JobState.Name(summary.state)
                raise RuntimeError(f"prompt {prompt.prompt_id}: {state} {summary.error}")
            reason = common_pb2.FinishReason.Name(summary.finish_reason)
            output = "".join(texts)
            return Answer(
                prompt_id=prompt.prompt_id,
                source=str(prompt.extra.get("source", "")),
                output=output,
                output_tokens=summary.generated_tokens,
                output_chars=len(output),
                finish_reason=reason.removeprefix("FINISH_REASON_").lower(),
                completion_s=summary.completion_s,
                time_to_first_token_s=summary.time_to_first_token_s,
                job_id=job_id,
                settings=settings_of(config),
            )
    raise RuntimeError(f"prompt {prompt.prompt_id}: the stream ended without a summary")


class Progress:
    """One line per answer: how far, how fast, how long still."""

    def __init__(self, total: int, done: int, stream: TextIO) -> None:
        self.total, self.done, self.stream = total, done, stream
        self.started = time.monotonic()
        self.answered = 0
        self.tokens = 0
        self.failed = 0

    def record(self, answer: Answer) -> None:
        self.done += 1
        self.answered += 1
        self.tokens += answer.output_tokens
        elapsed = time.monotonic() - self.started
        left = self.total - self.done
        eta_s = elapsed / self.answered * left
        print(
            f"[{self.done}/{self.total}] prompt {answer.prompt_id}: {answer.output_tokens} "
            f"tokens ({answer.finish_reason}) | {self.tokens / elapsed:.1f} tokens/s, "
            f"{elapsed / 60:.1f} min, ETA {eta_s / 60:.0f} min, {self.failed} failed",
            file=self.stream,
            flush=True,
        )


async def collect(config: CollectConfig, stream: TextIO = sys.stdout) -> int:
    """Answer every prompt not yet done; returns the number of prompts that failed."""
    config.out.mkdir(parents=True, exist_ok=True)
    prompts = select_prompts(config)
    label = config.label or config.request.llm or "default"
    done_records = read_done(config.out)
    write_prompts(prompts, config.out)
    write_lengths(done_records, label, config.out)
    done = {record["prompt_id"] for record in done_records}
    todo = [prompt for prompt in prompts if prompt.prompt_id not in done]
    if config.shortest_first:
        todo.sort(key=lambda prompt: len(prompt.text))
    progress = Progress(len(prompts), len(prompts) - len(todo), stream)
    print(
        f"collect: {len(prompts)} prompts, {len(prompts) - len(todo)} already done, "
        f"{len(todo)} to go -> {config.out}",
        file=stream,
        flush=True,
    )
    queue: asyncio.Queue[Prompt] = asyncio.Queue()
    for prompt in todo:
        queue.put_nowait(prompt)
    outputs = (config.out / OUTPUTS_FILE).open("a", encoding="utf-8")
    lengths = (config.out / LENGTHS_FILE).open("a", encoding="utf-8", newline="")
    writer = csv.writer(lengths)

    async def work(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            try:
                answer = await answer_one(stub, config, prompt)
            except (grpc.RpcError, RuntimeError) as error:
                progress.failed += 1
                detail = error.details() if isinstance(error, grpc.aio.AioRpcError) else error
                print(f"prompt {prompt.prompt_id} failed: {detail}", file=stream, flush=True)
                continue
            # outputs.jsonl first: it is what a restart trusts.
            outputs.write(json.dumps(asdict(answer), ensure_ascii=False) + "\n")
            outputs.flush()
            writer.writerow([label, answer.prompt_id, answer.output_tokens, answer.output_chars])
            lengths.flush()
            progress.record(answer)

    try:
        server = config.request.server
        async with dial_aio(server, config.request.security, CHANNEL_OPTIONS) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            workers = max(1, min(config.concurrency, len(todo)))
            await asyncio.gather(*(work(stub) for _ in range(workers)))
    finally:
        outputs.close()
        lengths.close()
    print(
        f"collect: {progress.done}/{len(prompts)} done, {progress.failed} failed this run",
        file=stream,
        flush=True,
    )
    return progress.failed


@dataclass(frozen=True)
class LengthReport:
    answers: int
    mean: float
    median: float
    p90: float
    p99: float
    cv: float
    max: int
    cut: int
    cut_share: float


def length_report(out: Path) -> LengthReport:
    """Distribution of recorded answer lengths, and how many max_new_tokens cut."""
    records = read_done(out)
    lengths = sorted(record["output_tokens"] for record in records)
    if not lengths:
        return LengthReport(0, math.nan, math.nan, math.nan, math.nan, math.nan, 0, 0, math.nan)
    import numpy as np

    values = np.array(lengths, dtype=float)
    cut = sum(record["finish_reason"] == "length" for record in records)
    return LengthReport(
        answers=len(lengths),
        mean=float(values.mean()),
        median=float(np.median(values)),
        p90=float(np.percentile(values, 90)),
        p99=float(np.percentile(values, 99)),
        cv=float(values.std() / values.mean()) if values.mean() else math.nan,
        max=int(values.max()),
        cut=cut,
        cut_share=cut / len(lengths),
    )


def self_consistency_tau(first: Path, second: Path) -> tuple[float, int]:
    """Kendall's tau between two runs' lengths on the prompts both answered."""
    from scipy.stats import kendalltau

    a = {record["prompt_id"]: record["output_tokens"] for record in read_done(first)}
    b = {record["prompt_id"]: record["output_tokens"] for record in read_done(second)}
    shared = sorted(a.keys() & b.keys())
    if len(shared) < 2:
        return math.nan, len(shared)
    tau = kendalltau([a[i] for i in shared], [b[i] for i in shared]).statistic
    return float(tau), len(shared)
