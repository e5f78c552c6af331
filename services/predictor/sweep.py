"""Quality levers of the proxy model, each trained with the shipped recipe but one change.

Every variant trains on the seed-0 split's 564 training prompts (all six layers fine-tuned,
6 epochs, the epoch kept by dev tau, as ``make predictor``) with one setting changed: the
seed, the formulation, the encoder's learning rate, the batch size, the number of epochs,
training on train+dev, the pooling of the token states, the head, a squared error weighted
toward long answers, or a classification model ranked by its expected length (pooling, head
and tail weight with two seeds each, 10 epochs and classification with three, since the seed
alone moves test tau by up to 0.025). Each is
scored on the 161 held-out test prompts in PyTorch fp32 (no ONNX export: the int8 graph
moves tau by about 0.005, see docs/predictor.md), and seed ensembles are scored from the
saved predictions. The dev tau is the selection criterion; the test tau is reported only.

Tau is a proxy for what the issue asks: the fraction of oracle SJF's gain over FCFS that SSJF
keeps. So each variant (and ensemble, and the shipped artifact's n-gram first stage for
reference) is also rated by it, for vicuna-13b and the served model (SmolLM2): the steady-state
simulator of ``make simulate-submit-path`` (load 0.9, ``--sim-requests`` jobs drawn from the
same test prompts, ``--sim-seeds`` workloads, each batching mode), with the variant's
predictions known on arrival. For the served model, whose labels were collected with a
generation cap, it also reports how much of that fraction rests on its answers cut at the cap.

``python -m services.predictor.sweep [VARIANT ...] [--out bench/results/predictor_sweep.json]``
prints a table and writes the JSON (variants already in it are kept, not retrained).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.bench.realgen import REAL_MAX_NEW_TOKENS
from services.bench.simulator import BATCHING_MODES
from services.bench.workload import held_out_prompt_lengths
from services.common.alpaca import LengthDataset, default_data_dir
from services.common.first_stage import FIRST_STAGE_FILE, FirstStageModel
from services.common.paths import CHECKOUT_ROOT, default_labels, label_dirs
from services.predictor.bench import run_record, write_result
from services.predictor.model import LengthModel
from services.predictor.pipeline import FIRST_STAGE_EXTRA_LLMS, training_data
from services.predictor.runtime import DEFAULT_ARTIFACT
from services.predictor.submit_path_sim import SteadyState
from services.predictor.training import (
    EVAL_LLMS,
    Split,
    TrainConfig,
    Trainer,
    known_tau,
    length_stats,
    split_dataset,
)

SHIPPED = {
    "formulation": "regression-mse",
    "trainable_layers": 6,
    "epochs": 6,
    "max_prompt_tokens": 256,
}
# Each variant: the settings that differ from SHIPPED ("train_dev": fit on train+dev, whose
# epoch is then kept by a dev tau it has seen, so read its test tau only; "readout": "tokens"
# ranks a classification model by its expected length instead of its expected log length,
# Trainer.predict_expected_tokens_z).
VARIANTS: dict[str, dict[str, Any]] = {
    "shipped": {},
    "seed1": {"seed": 1},
    "seed2": {"seed": 2},
    "listwise": {"formulation": "listwise"},
    "ranking": {"formulation": "ranking"},
    "classification": {"formulation": "classification"},
    "encoder-lr-4e-5": {"encoder_lr": 4e-5},
    "encoder-lr-1.6e-4": {"encoder_lr": 1.6e-4},
    "train-dev-4-epochs": {"train_dev": True, "epochs": 4},
    "10-epochs": {"epochs": 10},
    "batch-16": {"batch_size": 16},
    "cls-pooling": {"pooling": "cls"},
    "mean-max-pooling": {"pooling": "mean-max"},
    "linear-head": {"head": "linear"},
    "cls-pooling-seed1": {"pooling": "cls", "seed": 1},
    "mean-max-pooling-seed1": {"pooling": "mean-max", "seed": 1},
    "linear-head-seed1": {"head": "linear", "seed": 1},
    "10-epochs-seed1": {"epochs": 10, "seed": 1},
    "10-epochs-seed2": {"epochs": 10, "seed": 2},
    "tail-weight-1": {"tail_weight": 1.0},
    "tail-weight-1-seed1": {"tail_weight": 1.0, "seed": 1},
    "tail-weight-2": {"tail_weight": 2.0},
    "classification-seed1": {"formulation": "classification", "seed": 1},
    "classification-seed2": {"formulation": "classification", "seed": 2},
    "classification-expected-tokens": {"formulation": "classification", "readout": "tokens"},
    "classification-expected-tokens-seed1": {
        "formulation": "classification",
        "readout": "tokens",
        "seed": 1,
    },
    "classification-expected-tokens-seed2": {
        "formulation": "classification",
        "readout": "tokens",
        "seed": 2,
    },
}
ENSEMBLES = {
    "ensemble-3-seeds": ("shipped", "seed1", "seed2"),
    "ensemble-10-epochs-3-seeds": ("10-epochs", "10-epochs-seed1", "10-epochs-seed2"),
    # Regression and classification at the same seed: do their errors cancel?
    "ensemble-regression-classification": ("shipped", "classification"),
    "ensemble-regression-classification-seed1": ("seed1", "classification-seed1"),
    "ensemble-regression-classification-seed2": ("seed2", "classification-seed2"),
}
REPORT_LLMS = (*EVAL_LLMS, *FIRST_STAGE_EXTRA_LLMS)
# The workloads whose fraction of oracle's gain is reported: the LLM and the served one.
GAIN_LLMS = ("vicuna-13b", *FIRST_STAGE_EXTRA_LLMS)
GAIN_LOAD = 0.9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "variants", nargs="*", default=list(VARIANTS), help=f"any of {', '.join(VARIANTS)}"
    )
    args = parse_rating_args(parser, argv, "predictor_sweep.json")
    out = Path(args.out)
    result: dict[str, Any] = (
        json.loads(out.read_text()) if out.exists() else {"variants": {}, "ensembles": {}}
    )
    result.update(run_record("services.predictor.sweep", argv))
    dataset = training_data(Path(args.data), label_dirs(args.labels))
    split = split_dataset(dataset)
    test = dataset.subset(split.test)
    texts = [prompt.text for prompt in test.prompts]
    llms = [llm for llm in REPORT_LLMS if llm in dataset.lengths]
    true = test.length_matrix(llms)

    def test_taus(predicted: np.ndarray) -> dict[str, float | None]:
        """Test tau per reported LLM of ``predicted``, one row per LLM of ``llms``."""
        return {llm: known_tau(predicted[i], true[i]) for i, llm in enumerate(llms)}

    gain = OracleGain(dataset, split, llms, args.sim_requests, args.sim_seeds)

    predictions_dir = out.with_suffix("")  # per-variant test predictions, for ensembles
    predictions_dir.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        if name in result["variants"]:
            continue
        started = time.monotonic()
        recipe = Recipe.of(name, args.threads)
        variant_split = (
            dataclasses.replace(split, train=split.train + split.dev) if recipe.train_dev else split
        )
        trainer = Trainer(dataset, recipe.config, split=variant_split)
        model = trainer.train()
        predicted = recipe.predict_z(trainer, model, texts)[
            [trainer.llms.index(llm) for llm in llms]
        ]
        np.save(predictions_dir / f"{name}.npy", predicted)
        result["variants"][name] = {
            "changed": VARIANTS[name],
            "best_dev_tau": trainer.summary()["best_dev_tau"],
            "dev_tau_by_epoch": [entry["dev_tau"] for entry in trainer.history],
            "test_tau": test_taus(predicted),
            "minutes": (time.monotonic() - started) / 60,
        }
        write_result(out, result)
    for name, members in ENSEMBLES.items():
        if all((predictions_dir / f"{member}.npy").exists() for member in members):
            mean = np.mean([np.load(predictions_dir / f"{m}.npy") for m in members], axis=0)
            result["ensembles"][name] = {
                "members": list(members),
                "test_tau": test_taus(mean),
                "oracle_gain": gain.of_z(mean),
            }
    for name, entry in result["variants"].items():
        saved = predictions_dir / f"{name}.npy"
        if "oracle_gain" not in entry and saved.exists():
            entry["oracle_gain"] = gain.of_z(np.load(saved))
            write_result(out, result)
    first_stage = FirstStageModel.load(DEFAULT_ARTIFACT / FIRST_STAGE_FILE)
    result["first_stage"] = {
        "version": first_stage.version,
        "oracle_gain": gain.of_tokens(
            np.array([[first_stage.predict(text, llm) for text in texts] for llm in llms])
        ),
    }
    shipped = predictions_dir / "shipped.npy"
    if shipped.exists():
        result["capped_answers"] = capped_answer_bounds(
            gain, true, gain.tokens_of_z(np.load(shipped))
        )
    result["oracle_gain_setting"] = gain.setting()
    result["load_average_1m_at_end"] = os.getloadavg()[0]
    write_result(out, result)
    print_table(result, llms)
    return 0


def parse_rating_args(
    parser: argparse.ArgumentParser, argv: list[str] | None, out_file: str
) -> argparse.Namespace:
    """The options every lever rating shares (data, threads, simulated workloads, output),
    parsed with ``parser``'s own; its ``variants``, where it takes some, checked against
    VARIANTS."""
    parser.add_argument("--data", default=str(default_data_dir() or ""))
    parser.add_argument("--labels", default=default_labels())
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--sim-requests", type=int, default=30_000, help="simulated jobs per workload"
    )
    parser.add_argument("--sim-seeds", type=int, default=3, help="simulated workloads")
    parser.add_argument("--out", default=str(CHECKOUT_ROOT / "bench" / "results" / out_file))
    args = parser.parse_args(argv)
    unknown = [name for name in getattr(args, "variants", ()) if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if not args.data:
        parser.error("--data is required where ../shared/data is absent")
    return args


@dataclass(frozen=True)
class Recipe:
    """A variant's training settings and how its predictions are read out."""

    config: TrainConfig
    train_dev: bool = False
    expected_tokens: bool = False

    @classmethod
    def of(cls, name: str, threads: int) -> Recipe:
        settings = {**SHIPPED, **VARIANTS[name]}
        train_dev = settings.pop("train_dev", False)
        expected_tokens = settings.pop("readout", "z") == "tokens"
        return cls(TrainConfig(**settings, threads=threads), train_dev, expected_tokens)

    def predict_z(self, trainer: Trainer, model: LengthModel, texts: list[str]) -> np.ndarray:
        """``[n_llms, len(texts)]`` estimated z of ``trainer``'s LLMs."""
        if self.expected_tokens:
            return trainer.predict_expected_tokens_z(model, texts)
        return trainer.predict_z(model, texts)


