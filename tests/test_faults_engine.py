"""Fault injection in the worker engine (issue 11, item 1): an engine step never leaves a job
without an outcome, and one bad job fails alone, never its batch-mates.

Runs the real tiny transformers model; failures are injected by making one job's forward
pass, sampling or the cache merge raise, as a CUDA out-of-memory or a numerical fault would.
"""

from __future__ import annotations

import pytest
import torch

from services.worker import engine as engine_module
from services.worker.engine import Batching, Engine
from services.worker.jobs import FinishReason, GenerationRequest, Sampling
from services.worker.model import LoadedModel
from tests.test_worker_engine import Result, model, run

__all__ = ["model"]  # fixture, imported for pytest

PROMPTS = ["Name three colours.", "What is the capital of France?", "hi", "Count to ten."]
LENGTH = 8


def jobs(model: LoadedModel, **sampling: object) -> list[GenerationRequest]:
    return [
        GenerationRequest(f"job-{i}", tuple(model.encode_prompt(p)), Sampling(LENGTH, **sampling))
        for i, p in enumerate(PROMPTS)
    ]


@pytest.fixture(scope="module")
def greedy(model: LoadedModel) -> dict[str, Result]:
    return run(Engine(model, Batching.CONTINUOUS, max_batch_size=4), jobs(model))


def assert_every_job_ended(engine: Engine, results: dict[str, Result]) -> None:
    assert not engine.has_work()
    for job_id, result in results.items():
        assert result.outcome is not None, f"{job_id} has no outcome"
        assert result.indexes == list(range(len(result.indexes))), job_id


def test_tiny_temperature_is_made_safe_and_samples_the_greedy_token(
    model: LoadedModel, greedy: dict[str, Result]
):
    """temperature=1e-45 used to make softmax overflow to nan and multinomial raise."""
    engine = Engine(model, Batching.CONTINUOUS, max_batch_size=4)
    results = run(engine, jobs(model, temperature=1e-45, seed=1))
    assert_every_job_ended(engine, results)
    for job_id, result in results.items():
        assert result.outcome.finish_reason is FinishReason.LENGTH, result.outcome.error
        assert result.token_ids == greedy[job_id].token_ids


def test_one_jobs_sampling_failure_fails_it_alone(
    model: LoadedModel, greedy: dict[str, Result], monkeypatch: pytest.MonkeyPatch
):
    real = engine_module.next_tokens

    def next_tokens(logits, samplings, generators):
        if any(s.seed == 666 for s in samplings):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, samplings, generators)

    monkeypatch.setattr(engine_module, "next_tokens", next_tokens)
    batch = jobs(model)
    batch[1] = GenerationRequest("job-1", batch[1].prompt_ids, Sampling(LENGTH, seed=666))
    engine = Engine(model, Batching.CONTINUOUS, max_batch_size=4)
    results = run(engine, batch)
    assert_every_job_ended(engine, results)
    assert results["job-1"].outcome.finish_reason is FinishReason.ERROR
    assert "sampling failed" in results["job-1"].outcome.error
    for job_id in ("job-0", "job-2", "job-3"):
        assert results[job_id].token_ids == greedy[job_id].token_ids
        assert results[job_id].outcome.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("arrive_every", [0, 2])
def test_a_prefill_failure_fails_only_the_job_that_fails_alone(
    model: LoadedModel,
    greedy: dict[str, Result],
    monkeypatch: pytest.MonkeyPatch,
    arrive_every: int,
):
    """The poison job is prefilled in a batch with others (arrive_every=0) or joins a
    running batch (2): the others still finish with their exact greedy tokens."""
    real = engine_module._KVBatch.prefill.__func__
    poison = tuple(model.encode_prompt("poison"))

    def prefill(cls, model_, rows):
        if any(row.request.prompt_ids == poison for row in rows):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(cls, model_, rows)

    monkeypatch.setattr(engine_module._KVBatch, "prefill", classmethod(prefill))
    batch = jobs(model)
    batch.insert(1, GenerationRequest("poison", poison, Sampling(LENGTH)))
    engine = Engine(model, Batching.CONTINUOUS, max_batch_size=5)
    results = run(engine, batch, arrive_every)
    assert_every_job_ended(engine, results)
    assert results["poison"].outcome.finish_reason is FinishReason.ERROR
    assert "out of memory" in results["poison"].outcome.error
    for job_id, alone in greedy.items():
        assert results[job_id].token_ids == alone.token_ids, job_id


def test_a_failed_merge_fails_the_newcomers_and_keeps_the_running_batch(
    model: LoadedModel, greedy: dict[str, Result], monkeypatch: pytest.MonkeyPatch
):
    real = engine_module._KVBatch.merge
    failures = iter([True])

    def merge(self, other):
        if next(failures, False):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, other)

    monkeypatch.setattr(engine_module._KVBatch, "merge", merge)
    engine = Engine(model, Batching.CONTINUOUS, max_batch_size=4)
    results = run(engine, jobs(model), arrive_every=2)
    assert_every_job_ended(engine, results)
    assert results["job-0"].token_ids == greedy["job-0"].token_ids
    assert results["job-1"].outcome.finish_reason is FinishReason.ERROR
    assert "merge failed" in results["job-1"].outcome.error
    for job_id in ("job-2", "job-3"):
        assert results[job_id].token_ids == greedy[job_id].token_ids


def test_a_failed_decoding_pass_ends_the_running_jobs_with_a_reason(
    model: LoadedModel, monkeypatch: pytest.MonkeyPatch
):
    real = engine_module._KVBatch.decode
    calls = iter(range(100))

    def decode(self, model_):
        if next(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, model_)

    monkeypatch.setattr(engine_module._KVBatch, "decode", decode)
    engine = Engine(model, Batching.CONTINUOUS, max_batch_size=2)
    results = run(engine, jobs(model))
    assert_every_job_ended(engine, results)
    failed = [r for r in results.values() if r.outcome.finish_reason is FinishReason.ERROR]
    assert len(failed) == 2 and all("decoding step failed" in r.outcome.error for r in failed)
    # The jobs still waiting when the pass failed ran afterwards.
    assert sum(r.outcome.finish_reason is FinishReason.LENGTH for r in results.values()) == 2


def test_fail_all_ends_every_held_job_even_mid_admission(model: LoadedModel):
    engine = Engine(model, Batching.CONTINUOUS, max_batch_size=2)
    for job in jobs(model):
        engine.submit(job)
    engine.step()
    # Simulate a bug that escaped mid-admission: jobs popped from the waiting queue.
    engine._waiting.clear()
    ended = {update.job_id for update in engine.fail_all("boom")}
    assert ended == {f"job-{i}" for i in range(len(PROMPTS))}
    assert not engine.has_work()
