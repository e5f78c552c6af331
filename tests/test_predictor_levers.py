"""Unit tests of the proxy model's quality levers (pooling, head, tail-weighted loss) and of
the steady-state rating that the lever sweep scores them by."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from services.bench.realgen import REAL_MAX_NEW_TOKENS
from services.bench.simulator import BATCHING_MODES
from services.bench.workload import load_prompt_lengths
from services.common.alpaca import PROMPT_SET_KEY, LengthDataset, Prompt
from services.predictor import submit_path_sim
from services.predictor.crossval import fold_split, folds_of, tau_interval
from services.predictor.model import NUM_BUCKETS, POOLINGS, LengthModel, LengthStats
from services.predictor.pipeline import FIRST_STAGE_EXTRA_LLMS
from services.predictor.submit_path_sim import SteadyState
from services.predictor.sweep import OracleGain, Recipe, capped_answer_bounds
from services.predictor.training import Split, TrainConfig, Trainer

HIDDEN = 8


def tiny_model(
    pooling: str = "mean", head: str = "mlp", formulation: str = "regression-mse"
) -> LengthModel:
    torch.manual_seed(0)
    encoder = BertModel(
        BertConfig(
            vocab_size=32,
            hidden_size=HIDDEN,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
        )
    )
    stats = LengthStats(
        log_mean=torch.zeros(2),
        log_std=torch.ones(2),
        bucket_edges=torch.zeros(2, NUM_BUCKETS - 1),
        bucket_centers=torch.zeros(2, NUM_BUCKETS),
    )
    return LengthModel(encoder, formulation, stats, pooling=pooling, head=head).eval()


@pytest.mark.parametrize("pooling", POOLINGS)
def test_every_pooling_ignores_what_lies_in_the_padding(pooling: str) -> None:
    model = tiny_model(pooling)
    states = torch.randn(1, 5, HIDDEN)
    mask = torch.ones(1, 5, dtype=torch.long)
    # The same prompt padded to 9 positions whose states are large garbage.
    padded_states = torch.cat([states, 100.0 * torch.randn(1, 4, HIDDEN)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model.head_outputs(states, mask)
        padded = model.head_outputs(padded_states, padded_mask)
    assert alone.shape == (1, 2, 1)
    torch.testing.assert_close(alone, padded)


def test_the_linear_head_is_linear_in_the_pooled_embedding_and_the_mlp_is_not() -> None:
    mask = torch.ones(1, 1, dtype=torch.long)
    a, b = torch.randn(1, 1, HIDDEN), torch.randn(1, 1, HIDDEN)
    zero = torch.zeros(1, 1, HIDDEN)

    def additivity_gap(model: LengthModel) -> float:
        with torch.no_grad():
            out = [model.head_outputs(x, mask) for x in (a + b, a, b, zero)]
        return float((out[0] - out[1] - out[2] + out[3]).abs().max())

    assert additivity_gap(tiny_model(head="linear")) < 1e-5
    assert additivity_gap(tiny_model(head="mlp")) > 1e-4


@pytest.mark.parametrize("formulation", ["regression-mse", "regression-l1"])
def test_weighted_regression_loss(formulation: str) -> None:
    model = tiny_model(formulation=formulation)
    raw = torch.tensor([[[0.0], [1.0]], [[2.0], [0.0]]])
    z = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    known = torch.tensor([[True, True], [True, False]])
    unweighted = model.loss(raw, z, known)
    # Equal weights change nothing; the unknown entry's weight is never read.
    uniform = torch.tensor([[3.0, 3.0], [3.0, 1e6]])
    torch.testing.assert_close(model.loss(raw, z, known, uniform), unweighted)
    # All the weight on one prompt: the loss is that prompt's error alone (|2 - 0| = 2).
    one = torch.tensor([[1e-9, 1e-9], [1.0, 1e6]])
    expected = 4.0 if formulation == "regression-mse" else 2.0
    assert float(model.loss(raw, z, known, one)) == pytest.approx(expected, rel=1e-6)


def test_a_ranking_loss_refuses_weights_and_so_does_its_training_config() -> None:
    model = tiny_model(formulation="ranking")
    raw, z = torch.zeros(2, 2, 1), torch.zeros(2, 2)
    known = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="no per-prompt weights"):
        model.loss(raw, z, known, torch.ones(2, 2))
    with pytest.raises(ValueError, match="tail_weight weighs a regression loss, not listwise"):
        TrainConfig(formulation="listwise", tail_weight=1.0)
    assert TrainConfig(formulation="regression-l1", tail_weight=1.0).tail_weight == 1.0


@pytest.mark.parametrize("batching", BATCHING_MODES)
def test_steady_state_rates_scores_by_the_fraction_of_oracles_gain(batching: str) -> None:
    items, _ = load_prompt_lengths("vicuna-13b", None)  # the vendored workload
    state = SteadyState.build(items, batching, requests=3000, load=0.9, seeds=2)
    assert all(f > o for f, o in zip(state.fcfs_jct_s, state.oracle_jct_s, strict=True))
    true = {item.prompt_id: float(item.output_tokens) for item in items}
    # The true lengths are the oracle (up to ties the scaled lengths break by arrival)...
    assert min(state.fractions_for(true)) > 0.9
    # ...one score for all is FCFS (ties go by arrival)...
    assert state.fractions_for(dict.fromkeys(true, 100.0)) == pytest.approx([0.0, 0.0], abs=1e-9)
    # ...and longest-first is worse than FCFS.
    assert max(state.fractions_for({pid: 1e5 - tokens for pid, tokens in true.items()})) < 0


def test_a_classification_model_read_out_as_expected_length() -> None:
    """Two prompts with the same expected log length: all weight on a middle bucket, or split
    between the shortest and the longest bucket. The expected-length readout puts the second
    (a chance of a very long answer) behind the first; one-bucket weight reads out as that
    bucket's mean training length."""
    lengths = [int(2 ** (index / 4)) + 1 for index in range(60)]  # 2 .. 33k tokens
    dataset = LengthDataset(
        prompts=[Prompt(index, f"prompt {index}") for index in range(len(lengths))],
        lengths={"vicuna-13b": dict(enumerate(lengths))},
    )
    trainer = Trainer(dataset, TrainConfig(formulation="classification", llms=["vicuna-13b"]))
    model = LengthModel.from_pretrained_encoder("classification", trainer.stats, layers=1)
    middle = NUM_BUCKETS // 2
    centers = model.bucket_centers[0]
    # Weights on the first and last bucket whose mean z is the middle bucket's.
    low, high = float(centers[0]), float(centers[-1])
    high_share = (float(centers[middle]) - low) / (high - low)
    probabilities = torch.full((2, 1, NUM_BUCKETS), 1e-9)
    probabilities[0, 0, middle] = 1.0
    probabilities[1, 0, 0], probabilities[1, 0, -1] = 1.0 - high_share, high_share
    trainer.predict_raw = lambda model, texts: probabilities.log()  # type: ignore[method-assign]

    by_log_length = trainer.predict_z(model, ["a", "b"])[0]
    by_length = trainer.predict_expected_tokens_z(model, ["a", "b"])[0]
    assert by_log_length[0] == pytest.approx(by_log_length[1], abs=1e-6)
    assert by_length[1] > by_length[0] + 0.5

    train_tokens = trainer.train_set.length_matrix(["vicuna-13b"])[0]
    buckets = np.searchsorted(model.bucket_edges[0].numpy(), trainer.train_z[0], side="left")
    middle_tokens = train_tokens[buckets == middle].mean()
    stats = trainer.stats
    expected_z = (np.log1p(middle_tokens) - float(stats.log_mean[0])) / float(stats.log_std[0])
    assert by_length[0] == pytest.approx(expected_z, abs=1e-4)

    regression = LengthModel.from_pretrained_encoder("regression-mse", trainer.stats, layers=1)
    with pytest.raises(ValueError, match="only a classification model has buckets"):
        trainer.predict_expected_tokens_z(regression, ["a"])


