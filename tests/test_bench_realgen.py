"""The real-generation bench workload: greedy collect lengths as the oracle, no replay."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from services.bench.loadgen import generate_request
from services.bench.realgen import REAL_MAX_NEW_TOKENS, load_greedy_lengths
from services.bench.workload import build_requests


def write_collect_dir(directory: Path, temperature: float = 0.0) -> Path:
    directory.mkdir()
    prompts = [
        (1, "Say hi.", 5, "eos"),
        (2, "Write a poem.", 1024, "length"),
        (4, "2+2?", 9, "eos"),
    ]
    with (directory / "prompts.jsonl").open("w") as lines:
        for prompt_id, text, _, _ in prompts:
            lines.write(json.dumps({"prompt_id": prompt_id, "source": "x", "prompt": text}) + "\n")
    with (directory / "outputs.jsonl").open("w") as lines:
        for prompt_id, _, tokens, reason in prompts:
            record = {
                "prompt_id": prompt_id,
                "output_tokens": tokens,
                "finish_reason": reason,
                "settings": {"temperature": temperature},
            }
            lines.write(json.dumps(record) + "\n")
    return directory


def test_greedy_lengths_leave_out_cut_answers(tmp_path: Path):
    items, source = load_greedy_lengths(write_collect_dir(tmp_path / "greedy"))
    assert [(item.prompt_id, item.prompt, item.output_tokens) for item in items] == [
        (1, "Say hi.", 5),
        (4, "2+2?", 9),
    ]
    assert "2 prompts" in source


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
