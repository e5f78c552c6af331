"""The default LLM, SmolLM2-135M-Instruct, for real: loaded from its GGUF and from the
prepared directory, right under greedy decoding, and batched equal to solo in every mode.

Short answers (a few tokens each) keep this to about a minute on a busy 2-core machine; the
first run also prepares the model (about 30 s)."""

from __future__ import annotations

import pytest
import torch

from services.worker.engine import Batching, Engine
from services.worker.jobs import FinishReason, GenerationRequest, Sampling
from services.worker.model import LoadedModel, load_model, resolve_model_path
from services.worker.smollm2 import (
    SMOLLM2_NAME,
    SMOLLM2_REPETITION_PENALTY,
    ensure_smollm2,
    smollm2_gguf_path,
)
from tests.test_worker_engine import run

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Say hello.",
    "What is 2 + 2?",
    "Name a primary colour.",
]
MAX_NEW_TOKENS = 10


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    torch.set_num_threads(1)
    return load_model(SMOLLM2_NAME, device="cpu", dtype="float32")


def jobs(model: LoadedModel) -> list[GenerationRequest]:
    return [
        GenerationRequest(f"job-{i}", tuple(model.encode_prompt(p)), Sampling(MAX_NEW_TOKENS))
        for i, p in enumerate(PROMPTS)
    ]


def test_default_model_is_prepared_once_as_a_save_pretrained_directory(smollm2: LoadedModel):
    directory = ensure_smollm2()
    assert (directory / "config.json").exists() and (directory / "model.safetensors").exists()
    assert resolve_model_path(SMOLLM2_NAME).gguf_file is None
    assert smollm2.default_repetition_penalty == pytest.approx(SMOLLM2_REPETITION_PENALTY)
    assert smollm2.tokenizer.eos_token == "<|im_end|>"
    assert smollm2.eos_token_ids == frozenset({smollm2.tokenizer.eos_token_id})


@pytest.fixture(scope="module")
def solo(smollm2: LoadedModel):
    results = {}
    for job in jobs(smollm2):
        results.update(run(Engine(smollm2, Batching.NONE), [job]))
    return results


def test_greedy_answers_the_capital_of_france(solo):
    answer = solo["job-0"]
    assert "Paris" in answer.text
    assert answer.outcome.finish_reason is FinishReason.EOS  # it ends by itself


@pytest.mark.parametrize(
    "batching, arrive_every",
    [(Batching.NONE, 0), (Batching.DYNAMIC, 0), (Batching.CONTINUOUS, 0), (Batching.CONTINUOUS, 2)],
)
def test_greedy_batched_equals_solo_on_the_real_model(
    smollm2: LoadedModel, solo, batching: Batching, arrive_every: int
):
    batched = run(Engine(smollm2, batching, max_batch_size=3), jobs(smollm2), arrive_every)
    for job_id, alone in solo.items():
        assert batched[job_id].token_ids == alone.token_ids, job_id
        assert batched[job_id].text == alone.text


def test_gguf_file_and_directory_holding_it_load_the_same_model(smollm2: LoadedModel, tmp_path):
    """``--model`` takes the .gguf file itself, or a directory holding one; both read it
    through transformers' GGUF loader and give the prepared model's logits."""
    gguf = smollm2_gguf_path()
    source = resolve_model_path(str(gguf))
    assert (source.path, source.gguf_file) == (str(gguf.parent), gguf.name)
    (tmp_path / gguf.name).symlink_to(gguf)
    assert resolve_model_path(str(tmp_path)).gguf_file == gguf.name
    from_gguf = load_model(str(tmp_path), device="cpu", dtype="float32")
    ids = torch.tensor([smollm2.encode_prompt(PROMPTS[0])])
    with torch.inference_mode():
        expected = smollm2.model(input_ids=ids).logits
        got = from_gguf.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
    assert from_gguf.encode_prompt(PROMPTS[0]) == smollm2.encode_prompt(PROMPTS[0])