def test_the_sweep_reports_how_much_of_the_served_models_gain_rests_on_capped_answers() -> None:
    served = FIRST_STAGE_EXTRA_LLMS[0]
    count = 40
    # A spread of lengths; every fifth test prompt loops to the generation cap.
    served_lengths = {
        index: REAL_MAX_NEW_TOKENS if index >= 20 and index % 5 == 0 else 20 + 25 * index
        for index in range(count)
    }
    dataset = LengthDataset(
        prompts=[Prompt(index, f"prompt {index}") for index in range(count)],
        lengths={
            "vicuna-13b": {index: 10 + index for index in range(count)},
            served: served_lengths,
        },
    )
    split = Split(train=list(range(20)), dev=[], test=list(range(20, count)))
    llms = ["vicuna-13b", served]
    gain = OracleGain(dataset, split, llms, requests=2000, seeds=2)
    true = dataset.subset(split.test).length_matrix(llms)
    # A predictor that says the same for every prompt keeps none of oracle's gain...
    constant_z = np.zeros_like(true)
    assert max(gain.of_z(constant_z)[served].values()) == pytest.approx(0.0, abs=1e-9)

    bound = capped_answer_bounds(gain, true, gain.tokens_of_z(constant_z))[served]
    assert (bound["capped_test_prompts"], bound["test_prompts"]) == (4, 20)
    # ...with the loops revealed it keeps some; the truth without them keeps most, not all.
    revealed = bound["predicted_with_capped_revealed"]
    hidden = bound["truth_with_capped_hidden"]
    assert set(revealed) == set(hidden) == set(BATCHING_MODES)
    assert all(0.1 < value < 0.99 for value in revealed.values())
    assert all(0.3 < value < 0.99 for value in hidden.values())
    # A perfect predictor has nothing left to reveal; the hidden bound does not depend on it.
    perfect_z = (np.log1p(true) - gain.log_mean) / gain.log_std
    perfect = capped_answer_bounds(gain, true, gain.tokens_of_z(perfect_z))[served]
    assert min(perfect["predicted_with_capped_revealed"].values()) > 0.99
    assert perfect["truth_with_capped_hidden"] == hidden


