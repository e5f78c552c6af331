"""Predictor robustness: the micro-batcher resolves every future on stop or a dead loop (and
health goes NOT_SERVING), and data sets with string prompt ids load, split and evaluate."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.alpaca import load_dataset, split_by_prompt, write_dataset
from services.common.errors import Unavailable
from services.predictor.batcher import MicroBatcher
from services.predictor.core import LengthPredictor, PredictionRequest
from services.predictor.runtime import DEFAULT_ARTIFACT, ArtifactRuntime
from services.predictor.server import _not_serving_when_batcher_dies, predictor_host
from tests.helpers import REPO_ROOT


async def test_stop_resolves_every_waiting_future() -> None:
    release = threading.Event()

    def slow_batch(items: list[int]) -> list[int]:
        release.wait(timeout=30)
        return [item * 2 for item in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(slow_batch, max_batch_size=2, max_wait_s=0)
    batcher.start()
    calls = [asyncio.create_task(batcher.submit(item)) for item in range(5)]
    await asyncio.sleep(0.05)  # the first batch is computing, the rest queued
    await batcher.stop(drain_timeout_s=0.2)
    release.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(result, Unavailable) for result in results), results
    with pytest.raises(Unavailable, match="shutting down"):
        await batcher.submit(9)


async def test_a_call_before_the_model_is_ready_is_told_to_retry() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: items, max_batch_size=2)
    with pytest.raises(Unavailable, match="still loading"):
        await batcher.submit(1)
    batcher.start()
    assert await batcher.submit(1) == 1
    await batcher.stop()


async def test_stop_drains_queued_work_first() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: items, max_batch_size=2)
    batcher.start()
    calls = [asyncio.create_task(batcher.submit(item)) for item in range(7)]
    await asyncio.sleep(0)
    await batcher.stop(drain_timeout_s=30)
    assert await asyncio.gather(*calls) == list(range(7))


async def test_batch_error_and_wrong_result_count_reach_their_callers_only() -> None:
    def flaky(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("unlucky")
        return items[:-1] if 7 in items else items

    batcher: MicroBatcher[int, int] = MicroBatcher(flaky, max_batch_size=1, max_wait_s=0)
    batcher.start()
    with pytest.raises(ValueError, match="unlucky"):
        await batcher.submit(13)
    with pytest.raises(RuntimeError, match="0 results for a batch of 1"):
        await batcher.submit(7)
    assert await batcher.submit(1) == 1  # the loop lives on
    await batcher.stop()


async def test_dead_loop_fails_callers_and_health_goes_not_serving(monkeypatch) -> None:
    runtime = ArtifactRuntime(DEFAULT_ARTIFACT, intra_op_threads=1)
    predictor = LengthPredictor(runtime, max_batch_size=4)
    host = predictor_host(predictor, host="127.0.0.1", port=0)
    port = await host.start()
    await predictor.start()
    await host.set_ready()
    watchdog = asyncio.create_task(_not_serving_when_batcher_dies(predictor, host))
    batcher = predictor.batcher

    async def broken_collect():
        raise RuntimeError("bug in the batch loop")

    await predictor.predict(PredictionRequest("the loop runs and waits in _collect"))
    monkeypatch.setattr(batcher, "_collect", broken_collect)
    # The loop is parked in the old _collect: it serves this request, then calls the broken
    # one and dies. Whoever waits then must be told; nothing may hang.
    served = await predictor.predict(PredictionRequest("served before the bug"))
    assert served.tokens > 0
    await asyncio.wait_for(batcher.failed.wait(), timeout=30)
    await asyncio.wait_for(watchdog, timeout=30)
    with pytest.raises(Unavailable, match="batch loop died"):
        await predictor.predict(PredictionRequest("after death"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await predictor.stop()
    await host.server.stop(grace=None)


# ---- string prompt ids -------------------------------------------------------------------

STRING_IDS = ["0x1f3a", "9b2c4e1a-0d7e-4b8a-9f3e-2c1d0e9f8a7b", "how-to-bake", "42", "0042"]


def _write_string_id_data(directory) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    prompts = [
        "Write a long essay about the history of bread.",
        "Is 7 prime? Answer yes or no.",
        "Give me a recipe for sourdough, step by step, with timings.",
        "Say hi.",
        "List three colours.",
    ]
    with (directory / "prompts.jsonl").open("w") as lines:
        for prompt_id, prompt in zip(STRING_IDS, prompts, strict=True):
            lines.write(json.dumps({"prompt_id": prompt_id, "prompt": prompt}) + "\n")
    with (directory / "lengths.csv").open("w") as rows:
        rows.write("model,prompt_id,output_tokens\n")
        for prompt_id, tokens in zip(STRING_IDS, [900, 3, 400, 2, 10], strict=True):
            rows.write(f"vicuna-13b,{prompt_id},{tokens}\n")


def test_string_prompt_ids_load_split_and_round_trip(tmp_path) -> None:
    _write_string_id_data(tmp_path / "data")
    dataset = load_dataset(tmp_path / "data")
    # "42" is the integer 42 (a lengths.csv cannot tell them apart); "0042" stays text.
    assert dataset.prompt_ids == [*STRING_IDS[:3], 42, "0042"]
    assert dataset.lengths_for("vicuna-13b")["0x1f3a"] == 900
    parts = split_by_prompt(dataset.prompt_ids, (0.6, 0.4), seed=0)
    assert sorted(map(str, (id_ for part in parts for id_ in part))) == sorted(STRING_IDS)
    write_dataset(dataset, tmp_path / "copy")
    assert load_dataset(tmp_path / "copy").prompt_ids == dataset.prompt_ids


def test_integer_ids_keep_the_same_split() -> None:
    """The shipped metrics depend on the seed-0 split of ids 0..804: it must not move."""
    parts = split_by_prompt(range(805), (0.7, 0.1, 0.2), seed=0)
    assert parts[2][:5] == [1, 14, 16, 27, 33] and len(parts[2]) == 161


def test_eval_predictor_accepts_string_ids(tmp_path) -> None:
    _write_string_id_data(tmp_path / "data")
    result = subprocess.run(
        [
            sys.executable, "-m", "services.cli", "eval-predictor",
            "--prompts", str(tmp_path / "data" / "prompts.jsonl"),
            "--lengths", str(tmp_path / "data" / "lengths.csv"),
            "--llm", "vicuna-13b",
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "prompts=5" in result.stdout and "kendall_tau=" in result.stdout


def test_train_predictor_splits_and_scales_string_id_data(tmp_path) -> None:
    from services.predictor.training import TrainConfig, Trainer

    _write_string_id_data(tmp_path / "data")
    trainer = Trainer(load_dataset(tmp_path / "data"), TrainConfig(llms=["vicuna-13b"]))
    split = trainer.split
    assert sorted(map(str, split.train + split.dev + split.test)) == sorted(STRING_IDS)
    assert trainer.train_z.shape == (1, len(split.train))


async def test_repeated_prompts_are_answered_from_the_cache() -> None:
    runtime = ArtifactRuntime(DEFAULT_ARTIFACT, intra_op_threads=1)
    predictor = LengthPredictor(runtime, cache_size=2)
    await predictor.start()
    try:
        first = await predictor.predict(PredictionRequest("Write a poem about rain."))
        batches = predictor.batcher.batches_run
        again = await predictor.predict(PredictionRequest("Write a poem about rain.", "gpt4_0314"))
        assert predictor.batcher.batches_run == batches  # no model call
        assert predictor.cache.hits == 1 and again.llm == "gpt4_0314"
        assert (
            first.tokens
            == (await predictor.predict(PredictionRequest("Write a poem about rain."))).tokens
        )
        for prompt in ("a", "b", "c"):  # capacity 2: the oldest prompt is evicted
            await predictor.predict(PredictionRequest(prompt))
        assert predictor.cache.get("Write a poem about rain.") is None
    finally:
        await predictor.stop()
