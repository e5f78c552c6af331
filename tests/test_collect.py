"""``ssjf collect`` against a real local stack (tiny model, for speed): shared-format files,
resume after a kill, and penalties reaching the worker."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.collect.core import (
    OUTPUTS_FILE,
    CollectConfig,
    collect,
    length_report,
    self_consistency_tau,
)
from services.common.alpaca import load_dataset
from services.stack.client import GenerateOptions
from services.stack.launcher import LocalStack, StackConfig
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow

PROMPTS = [
    {"prompt_id": 3, "source": "a", "prompt": "Name three colours.", "prompt_tokens": 4},
    {"prompt_id": 7, "source": "b", "prompt": "What is the capital of France?", "prompt_tokens": 7},
    {"prompt_id": 9, "source": "a", "prompt": "Write a poem about the sea.", "prompt_tokens": 6},
    {"prompt_id": 12, "source": "b", "prompt": "hi", "prompt_tokens": 1},
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[LocalStack]:
    config = StackConfig(
        port=0,
        model="tiny-llama",
        served_model_name="tiny-llama",
        max_batch_size=4,
        worker_args=["--torch-threads", "1"],
        scheduler_args=["--default-llm", "tiny-llama"],
        log_dir=tmp_path_factory.mktemp("stack-logs"),
    )
    with LocalStack(config) as running:
        yield running


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(prompt) + "\n" for prompt in PROMPTS))
    return path


def config(
    stack: LocalStack, prompts: Path, out: Path, concurrency: int = 16, **sampling
) -> CollectConfig:
    request = GenerateOptions(server=stack.address, prompt="", max_new_tokens=6, **sampling)
    return CollectConfig(prompts, out, request, label="tiny", concurrency=concurrency)


def test_collect_writes_the_shared_format_and_resumes(stack, prompts_file, tmp_path):
    out = tmp_path / "greedy"
    log = io.StringIO()
    assert asyncio.run(collect(config(stack, prompts_file, out, concurrency=3), log)) == 0
    dataset = load_dataset(out)  # the loader the predictor trains from
    assert [p.prompt_id for p in dataset.prompts] == [3, 7, 9, 12]
    assert dataset.prompts[1].extra == {"source": "b", "prompt_tokens": 7}
    assert set(dataset.lengths["tiny"]) == {3, 7, 9, 12}
    with (out / "lengths.csv").open() as rows:
        table = list(csv.DictReader(rows))
    assert list(table[0]) == ["model", "prompt_id", "output_tokens", "output_chars"]
    records = [json.loads(line) for line in (out / OUTPUTS_FILE).read_text().splitlines()]
    for record in records:
        row = next(r for r in table if int(r["prompt_id"]) == record["prompt_id"])
        assert int(row["output_tokens"]) == record["output_tokens"] <= 6
        assert int(row["output_chars"]) == len(record["output"]) > 0
        assert record["finish_reason"] in {"eos", "length"}
        assert record["settings"]["max_new_tokens"] == 6
    assert "[4/4]" in log.getvalue()
    first = {record["prompt_id"]: record["output"] for record in records}

    # A killed run: two answers lost, the last line torn mid-write.
    lines = (out / OUTPUTS_FILE).read_text().splitlines(keepends=True)
    (out / OUTPUTS_FILE).write_text("".join(lines[:2]) + lines[2][:15])
    log = io.StringIO()
    assert asyncio.run(collect(config(stack, prompts_file, out), log)) == 0
    assert "2 already done, 2 to go" in log.getvalue()
    records = [json.loads(line) for line in (out / OUTPUTS_FILE).read_text().splitlines()]
    assert sorted(record["prompt_id"] for record in records) == [3, 7, 9, 12]
    # Greedy is deterministic: the redone prompts got the same answers.
    assert {record["prompt_id"]: record["output"] for record in records} == first
    assert set(load_dataset(out).lengths["tiny"]) == {3, 7, 9, 12}
    report = length_report(out)
    assert report.answers == 4 and report.max <= 6 and 0 <= report.cut_share <= 1
    assert self_consistency_tau(out, out)[1] == 4


def test_collect_penalties_reach_the_worker(stack, prompts_file, tmp_path):
    """The random tiny model repeats itself; a strong presence penalty forbids repeats."""
    plain, penalised = tmp_path / "plain", tmp_path / "presence"
    asyncio.run(collect(config(stack, prompts_file, plain, repetition_penalty=1.0), io.StringIO()))
    asyncio.run(
        collect(config(stack, prompts_file, penalised, presence_penalty=2.0), io.StringIO())
    )
    read = lambda d: {  # noqa: E731
        json.loads(line)["prompt_id"]: json.loads(line)["output"]
        for line in (d / OUTPUTS_FILE).read_text().splitlines()
    }
    assert read(plain) != read(penalised)


def test_collect_command_line_reports_and_refuses_bad_penalties(stack, prompts_file, tmp_path):
    command = [sys.executable, "-m", "services.cli", "collect", "--server", stack.address]
    bad = subprocess.run(
        [*command, "--prompts", str(prompts_file), "--out", str(tmp_path / "bad"),
         "--presence-penalty", "5", "--max-new-tokens", "2"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 1
    assert "presence_penalty must be within" in bad.stdout
    good = subprocess.run(
        [*command, "--prompts", str(prompts_file), "--out", str(tmp_path / "good"),
         "--max-new-tokens", "2", "--label", "tiny"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert good.returncode == 0, good.stdout + good.stderr
    report = subprocess.run(
        [*command, "--report", str(tmp_path / "good")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert json.loads(report.stdout)[str(tmp_path / "good")]["answers"] == 4


def test_collect_shortest_first_sends_the_shortest_prompts_first(stack, prompts_file, tmp_path):
    out = tmp_path / "sorted"
    settings = config(stack, prompts_file, out, concurrency=1)
    sorted_config = dataclasses.replace(settings, shortest_first=True)
    assert asyncio.run(collect(sorted_config, io.StringIO())) == 0
    records = [json.loads(line) for line in (out / OUTPUTS_FILE).read_text().splitlines()]
    # One prompt in flight at a time: answers land in the order the prompts were sent.
    assert [record["prompt_id"] for record in records] == [12, 3, 9, 7]