def test_cross_validation_folds_cover_every_prompt_once_and_hold_each_out() -> None:
    main_set = [Prompt(index, f"prompt {index}") for index in range(23)]
    other_set = [
        Prompt(f"arena:{index}", f"other {index}", {PROMPT_SET_KEY: "arena"}) for index in range(7)
    ]
    dataset = LengthDataset(prompts=main_set + other_set, lengths={})
    parts = folds_of(dataset, 5)
    every = [pid for part in parts for pid in part]
    assert sorted(map(str, every)) == sorted(map(str, dataset.prompt_ids))
    assert len(every) == len(set(every)) == 30
    assert all(any(str(pid).startswith("arena:") for pid in part) for part in parts)
    assert folds_of(dataset, 5) == parts  # repeatable
    for held_out, part in enumerate(parts):
        split = fold_split(parts, held_out)
        assert split.test == part
        assert set(split.train).isdisjoint(split.dev)
        assert set(split.train) | set(split.dev) == set(every) - set(part)
        assert 0 < len(split.dev) < len(split.train)
    with pytest.raises(ValueError, match="at least 2 folds"):
        folds_of(dataset, 1)


def test_tau_interval_brackets_the_tau_and_needs_five_prompts() -> None:
    rng = np.random.default_rng(0)
    true = np.array([5.0, 1.0, np.nan, 3.0, 9.0, 2.0, 7.0, 4.0])
    perfect = tau_interval(np.nan_to_num(true), true, rng)
    assert perfect == pytest.approx({"tau": 1.0, "low": 1.0, "high": 1.0, "prompts": 7})
    reversed_order = tau_interval(-np.nan_to_num(true), true, rng)
    assert reversed_order is not None and reversed_order["tau"] == -1.0
    noisy = tau_interval(np.nan_to_num(true) + rng.normal(0, 3, len(true)), true, rng)
    assert noisy is not None and noisy["low"] <= noisy["tau"] <= noisy["high"] < 1.0
    assert tau_interval(np.arange(4.0), np.arange(4.0), rng) is None


def test_a_sweep_variant_names_its_training_settings_and_readout() -> None:
    shipped = Recipe.of("shipped", threads=1)
    assert (shipped.config.formulation, shipped.config.epochs) == ("regression-mse", 6)
    assert not shipped.train_dev and not shipped.expected_tokens
    expected = Recipe.of("classification-expected-tokens-seed1", threads=1)
    assert (expected.config.formulation, expected.config.seed) == ("classification", 1)
    assert expected.expected_tokens
    assert Recipe.of("train-dev-4-epochs", threads=1).train_dev


def test_submit_path_simulation_rates_demotion_where_a_job_can_give_way(tmp_path) -> None:
    out = tmp_path / "sim.json"
    common = ["--requests", "400", "--seeds", "1", "--batchings", "none,dynamic"]
    assert submit_path_sim.main([*common, "--demote-after", "3", "--out", str(out)]) == 0
    modes = json.loads(out.read_text())["modes"]
    demoted = modes["none"]["variants"]["ssjf-instant-demote-3x"]
    assert np.isfinite(demoted["fraction_mean"]) and demoted["demoted"] >= 0
    assert "ssjf-instant-demote-3x" not in modes["dynamic"]["variants"]
    for bad in ("0.5", "two"):
        with pytest.raises(SystemExit):
            submit_path_sim.main([*common, "--demote-after", bad, "--out", str(out)])
