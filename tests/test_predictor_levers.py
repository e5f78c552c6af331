"""Unit tests of the proxy model's quality levers (pooling, head, tail-weighted loss) and of
the steady-state rating that the lever sweep scores them by."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from services.bench.simulator import BATCHING_MODES
from services.bench.workload import load_prompt_lengths
from services.predictor.model import NUM_BUCKETS, POOLINGS, LengthModel, LengthStats
from services.predictor.submit_path_sim import SteadyState
from services.predictor.training import TrainConfig

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