class OracleGain:
    """Rates test-prompt predictions by the fraction of oracle SJF's gain over FCFS they keep
    in the steady-state simulator, per GAIN_LLMS workload and batching mode (the mean over
    the seeds' workloads). The workloads and their FCFS and oracle runs are built once, on
    first use."""

    def __init__(
        self,
        dataset: LengthDataset,
        split: Split,
        llms: list[str],
        requests: int,
        seeds: int,
    ) -> None:
        self.dataset, self.llms, self.split = dataset, llms, split
        # In the order of the saved predictions' columns: the test subset's, file order.
        self.test_ids = [prompt.prompt_id for prompt in dataset.subset(split.test).prompts]
        train_log = np.log1p(dataset.subset(split.train).length_matrix(llms))
        # z -> tokens as the model's own z_to_tokens does, with the training prompts' stats.
        stats = length_stats(train_log)
        self.log_mean = stats.log_mean.numpy()[:, None]
        self.log_std = stats.log_std.numpy()[:, None]
        self.requests, self.seeds = requests, seeds
        self._states: dict[tuple[str, str], SteadyState] = {}

    def _state(self, llm: str, batching: str) -> SteadyState:
        if (llm, batching) not in self._states:
            self._states[(llm, batching)] = SteadyState.build(
                held_out_prompt_lengths(self.dataset, llm, self.split.test),
                batching,
                requests=self.requests,
                load=GAIN_LOAD,
                seeds=self.seeds,
            )
        return self._states[(llm, batching)]

    def setting(self) -> dict[str, Any]:
        """The simulated workloads the fractions come from, for a result's JSON."""
        return {
            "load": GAIN_LOAD,
            "requests": self.requests,
            "seeds": self.seeds,
            "prompts": len(self.test_ids),
            "batchings": list(BATCHING_MODES),
        }

    def tokens_of_z(self, predicted_z: np.ndarray) -> np.ndarray:
        return np.expm1(predicted_z * self.log_std + self.log_mean)

    def of_z(self, predicted_z: np.ndarray) -> dict[str, dict[str, float]]:
        return self.of_tokens(self.tokens_of_z(predicted_z))

    def of_tokens(
        self, tokens: np.ndarray, gain_llms: tuple[str, ...] = GAIN_LLMS
    ) -> dict[str, dict[str, float]]:
        """``tokens``: one row per LLM of ``llms``, one column per test prompt."""
        gains: dict[str, dict[str, float]] = {}
        for llm in gain_llms:
            if llm not in self.llms:
                continue
            scores = dict(zip(self.test_ids, tokens[self.llms.index(llm)], strict=True))
            gains[llm] = {
                batching: float(np.mean(self._state(llm, batching).fractions_for(scores)))
                for batching in BATCHING_MODES
            }
        return gains


