"""Out-of-fold rating of a proxy-model recipe over every labelled prompt, not 161 of them.

The lever sweep (``services.predictor.sweep``) scores each variant on the seed-0 split's 161
test prompts; for the served model two of those answers loop to the generation cap and decide
its fraction of oracle's gain. Here a recipe (a sweep variant's settings) is trained once per
fold, each time holding that fold of the prompts out (the other folds train it, with a dev
slice of them choosing the epoch), so that every prompt is predicted by a model that never saw
it. Each recipe gets Kendall's tau over all prompts with a bootstrap interval over prompts,
and the fraction of oracle SJF's gain over FCFS in the sweep's steady-state simulator on a
workload drawn from all of them (23 looping SmolLM2 answers instead of two), with the same
capped-answer bounds as the sweep.

``python -m services.predictor.crossval [VARIANT ...] [--folds 5]
[--out bench/results/predictor_crossval.json]`` prints a table and writes the JSON (variants
already in it are kept, not retrained; their out-of-fold predictions sit beside it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import kendalltau

from services.common.alpaca import (
    LengthDataset,
    PromptId,
    ids_by_prompt_set,
    split_by_prompt,
)
from services.common.paths import label_dirs
from services.predictor.bench import run_record, write_result
from services.predictor.pipeline import training_data
from services.predictor.sweep import (
    GAIN_LOAD,
    REPORT_LLMS,
    VARIANTS,
    OracleGain,
    Recipe,
    capped_answer_bounds,
    parse_rating_args,
)
from services.predictor.training import Split, Trainer, known_tau

# The share of the training folds that chooses the epoch (the sweep's split: 0.1 of 0.8).
DEV_SHARE = 0.125
BOOTSTRAP_RESAMPLES = 1000


def folds_of(dataset: LengthDataset, folds: int, seed: int = 0) -> list[list[PromptId]]:
    """``folds`` disjoint parts of the prompts covering all of them, each prompt set cut into
    ``folds`` near-equal shares so that every set is in every fold."""
    if folds < 2:
        raise ValueError("cross-validation needs at least 2 folds")
    parts: list[list[PromptId]] = [[] for _ in range(folds)]
    for ids in ids_by_prompt_set(dataset.prompts).values():
        for part, share in zip(parts, split_by_prompt(ids, [1 / folds] * folds, seed), strict=True):
            part.extend(share)
    return parts


def fold_split(parts: list[list[PromptId]], held_out: int) -> Split:
    """Fold ``held_out`` as the test part; the others train, a DEV_SHARE of them as dev."""
    rest = [pid for index, part in enumerate(parts) if index != held_out for pid in part]
    train, dev = split_by_prompt(rest, (1 - DEV_SHARE, DEV_SHARE), seed=held_out)
    return Split(train=train, dev=dev, test=parts[held_out])


def tau_interval(
    predicted: np.ndarray, true: np.ndarray, rng: np.random.Generator
) -> dict[str, float] | None:
    """Kendall's tau over the known prompts and a 95% percentile interval from resampling
    the prompts (None below 5 known)."""
    known = ~np.isnan(true)
    predicted, true = predicted[known], true[known]
    if len(true) < 5:
        return None
    resampled = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        pick = rng.integers(0, len(true), len(true))
        resampled.append(kendalltau(predicted[pick], true[pick]).statistic)
    low, high = np.nanpercentile(resampled, [2.5, 97.5])
    return {
        "tau": float(kendalltau(predicted, true).statistic),
        "low": float(low),
        "high": float(high),
        "prompts": len(true),
    }


@dataclass(frozen=True)
class FoldSetting:
    """The labelled prompts cut into folds, and how out-of-fold predictions of them are
    rated: every prompt is a test prompt of the steady-state simulator's workload."""

    dataset: LengthDataset
    parts: list[list[PromptId]]
    gain: OracleGain
    true: np.ndarray  # ``[len(llms), prompts]`` true tokens, columns in ``column`` order
    column: dict[PromptId, int]

    @classmethod
    def of(cls, args: argparse.Namespace) -> FoldSetting:
        """From the rating options (``parse_rating_args``) and ``--folds``."""
        dataset = training_data(Path(args.data), label_dirs(args.labels))
        everything = Split(train=dataset.prompt_ids, dev=[], test=dataset.prompt_ids)
        llms = [llm for llm in REPORT_LLMS if llm in dataset.lengths]
        gain = OracleGain(dataset, everything, llms, args.sim_requests, args.sim_seeds)
        return cls(
            dataset=dataset,
            parts=folds_of(dataset, args.folds),
            gain=gain,
            true=dataset.subset(gain.test_ids).length_matrix(llms),
            column={pid: index for index, pid in enumerate(gain.test_ids)},
        )

    @property
    def llms(self) -> list[str]:
        return self.gain.llms

    @property
    def fold_columns(self) -> list[list[int]]:
        return [[self.column[pid] for pid in part] for part in self.parts]

    def rate(self, tokens: np.ndarray) -> dict[str, Any]:
        """Out-of-fold predicted ``tokens`` (one row per LLM of ``llms``, one column per
        prompt) against the true lengths: pooled tau with its interval, each fold's tau, the
        simulated fraction of oracle's gain and the capped-answer bounds."""
        rng = np.random.default_rng(0)
        true, fold_columns = self.true, self.fold_columns
        return {
            "tau": {llm: tau_interval(tokens[i], true[i], rng) for i, llm in enumerate(self.llms)},
            # Each fold's own model on its own prompts: pooling five models' predictions also
            # mixes their calibrations, which the pooled tau pays for and these do not.
            "tau_by_fold": {
                llm: [known_tau(tokens[i, cols], true[i, cols]) for cols in fold_columns]
                for i, llm in enumerate(self.llms)
            },
            "oracle_gain": self.gain.of_tokens(tokens),
            "capped_answers": capped_answer_bounds(self.gain, true, tokens),
        }


