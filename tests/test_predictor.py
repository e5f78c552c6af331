"""The predictor: shipped artifact, ONNX Runtime, micro-batching, gRPC service and CLI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from services.common.alpaca import (
    LengthDataset,
    Prompt,
    add_collected,
    add_labels,
    add_prompt_set,
    load_dataset,
    prompt_set_of,
    split_by_prompt,
    write_dataset,
)
from services.common.net import free_port
from services.common.paths import SERVED_MODEL_ARENA_LABELS, SERVED_MODEL_LABELS
from services.pb import predictor_pb2, predictor_pb2_grpc
from services.predictor.batcher import MicroBatcher
from services.predictor.core import LengthPredictor
from services.predictor.evaluate import ALL_SOURCES, evaluate_by_source
from services.predictor.model import ALL_LLMS, encoder_dir
from services.predictor.runtime import DEFAULT_ARTIFACT, ArtifactRuntime
from services.predictor.server import predictor_host
from services.predictor.tokenization import PromptTokenizer
from services.predictor.training import split_dataset
from tests.helpers import REPO_ROOT, run_ssjf, start_service, wait_for_health

HELD_OUT = REPO_ROOT / "tests" / "data" / "predictor_heldout"
SHIPPED_LLMS = (
    "vicuna-13b",
    "gpt4_0314",
    "llama-2-13b-chat-hf",
    "gpt-3.5-turbo-0613",
    "Mistral-7B-Instruct-v0.2",
    "Meta-Llama-3-8B-Instruct",
)


@pytest.fixture(scope="module")
def runtime() -> ArtifactRuntime:
    return ArtifactRuntime(DEFAULT_ARTIFACT, intra_op_threads=1)


# ---- pure logic -------------------------------------------------------------------------


def test_split_by_prompt_is_disjoint_complete_and_repeatable() -> None:
    ids = list(range(805)) * 3  # one id per (prompt, LLM) row: the split must be by prompt
    parts = split_by_prompt(ids, (0.7, 0.1, 0.2), seed=0)
    assert [len(part) for part in parts] == [564, 80, 161]
    assert sorted(id_ for part in parts for id_ in part) == list(range(805))
    assert parts == split_by_prompt(reversed(ids), (0.7, 0.1, 0.2), seed=0)
    assert parts != split_by_prompt(ids, (0.7, 0.1, 0.2), seed=1)


def test_add_labels_joins_another_llms_lengths_by_prompt_and_refuses_other_prompts(
    tmp_path: Path,
) -> None:
    base = LengthDataset(
        [Prompt(0, "Name a colour."), Prompt(1, "Write an essay.")],
        {"vicuna-13b": {0: 5, 1: 400}},
    )
    served = tmp_path / "served"
    write_dataset(
        LengthDataset(
            [Prompt(0, "Name a colour."), Prompt(1, "Write an essay."), Prompt(2, "Extra?")],
            {"smollm2-135m-instruct": {0: 7, 2: 30}},
        ),
        served,
    )
    joined = add_labels(base, served)
    assert joined.llms == ["smollm2-135m-instruct", "vicuna-13b"]
    # Prompt 2 is not in the training data: its label is dropped, not added as a new prompt.
    assert joined.lengths_for("smollm2-135m-instruct") == {0: 7}
    assert np.isnan(joined.length_matrix(["smollm2-135m-instruct"])[0, 1])
    with pytest.raises(ValueError, match="already has lengths"):
        add_labels(joined, served)
    other = tmp_path / "other"
    write_dataset(LengthDataset([Prompt(1, "A different prompt.")], {"x": {1: 3}}), other)
    with pytest.raises(ValueError, match="not the same prompt"):
        add_labels(base, other)


def test_another_prompt_set_joins_with_namespaced_ids_and_its_own_split(tmp_path: Path) -> None:
    base = LengthDataset(
        [Prompt(i, f"Training prompt {i}.") for i in range(50)],
        {"vicuna-13b": {i: 10 + i for i in range(50)}, "smollm2": {i: 5 + i for i in range(50)}},
    )
    arena = tmp_path / "arena"  # counts from 0 too: its ids collide with the training ids
    write_dataset(
        LengthDataset(
            [Prompt(i, f"Arena prompt {i}.", {"source": "math"}) for i in range(20)],
            {"smollm2": {i: 100 + i for i in range(20)}},
        ),
        arena,
    )
    joined = add_collected(base, arena)
    assert len(joined.prompts) == 70
    added = joined.prompts[50:]
    assert [prompt.prompt_id for prompt in added] == [f"arena:{i}" for i in range(20)]
    assert {prompt_set_of(prompt) for prompt in added} == {"arena"}
    assert added[3].extra["source"] == "math" and added[3].text == "Arena prompt 3."
    assert joined.lengths_for("smollm2")["arena:3"] == 103
    assert joined.lengths_for("smollm2")[3] == 8  # the training prompt's own label stays
    assert "arena:3" not in joined.lengths_for("vicuna-13b")
    # The training set's split does not move, and the added set is split on its own.
    alone, together = split_dataset(base), split_dataset(joined)
    for before, after in zip(
        (alone.train, alone.dev, alone.test),
        (together.train, together.dev, together.test),
        strict=True,
    ):
        assert [pid for pid in after if isinstance(pid, int)] == before
        assert any(isinstance(pid, str) for pid in after)
    with pytest.raises(ValueError, match="already in the data"):
        add_collected(joined, arena)
    with pytest.raises(ValueError, match="prompt set 'arena' is already in the data"):
        add_prompt_set(joined, arena)
    # Labels of the training prompts (and of prompts beyond them) are joined as a head.
    served = tmp_path / "served"
    write_dataset(
        LengthDataset(
            [Prompt(0, "Training prompt 0."), Prompt(99, "Beyond.")], {"served": {0: 1, 99: 2}}
        ),
        served,
    )
    assert add_collected(base, served).lengths_for("served") == {0: 1}
    mixed = tmp_path / "mixed"
    write_dataset(
        LengthDataset(
            [Prompt(0, "Training prompt 0."), Prompt(1, "Not training prompt 1.")], {"x": {0: 1}}
        ),
        mixed,
    )
    with pytest.raises(ValueError, match="1 of its prompts are training prompts"):
        add_collected(base, mixed)


def test_long_prompts_keep_head_and_tail() -> None:
    tokenizer = PromptTokenizer(encoder_dir() / "tokenizer.json", max_tokens=16)
    text = "alpha " + "filler " * 500 + "omega"
    (row,) = tokenizer.token_ids([text])
    assert len(row) == 16
    words = tokenizer.tokenizer.decode(row)
    assert words.startswith("alpha") and words.endswith("omega")
    input_ids, mask = tokenizer(["short", text])
    assert input_ids.shape == mask.shape == (2, 16)
    assert mask[0].sum() == 3 and mask[1].sum() == 16  # [CLS] short [SEP], then padding


async def test_batcher_groups_concurrent_requests_and_keeps_order() -> None:
    sizes: list[int] = []

    def double(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return [item * 2 for item in items]

    batcher = MicroBatcher(double, max_batch_size=8, max_wait_s=0.05)
    batcher.start()
    results = await asyncio.gather(*(batcher.submit(item) for item in range(20)))
    assert results == [item * 2 for item in range(20)]
    assert max(sizes) == 8 and len(sizes) == 3  # 8 + 8 + 4, never more than the maximum
    assert await batcher.submit_many([5, 6]) == [10, 12]
    await batcher.stop()


async def test_batcher_reports_a_failed_batch_to_every_caller() -> None:
    def fail(items: list[int]) -> list[int]:
        raise ValueError("model broke")

    batcher = MicroBatcher(fail, max_batch_size=4, max_wait_s=0.01)
    batcher.start()
    outcomes = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(outcome, ValueError) for outcome in outcomes)
    await batcher.stop()


# ---- the shipped artifact ---------------------------------------------------------------


def test_shipped_artifact_describes_itself(runtime: ArtifactRuntime) -> None:
    assert set(SHIPPED_LLMS) <= set(runtime.llms)
    assert runtime.default_llm == "vicuna-13b"
    assert runtime.version.startswith("minilm-length-")
    assert runtime.execution_provider in ("CUDAExecutionProvider", "CPUExecutionProvider")
    size_mib = (DEFAULT_ARTIFACT / "model.onnx").stat().st_size / 2**20
    assert size_mib < 40


def test_artifact_answers_per_llm_and_falls_back(runtime: ArtifactRuntime) -> None:
    prompts = [
        "Write a detailed 1500-word essay on the causes of World War I.",
        "Reply with one word: what colour is the sky?",
    ]
    for llm in SHIPPED_LLMS:
        essay, one_word = runtime.predict(prompts, [llm, llm])
        assert essay.llm == one_word.llm == llm
        assert essay.tokens > one_word.tokens > 0
    (default,) = runtime.predict(prompts[:1], [""])
    assert default.llm == "vicuna-13b"
    (unknown,) = runtime.predict(prompts[:1], ["an-llm-nobody-trained"])
    assert unknown.llm == ALL_LLMS and unknown.tokens > 0


@pytest.mark.parametrize("llm", ["vicuna-13b", "gpt4_0314", "llama-2-13b-chat-hf"])
def test_artifact_ranks_held_out_prompts_better_than_prompt_length(
    runtime: ArtifactRuntime, llm: str
) -> None:
    groups, head = evaluate_by_source(runtime, load_dataset(HELD_OUT), llm)
    metrics, prompt_length = groups[ALL_SOURCES]
    assert head == llm and metrics.n == 100
    assert metrics.kendall_tau > prompt_length.kendall_tau + 0.1


def test_evaluation_by_source_splits_the_prompts_by_their_source(
    runtime: ArtifactRuntime,
) -> None:
    dataset = load_dataset(HELD_OUT)
    groups, head = evaluate_by_source(runtime, dataset, "gpt4_0314", progress=False)
    assert head == "gpt4_0314"
    assert next(iter(groups)) == ALL_SOURCES
    sizes = {source: model.n for source, (model, _) in groups.items()}
    assert sizes == {"all": 100, "helpful_base": 25, "koala": 31, "oasst": 32, "selfinstruct": 12}
    # The per-source numbers are scored on exactly that source's prompts (up to int8's
    # per-batch activation scale: the prompts share micro-batches with other sources there).
    koala = [prompt.prompt_id for prompt in dataset.prompts if prompt.extra["source"] == "koala"]
    alone, _ = evaluate_by_source(runtime, dataset.subset(koala), "gpt4_0314", progress=False)
    assert groups["koala"][0].kendall_tau == pytest.approx(
        alone[ALL_SOURCES][0].kendall_tau, abs=0.02
    )


# ---- the gRPC service -------------------------------------------------------------------


@pytest.fixture
async def predictor_stub(
    runtime: ArtifactRuntime,
) -> AsyncIterator[predictor_pb2_grpc.PredictorStub]:
    """The real servicer and batcher on a real grpc.aio server, in this process."""
    predictor = LengthPredictor(runtime, max_batch_size=8, max_wait_s=0.005, max_batch_request=16)
    host = predictor_host(predictor, host="127.0.0.1", port=0)
    port = await host.start()
    await predictor.start()
    await host.set_ready()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield predictor_pb2_grpc.PredictorStub(channel)
    await predictor.stop()
    await host.server.stop(grace=None)


async def test_service_predicts_batches_and_describes(
    predictor_stub: predictor_pb2_grpc.PredictorStub,
) -> None:
    info = await predictor_stub.GetModelInfo(predictor_pb2.GetModelInfoRequest())
    assert info.default_llm == "vicuna-13b" and "gpt4_0314" in info.llms
    assert info.execution_provider.endswith("ExecutionProvider") and info.max_prompt_tokens > 0
    prompts = [
        f"Give me {n} tips for learning to cook, each explained in detail." for n in (1, 3, 10)
    ] + ["Say hi."]
    singles = await asyncio.gather(
        *(
            predictor_stub.Predict(predictor_pb2.PredictRequest(prompt=prompt, llm="gpt4_0314"))
            for prompt in prompts
        )
    )
    assert all(reply.model_version == info.model_version for reply in singles)
    assert all(reply.llm == "gpt4_0314" for reply in singles)
    batch = await predictor_stub.PredictBatch(
        predictor_pb2.PredictBatchRequest(
            requests=[
                predictor_pb2.PredictRequest(prompt=prompt, llm="gpt4_0314") for prompt in prompts
            ]
        )
    )
    # int8 dynamic quantization scales activations per batch, so batch mates move a
    # prediction slightly (docs/predictor.md); the order the scheduler uses is what matters.
    assert [reply.predicted_output_tokens for reply in batch.responses] == pytest.approx(
        [reply.predicted_output_tokens for reply in singles], rel=0.05
    )
    fallback = await predictor_stub.Predict(predictor_pb2.PredictRequest(prompt="Hi", llm="nope"))
    assert fallback.llm == "*"


async def test_service_rejects_bad_requests_clearly(
    predictor_stub: predictor_pb2_grpc.PredictorStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await predictor_stub.Predict(predictor_pb2.PredictRequest(prompt="  "))
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty" in empty.value.details()
    too_many = predictor_pb2.PredictBatchRequest(
        requests=[predictor_pb2.PredictRequest(prompt="hello")] * 17
    )
    with pytest.raises(grpc.aio.AioRpcError) as exhausted:
        await predictor_stub.PredictBatch(too_many)
    assert exhausted.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "16" in exhausted.value.details()


# ---- the command line -------------------------------------------------------------------


@pytest.mark.slow
def test_predictor_process_serves_and_predict_cli_calls_it() -> None:
    port = free_port()
    service = start_service(["predictor", "--port", str(port), "--threads", "1"])
    try:
        wait_for_health(f"127.0.0.1:{port}", timeout=90)
        remote = run_ssjf(
            "predict",
            "Write a haiku about autumn.",
            "--llm",
            "gpt4_0314",
            "--server",
            f"127.0.0.1:{port}",
        )
        assert remote.returncode == 0, remote.stderr
        assert "llm=gpt4_0314" in remote.stdout and "predicted_output_tokens=" in remote.stdout
        empty = run_ssjf("predict", "", "--server", f"127.0.0.1:{port}")
        assert empty.returncode == 1 and "INVALID_ARGUMENT" in empty.stdout
    finally:
        assert service.stop() == 0, service.log()
    local = run_ssjf("predict", "Write a haiku about autumn.", "--llm", "gpt4_0314")
    assert local.returncode == 0, local.stderr
    assert local.stdout.split()[:1] == remote.stdout.split()[:1]  # same artifact, same answer


@pytest.mark.slow
def test_eval_predictor_prints_metrics_and_ends_with_tau() -> None:
    result = run_ssjf(
        "eval-predictor",
        "--prompts",
        str(HELD_OUT / "prompts.jsonl"),
        "--lengths",
        str(HELD_OUT / "lengths.csv"),
        "--llm",
        "llama-2-13b-chat-hf",
        "--by-source",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("spearman_rho=") for line in lines)
    by_source = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("koala")}
    assert by_source["koala"][0] == "31"
    assert lines[-1].startswith("kendall_tau=") and float(lines[-1].split("=")[1]) > 0.2
    unknown = run_ssjf(
        "eval-predictor",
        "--prompts",
        str(HELD_OUT / "prompts.jsonl"),
        "--lengths",
        str(HELD_OUT / "lengths.csv"),
        "--llm",
        "not-in-the-data",
    )
    assert unknown.returncode != 0 and "not-in-the-data" in unknown.stderr


def test_a_serving_window_below_eight_word_pieces_is_refused() -> None:
    result = run_ssjf("train-predictor", "--serve-max-prompt-tokens", "4", "--out", "unused")
    assert result.returncode != 0
    assert "--serve-max-prompt-tokens must be 0 or at least 8, got 4" in result.stderr


@pytest.mark.slow
def test_train_export_smoke_on_a_handful_of_prompts(tmp_path: Path) -> None:
    """The whole train -> ONNX -> int8 -> parity -> held-out evaluation path, tiny."""
    out = tmp_path / "artifact"
    result = run_ssjf(
        "train-predictor",
        "--data",
        str(HELD_OUT),
        "--labels",
        f"{SERVED_MODEL_LABELS},{SERVED_MODEL_ARENA_LABELS}",
        "--llm",
        "vicuna-13b,smollm2-135m-instruct",
        "--epochs",
        "1",
        "--max-train-prompts",
        "8",
        "--max-prompt-tokens",
        "64",
        "--serve-max-prompt-tokens",
        "32",
        "--out",
        str(out),
        "--name",
        "smoke",
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    smoke = ArtifactRuntime(out, intra_op_threads=1)
    assert smoke.llms == ["vicuna-13b", "smollm2-135m-instruct"]
    assert smoke.version.startswith("smoke-")
    # Trained on 64 word pieces, serving on 32 (the window is part of the version's hash).
    assert smoke.max_prompt_tokens == 32 and smoke.metadata["trained_max_prompt_tokens"] == 64
    # The served model's labels (joined from its collect directory) got a head of their own.
    assert "smollm2-135m-instruct" in smoke.metadata["held_out_test"]
    # Arena's prompts (another prompt set) trained it too, and are scored apart, per source.
    arena = smoke.metadata["held_out_test_other_prompt_sets"][SERVED_MODEL_ARENA_LABELS.name]
    assert list(arena) == ["smollm2-135m-instruct"]
    sources = set(arena["smollm2-135m-instruct"]["by_source"])
    assert sources == {"coding", "math", "creative_writing"}
    parity = smoke.metadata["parity"]["fp32_vs_pytorch"]
    assert parity["max_rel_diff"] < 1e-3
    vicuna, smollm2 = smoke.predict(
        ["Tell me a joke."] * 2, ["vicuna-13b", "smollm2-135m-instruct"]
    )
    assert vicuna.tokens > 0 and smollm2.tokens > 0 and smollm2.llm == "smollm2-135m-instruct"
