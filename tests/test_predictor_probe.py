"""The served-LLM probe lever (services/predictor/probe.py): the states it reads from a real
``transformers`` causal LM (the tiny random Llama), and the out-of-fold probe fitting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from services.common.net import free_port
from services.common.paths import (
    SERVED_MODEL_ARENA_LABELS,
    SERVED_MODEL_LABELS,
    probe_default_labels,
)
from services.predictor.model import encoder_dir
from services.predictor.probe import (
    LlmStates,
    fit_probe_heads,
    fit_ridge,
    last_token_states,
    leave_one_source_out,
    out_of_fold_log_tokens,
    with_other_prompt_set,
)
from services.predictor.runtime import ArtifactRuntime
from services.predictor.tokenization import PromptTemplate, PromptTokenizer, head_and_tail
from tests.helpers import REPO_ROOT, run_ssjf, start_service, wait_for_health

HELD_OUT = REPO_ROOT / "tests" / "data" / "predictor_heldout"


def test_head_and_tail_keeps_a_fitting_row_and_cuts_the_middle_of_a_long_one() -> None:
    assert head_and_tail([1, 2, 3], 3) == [1, 2, 3]
    assert head_and_tail(list(range(10)), 5) == [0, 1, 2, 8, 9]
    assert head_and_tail(list(range(10)), 1) == [0]


def test_last_token_states_read_each_rows_last_real_position() -> None:
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(last_token_states(hidden, mask), torch.stack([hidden[0, 1], hidden[1, 3]]))


@pytest.fixture(scope="module")
def tiny_states() -> LlmStates:
    return LlmStates("tiny-llama", [1, 3], max_prompt_tokens=16, threads=1)


def test_a_prompts_states_do_not_depend_on_the_prompts_batched_with_it(
    tiny_states: LlmStates,
) -> None:
    short, long = "how long is a piece of string", "write an essay about rivers " * 5
    alone = tiny_states([short])
    together = tiny_states([long, short, "hi"])
    assert alone.shape == (1, 2, 256) and together.shape == (3, 2, 256)
    np.testing.assert_allclose(together[1], alone[0], rtol=1e-4, atol=1e-4)
    # Each requested layer is a different state, and different prompts differ.
    assert not np.allclose(alone[0, 0], alone[0, 1])
    assert not np.allclose(together[0], together[1])


def test_the_states_are_read_where_the_model_starts_its_answer(tiny_states: LlmStates) -> None:
    row = tiny_states.token_ids("word " * 100)
    prefix, suffix = list(tiny_states.template.prefix_ids), list(tiny_states.template.suffix_ids)
    assert prefix and suffix
    assert row[: len(prefix)] == prefix and row[-len(suffix) :] == suffix
    assert len(row) == len(prefix) + 16 + len(suffix)  # the user's words cut to head and tail
    short = tiny_states.token_ids("hello")
    assert len(short) < len(row)


@pytest.mark.parametrize("layers", [[0], [5], []])
def test_layers_the_model_lacks_are_refused(layers: list[int]) -> None:
    with pytest.raises(ValueError, match=r"1\.\.4"):
        LlmStates("tiny-llama", layers, threads=1)


def test_the_probe_picks_the_informative_layer_and_never_sees_the_held_out_fold() -> None:
    rng = np.random.default_rng(0)
    prompts = 200
    signal = rng.normal(size=(prompts, 4))
    targets = np.stack([signal @ [1.0, 0.5, 0.0, 0.2], signal @ [0.3, 1.0, 0.2, 0.0]])
    targets[1, :7] = np.nan  # an LLM that did not answer every prompt
    states = np.stack([rng.normal(size=(prompts, 4)), signal], axis=1)  # layer 0: noise
    folds = [list(range(start, prompts, 5)) for start in range(5)]
    predicted, chosen, scores = out_of_fold_log_tokens(states, targets, folds)
    assert chosen == [1] * 5
    assert all(score[1] > score[0] for score in scores)
    assert not np.isnan(predicted).any()  # every prompt predicted, the unlabelled ones too
    known = ~np.isnan(targets[1])
    assert kendalltau(predicted[1, known], targets[1, known]).statistic > 0.8
    # A held-out fold's own labels play no part in its predictions.
    changed = targets.copy()
    changed[:, folds[0]] = rng.normal(size=(2, len(folds[0])))
    again, _, _ = out_of_fold_log_tokens(states, changed, folds)
    np.testing.assert_allclose(again[:, folds[0]], predicted[:, folds[0]])
    assert not np.allclose(again[:, folds[1]], predicted[:, folds[1]])


def test_a_template_frames_the_prompts_own_tokens_within_the_window() -> None:
    template = PromptTemplate((7, 8, 9), (10,), 0)
    assert PromptTemplate.from_dict(template.as_dict()) == template
    tokenizer = PromptTokenizer(encoder_dir() / "tokenizer.json", 10, template)
    short, long = tokenizer.token_ids(["hello", "word " * 50])
    assert short[:3] == [7, 8, 9] and short[-1] == 10 and len(short) < 10
    assert long[:3] == [7, 8, 9] and long[-1] == 10 and len(long) == 10
    input_ids, mask = tokenizer.pad([short, long])
    assert (input_ids[0, len(short) :] == 0).all() and mask[0].sum() == len(short)
    with pytest.raises(ValueError, match="fewer than 2"):
        PromptTokenizer(encoder_dir() / "tokenizer.json", 5, template)


@pytest.mark.slow
def test_a_probe_artifact_is_trained_exported_and_served_like_any_other(tmp_path: Path) -> None:
    """``ssjf train-probe`` on the tiny Llama: states -> ridge heads -> ONNX (int8) -> held-out
    scores and first stage, then a real ``ssjf predictor`` process serves the artifact."""
    out = tmp_path / "probe"
    result = run_ssjf(
        "train-probe",
        "--data",
        str(HELD_OUT),
        "--model",
        "tiny-llama",
        "--layer",
        "2",
        "--max-prompt-tokens",
        "24",
        "--threads",
        "1",
        "--out",
        str(out),
        "--name",
        "probe-smoke",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    probe = ArtifactRuntime(out, intra_op_threads=1)
    assert probe.version.startswith("probe-smoke-") and probe.formulation == "llm-probe"
    assert probe.default_llm == "vicuna-13b" and "smollm2-135m-instruct" in probe.llms
    template = PromptTemplate.from_dict(probe.metadata["prompt_template"])
    assert template.suffix_ids and probe.max_prompt_tokens == len(template.prefix_ids) + 24 + len(
        template.suffix_ids
    )
    assert probe.metadata["training"]["layer"] == 2
    # The default labels add the served model's Arena answers as a prompt set, scored apart.
    arena = probe.metadata["held_out_test_other_prompt_sets"]["arena_hard_v2-greedy"]
    assert set(arena) == {"smollm2-135m-instruct"} and arena["smollm2-135m-instruct"]["n"] > 2
    assert probe.metadata["quantized"] == "fp32"  # int8 ruins an LLM's states (docs/predictor.md)
    assert probe.metadata["parity"]["artifact_vs_pytorch"]["max_rel_diff"] < 1e-3
    assert "vicuna-13b" in probe.metadata["held_out_test"]
    assert (out / "first_stage.npz").exists()
    tokens = probe.predict_all(["Tell me a joke.", "Write a long essay about the sea. " * 40])
    assert tokens.shape == (2, len(probe.llms) + 1) and (tokens >= 0).all()
    port = free_port()
    service = start_service(
        ["predictor", "--port", str(port), "--threads", "1", "--artifact", str(out)]
    )
    try:
        wait_for_health(f"127.0.0.1:{port}", timeout=90)
        served = run_ssjf("predict", "Tell me a joke.", "--server", f"127.0.0.1:{port}")
        assert served.returncode == 0, served.stderr
        assert "llm=vicuna-13b" in served.stdout and f"model_version={probe.version}" in (
            served.stdout
        )
    finally:
        assert service.stop() == 0, service.log()


def test_leave_one_source_out_rates_each_source_by_probes_that_never_saw_it() -> None:
    rng = np.random.default_rng(1)
    signal = rng.normal(size=(90, 3))
    targets = np.stack([signal @ [1.0, 0.2, 0.1], -(signal @ [0.1, 1.0, 0.3])])
    sources = ["a"] * 30 + ["b"] * 20 + ["c"] * 40
    result = leave_one_source_out(signal, targets, sources, ["x", "y"])
    assert {source: fold["test_prompts"] for source, fold in result["by_source"].items()} == {
        "a": 30,
        "b": 20,
        "c": 40,
    }
    for llm in ("x", "y"):
        taus = [result["by_source"][source]["tau"][llm] for source in "abc"]
        assert min(taus) > 0.9  # a linear truth is learnt from the other sources alone
        assert result["prompt_weighted_tau"][llm] == pytest.approx(
            (30 * taus[0] + 20 * taus[1] + 40 * taus[2]) / 90
        )
    # A source whose lengths run against the others' is predicted from the others alone:
    # its own (reversed) labels would have fitted it, so its tau turns negative.
    reversed_c = targets.copy()
    reversed_c[:, 50:] *= -1
    again = leave_one_source_out(signal, reversed_c, sources, ["x", "y"])
    assert again["by_source"]["c"]["tau"]["x"] < -0.5


def test_train_probe_refuses_bad_input_with_a_message(tmp_path: Path) -> None:
    no_model = run_ssjf("train-probe", "--data", str(HELD_OUT), "--model", str(tmp_path))
    assert no_model.returncode == 1
    assert "not a model directory with a tokenizer.json" in no_model.stderr
    assert "Traceback" not in no_model.stderr
    bad_layer = run_ssjf("train-probe", "--layer", "0", "--out", str(tmp_path / "out"))
    assert bad_layer.returncode == 1 and "--layer must be at least 1" in bad_layer.stderr
    assert not (tmp_path / "out").exists()


def test_another_prompt_sets_labels_are_rated_apart_and_never_leak_into_what_they_rate() -> None:
    rng = np.random.default_rng(2)
    features = rng.normal(size=(100, 4))
    target = features @ [1.0, 0.5, 0.0, 0.0] + 0.05 * rng.normal(size=100)
    other_features = rng.normal(size=(60, 4))
    # The other set's lengths follow other features than the main set's.
    other_target = other_features @ [0.0, 0.0, 1.0, 0.5]
    folds = [list(range(start, start + 20)) for start in range(0, 100, 20)]
    result = with_other_prompt_set(features, target, folds, other_features, other_target)
    assert (result["main_set_prompts"], result["other_set_prompts"]) == (100, 60)
    assert result["main_set_tau"]["main_set_only"] > 0.8
    # Fitted on the main set alone, the other set's ranking is unknown to the probe...
    assert abs(result["other_set_tau"]["fitted_on_main_set"]) < 0.3
    # ... and learnt from its own other folds, which the held-out fold never joins.
    assert result["other_set_tau"]["other_set_folds_only"] > 0.8


def test_the_all_llm_head_learns_only_from_prompts_most_llms_answered() -> None:
    rng = np.random.default_rng(3)
    features = rng.normal(size=(70, 3))
    log_tokens = np.full((3, 70), np.nan)
    log_tokens[:, :50] = features[:50] @ [1.0, 0.3, 0.0] + rng.normal(size=(3, 50)) * 0.1
    # Another prompt set answered by one LLM only, running against the others.
    log_tokens[0, 50:] = -10 * features[50:, 0]
    weights, bias = fit_probe_heads(features, log_tokens)
    assert weights.shape == (4, 3) and bias.shape == (4,)
    pooled_weights, pooled_bias = fit_ridge(features[:50], log_tokens[:, :50].mean(axis=0))
    np.testing.assert_allclose(weights[-1], pooled_weights, rtol=1e-5)
    assert bias[-1] == pytest.approx(pooled_bias, rel=1e-5)
    own_weights, _ = fit_ridge(features, log_tokens[0])
    np.testing.assert_allclose(weights[0], own_weights, rtol=1e-5)  # its own head sees them all


def test_the_probe_trains_on_the_served_models_alpaca_and_arena_labels_by_default() -> None:
    assert probe_default_labels().split(",") == [
        str(SERVED_MODEL_LABELS),
        str(SERVED_MODEL_ARENA_LABELS),
    ]
    result = run_ssjf("train-probe", "--help")
    assert "AlpacaEval and Arena labels" in " ".join(result.stdout.split())