def capped_answer_bounds(
    gain: OracleGain, true: np.ndarray, predicted_tokens: np.ndarray
) -> dict[str, dict[str, Any]]:
    """How much of the served model's fraction of oracle's gain rests on its answers cut at the
    generation cap (greedy loops: 23 of SmolLM2's 805 AlpacaEval answers end by the length
    limit), for each served LLM whose labels were collected with that cap: the fraction
    kept by ``predicted_tokens`` with the capped answers' lengths revealed, and
    by the true lengths with the capped answers hidden (put at the median), which bounds any
    predictor that cannot tell which prompts will loop."""
    bounds: dict[str, dict[str, Any]] = {}
    for llm in FIRST_STAGE_EXTRA_LLMS:
        if llm not in gain.llms:
            continue
        row = gain.llms.index(llm)
        capped = true[row] >= REAL_MAX_NEW_TOKENS
        revealed = predicted_tokens.copy()
        revealed[row, capped] = true[row, capped]
        hidden = true.copy()
        hidden[row, capped] = np.nanmedian(true[row])
        bounds[llm] = {
            "cap_tokens": REAL_MAX_NEW_TOKENS,
            "capped_test_prompts": int(capped.sum()),
            "test_prompts": int((~np.isnan(true[row])).sum()),
            "predicted_with_capped_revealed": gain.of_tokens(revealed, (llm,))[llm],
            "truth_with_capped_hidden": gain.of_tokens(hidden, (llm,))[llm],
        }
    return bounds


