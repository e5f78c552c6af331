"""Distillation (services/predictor/distill.py): a teacher artifact's predictions as the training
lengths of a prompt set no LLM has answered, written as an ``ssjf collect`` directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from services.common.alpaca import Prompt, add_collected, load_dataset
from services.predictor.distill import TEACHER_FILE, teacher_dataset
from services.predictor.runtime import DEFAULT_ARTIFACT, ArtifactRuntime
from tests.helpers import REPO_ROOT, run_ssjf

HELD_OUT = REPO_ROOT / "tests" / "data" / "predictor_heldout"
TEXTS = {
    "9f3a": "Write a haiku about autumn.",
    "0b71": "Explain how a transformer language model decodes text, step by step, in detail.",
    "c2e8": "Say yes or no: is water wet?",
}


def _write_prompts(path: Path, texts: dict[str, str]) -> Path:
    lines = [json.dumps({"prompt_id": pid, "prompt": text}) for pid, text in texts.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_teacher_tokens_become_whole_lengths_of_at_least_one_token() -> None:
    prompts = [Prompt("a", "x"), Prompt("b", "y")]
    labelled = teacher_dataset(prompts, ["m1", "m2"], np.array([[0.2, 41.6], [7.5, 1e4]]))
    assert labelled.lengths == {"m1": {"a": 1, "b": 42}, "m2": {"a": 8, "b": 10000}}
    assert [prompt.prompt_id for prompt in labelled.prompts] == ["a", "b"]


def test_a_teacher_labels_a_prompt_set_that_training_then_adds(tmp_path: Path) -> None:
    """The shipped artifact (a real ONNX model) labels three prompts with string ids; every
    per-LLM head's prediction becomes that LLM's length, and the directory joins a training
    set as another prompt set."""
    out = tmp_path / "taught"
    result = run_ssjf(
        "teacher-label",
        "--teacher",
        str(DEFAULT_ARTIFACT),
        "--prompts",
        str(_write_prompts(tmp_path / "prompts.jsonl", TEXTS)),
        "--out",
        str(out),
        "--threads",
        "1",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    teacher = ArtifactRuntime(DEFAULT_ARTIFACT, intra_op_threads=1)
    record = json.loads((out / TEACHER_FILE).read_text())
    assert record["teacher"] == teacher.version and record["prompts"] == 3
    labelled = load_dataset(out)
    assert sorted(labelled.llms) == sorted(teacher.llms)  # the all-LLM head '*' is left out
    expected = teacher.predict_all(list(TEXTS.values()))
    for llm in ("vicuna-13b", "smollm2-135m-instruct"):
        lengths = labelled.lengths_for(llm)
        got = np.array([lengths[pid] for pid in TEXTS], dtype=float)
        np.testing.assert_allclose(got, expected[:, teacher.column(llm)], rtol=0.05, atol=1)
    combined = add_collected(load_dataset(HELD_OUT), out)
    assert {f"taught:{pid}" for pid in TEXTS} <= set(combined.prompt_ids)
    assert (
        combined.lengths_for("vicuna-13b")["taught:9f3a"]
        == labelled.lengths_for("vicuna-13b")["9f3a"]
    )


def test_teacher_label_refuses_bad_input_with_a_message(tmp_path: Path) -> None:
    missing = run_ssjf("teacher-label", "--prompts", str(tmp_path / "none.jsonl"))
    assert missing.returncode != 0 and "--prompts and --out are required" in missing.stderr
    no_file = run_ssjf(
        "teacher-label",
        "--teacher",
        str(DEFAULT_ARTIFACT),
        "--prompts",
        str(tmp_path / "none.jsonl"),
        "--out",
        str(tmp_path / "out"),
    )
    assert no_file.returncode != 0 and "error:" in no_file.stderr
    assert "Traceback" not in no_file.stderr
    blank = _write_prompts(tmp_path / "blank.jsonl", {"x1": "  "})
    empty = run_ssjf(
        "teacher-label",
        "--teacher",
        str(DEFAULT_ARTIFACT),
        "--prompts",
        str(blank),
        "--out",
        str(tmp_path / "out"),
    )
    assert empty.returncode != 0 and "empty prompt text for ids x1" in empty.stderr
    no_teacher = run_ssjf(
        "teacher-label",
        "--teacher",
        str(tmp_path / "nothing"),
        "--prompts",
        str(_write_prompts(tmp_path / "ok.jsonl", TEXTS)),
        "--out",
        str(tmp_path / "out"),
    )
    assert no_teacher.returncode != 0 and "no model.onnx" in no_teacher.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written
