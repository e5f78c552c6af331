"""The real-generation bench workload: greedy collect lengths as the oracle, no replay."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from services.bench.loadgen import generate_request
from services.bench.realgen import REAL_MAX_NEW_TOKENS, REAL_MODEL, load_greedy_lengths
from services.bench.workload import build_requests
from services.common.alpaca import load_dataset
from services.predictor.training import split_dataset

# Twenty labelled prompts; every third answer was cut at the cap.
PROMPTS = [
    (
        i,
        f"Prompt number {i}?",
        REAL_MAX_NEW_TOKENS if i % 3 == 0 else 10 + i,
        "length" if i % 3 == 0 else "eos",
    )
    for i in range(20)
]


def write_collect_dir(directory: Path, temperature: float = 0.0) -> Path:
    directory.mkdir()
    with (directory / "prompts.jsonl").open("w") as lines:
        for prompt_id, text, _, _ in PROMPTS:
            lines.write(json.dumps({"prompt_id": prompt_id, "source": "x", "prompt": text}) + "\n")
    with (directory / "lengths.csv").open("w") as rows:
        rows.write("model,prompt_id,output_tokens,output_chars\n")
        rows.writelines(f"{REAL_MODEL},{pid},{tokens},1\n" for pid, _, tokens, _ in PROMPTS)
    with (directory / "outputs.jsonl").open("w") as lines:
        for prompt_id, _, tokens, reason in PROMPTS:
            record = {
                "prompt_id": prompt_id,
                "output_tokens": tokens,
                "finish_reason": reason,
                "settings": {"temperature": temperature},
            }
            lines.write(json.dumps(record) + "\n")
    return directory


def test_greedy_lengths_are_held_out_prompts_and_leave_out_cut_answers(tmp_path: Path):
    directory = write_collect_dir(tmp_path / "greedy")
    items, source = load_greedy_lengths(directory)
    # The predictor's own split of these prompts: the benchmark never replays a prompt the
    # proxy model trained on.
    held_out = set(split_dataset(load_dataset(directory)).test)
    expected = [(pid, text, tokens) for pid, text, tokens, reason in PROMPTS
                if pid in held_out and reason == "eos"]  # fmt: skip
    assert expected and len(expected) < len(held_out)
    assert [(item.prompt_id, item.prompt, item.output_tokens) for item in items] == expected
    assert f"{len(expected)} held-out prompts" in source


def test_sampled_or_missing_labels_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="not greedy"):
        load_greedy_lengths(write_collect_dir(tmp_path / "sampled", temperature=0.7))
    with pytest.raises(FileNotFoundError, match="ssjf collect"):
        load_greedy_lengths(tmp_path / "nowhere")


def test_real_requests_generate_to_eos_and_give_the_oracle_the_greedy_length(tmp_path: Path):
    items, _ = load_greedy_lengths(write_collect_dir(tmp_path / "greedy"))
    request = build_requests(items, 4, rate_rps=1.0, length_scale=1.0, seed=0)[0]
    real = generate_request(dataclasses.replace(request, real=True), "smollm2", True, "r")
    assert real.sampling.replay_output_tokens == 0
    assert real.sampling.max_new_tokens == REAL_MAX_NEW_TOKENS
    assert real.sampling.temperature == 0.0
    assert real.oracle_output_tokens == request.true_output_tokens
    replayed = generate_request(request, "smollm2", False, "r")
    assert replayed.sampling.replay_output_tokens == request.output_tokens