def print_table(result: dict[str, Any], llms: list[str]) -> None:
    print(f"\n{'variant':<22}{'dev':>7}" + "".join(f"{llm[:12]:>14}" for llm in llms))
    for name, entry in {**result["variants"], **result["ensembles"]}.items():
        dev = entry.get("best_dev_tau")
        cells = "".join(
            f"{entry['test_tau'][llm]:>14.3f}"
            if entry["test_tau"].get(llm) is not None
            else f"{'-':>14}"
            for llm in llms
        )
        print(f"{name:<22}{'' if dev is None else f'{dev:.3f}':>7}{cells}")
    print("(dev: mean dev tau of the epoch kept; the rest: Kendall's tau on the test prompts)")
    print(f"\nfraction of oracle's gain at load {GAIN_LOAD} (none / dynamic / continuous)")
    rows = {**result["variants"], **result["ensembles"], "first stage": result["first_stage"]}
    for name, entry in rows.items():
        gains = entry.get("oracle_gain")
        cells = "".join(
            f"{' / '.join(f'{value:.2f}' for value in per_mode.values()):>24}"
            for per_mode in (gains or {}).values()
        )
        print(f"{name:<26}{cells or '   (predictions not kept)'}")
    print(f"{'':<26}" + "".join(f"{llm[:22]:>24}" for llm in GAIN_LLMS))
    for llm, bound in result.get("capped_answers", {}).items():
        print(
            f"\n{llm}: {bound['capped_test_prompts']} of {bound['test_prompts']} test answers "
            f"cut at {bound['cap_tokens']} tokens"
        )
        for key, label in (
            ("predicted_with_capped_revealed", "shipped, capped answers revealed"),
            ("truth_with_capped_hidden", "true lengths, capped hidden"),
        ):
            print(f"{label:<36}{' / '.join(f'{value:.2f}' for value in bound[key].values())}")


if __name__ == "__main__":
    raise SystemExit(main())