def out_of_fold_tokens(
    dataset: LengthDataset,
    recipe: Recipe,
    parts: list[list[PromptId]],
    column: dict[PromptId, int],
    llms: list[str],
) -> tuple[np.ndarray, list[float]]:
    """``[len(llms), len(column)]`` predicted tokens, each prompt's column (``column``) from
    the model that held it out, and the dev tau each fold's model was kept at."""
    tokens = np.full((len(llms), len(column)), np.nan)
    dev_taus = []
    for held_out in range(len(parts)):
        split = fold_split(parts, held_out)
        print(
            f"fold {held_out + 1}/{len(parts)}: {len(split.train)} train, {len(split.dev)} dev",
            flush=True,
        )
        dev_taus.append(train_fold(dataset, recipe, split, column, llms, tokens))
    return tokens, dev_taus


def train_fold(
    dataset: LengthDataset,
    recipe: Recipe,
    split: Split,
    column: dict[PromptId, int],
    llms: list[str],
    tokens: np.ndarray,
) -> float:
    """Train ``recipe`` on ``split``, write its predicted tokens of the test prompts into
    their ``column``s of ``tokens`` (one row per LLM of ``llms``), and return the dev tau the
    model was kept at."""
    trainer = Trainer(dataset, recipe.config, split=split)
    model = trainer.train()
    test = dataset.subset(split.test).prompts
    rows = [trainer.llms.index(llm) for llm in llms]
    z = recipe.predict_z(trainer, model, [prompt.text for prompt in test])[rows]
    log_mean = trainer.stats.log_mean.numpy()[rows, None]
    log_std = trainer.stats.log_std.numpy()[rows, None]
    tokens[:, [column[prompt.prompt_id] for prompt in test]] = np.expm1(z * log_std + log_mean)
    return float(trainer.summary()["best_dev_tau"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "variants", nargs="*", default=["shipped"], help=f"any of {', '.join(VARIANTS)}"
    )
    parser.add_argument("--folds", type=int, default=5, help="parts the prompts are cut into")
    args = parse_rating_args(parser, argv, "predictor_crossval.json")
    out = Path(args.out)
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"variants": {}}
    result.update(run_record("services.predictor.crossval", argv))
    setting = FoldSetting.of(args)
    dataset, parts, llms, column = setting.dataset, setting.parts, setting.llms, setting.column
    predictions_dir = out.with_suffix("")
    predictions_dir.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        saved = predictions_dir / f"{name}.npy"
        entry = result["variants"].get(name)
        if entry is not None and entry["folds"] != args.folds:
            parser.error(f"{name} in {out} was cut into {entry['folds']} folds: use another --out")
        if entry is None or not saved.exists():
            started = time.monotonic()
            recipe = Recipe.of(name, args.threads)
            if recipe.train_dev:
                parser.error(f"{name} trains on its dev prompts: nothing would choose its epoch")
            tokens, dev_taus = out_of_fold_tokens(dataset, recipe, parts, column, llms)
            np.save(saved, tokens)
            entry = result["variants"][name] = {
                "changed": VARIANTS[name],
                "folds": args.folds,
                "dev_tau_by_fold": dev_taus,
                "minutes": (time.monotonic() - started) / 60,
            }
        # The ratings are recomputed from the saved predictions on every run.
        entry.update(setting.rate(np.load(saved)))
        write_result(out, result)
    result["oracle_gain_setting"] = setting.gain.setting()
    result["load_average_1m_at_end"] = os.getloadavg()[0]
    write_result(out, result)
    print_table(result, llms)
    return 0


def print_table(result: dict[str, Any], llms: list[str]) -> None:
    print(f"\n{'variant':<16}" + "".join(f"{llm[:18]:>22}" for llm in llms))
    for name, entry in result["variants"].items():
        cells = "".join(
            f"{'-':>22}"
            if entry["tau"].get(llm) is None
            else f"{entry['tau'][llm]['tau']:>8.3f} [{entry['tau'][llm]['low']:.2f}, "
            f"{entry['tau'][llm]['high']:.2f}]"
            for llm in llms
        )
        print(f"{name:<16}{cells}")
        by_fold = "".join(
            f"{np.mean(taus):>8.3f} [{min(taus):.2f}, {max(taus):.2f}]"
            for taus in (
                [tau for tau in entry["tau_by_fold"][llm] if tau is not None] or [math.nan]
                for llm in llms
            )
        )
        print(f"{'  per fold':<16}{by_fold}")
    print(
        "(out-of-fold Kendall's tau over every prompt, 95% bootstrap interval over prompts;"
        " per fold: the mean [min, max] of each fold's model on its own prompts)"
    )
    print(f"\nfraction of oracle's gain at load {GAIN_LOAD} (none / dynamic / continuous)")
    for name, entry in result["variants"].items():
        for llm, per_mode in entry["oracle_gain"].items():
            bound = entry["capped_answers"].get(llm)
            line = f"{name:<16}{llm[:24]:<26}{' / '.join(f'{v:.2f}' for v in per_mode.values())}"
            if bound:
                revealed = " / ".join(
                    f"{v:.2f}" for v in bound["predicted_with_capped_revealed"].values()
                )
                hidden = " / ".join(f"{v:.2f}" for v in bound["truth_with_capped_hidden"].values())
                line += (
                    f"   {bound['capped_test_prompts']} capped answers revealed: {revealed};"
                    f" true lengths with them hidden: {hidden}"
                )
            print(line)


if __name__ == "__main__":
    raise SystemExit(main())
