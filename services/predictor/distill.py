"""Distillation: a slow, better proxy model labels unlabelled prompts for the fast one.

The served LLM's probe (``ssjf train-probe``) ranks prompts better than the fine-tuned MiniLM,
but costs ~10x its time per prompt (docs/predictor.md). Its predictions are a deterministic
function of the prompt, so they can label any number of prompts no LLM has answered. MiniLM
trained on the labelled prompts' real lengths plus another prompt set's *teacher* lengths
learns the probe's view of those prompts and keeps its own speed: the teacher is only run
offline.

``ssjf teacher-label --teacher DIR --prompts P.jsonl --out DIR`` writes the teacher's lengths
as an ``ssjf collect`` directory (prompts.jsonl, lengths.csv with one model row per head, and
teacher.json with the teacher's version), which ``ssjf train-predictor --labels`` adds as
another prompt set.

``python -m services.predictor.distill [--unlabelled P.jsonl] [--folds 5]`` rates the recipe
out of fold like ``make bench-predictor-crossval``: in each fold the teacher is a ridge probe
fitted on that fold's training prompts alone, and the student is the shipped MiniLM recipe
trained on those prompts plus the teacher-labelled prompt set; its tau is rated over the held-out
fold, beside the probe and the plain recipe from their own JSON results.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from services.common.alpaca import (
    LengthDataset,
    Prompt,
    add_prompt_set,
    default_data_dir,
    load_prompts,
    write_dataset,
)
from services.predictor.bench import finish_record, run_record
from services.predictor.crossval import FoldSetting, fold_split, print_table, train_fold
from services.predictor.probe import SERVED_LAYER, LlmStates, fit_ridge
from services.predictor.runtime import ArtifactRuntime
from services.predictor.sweep import Recipe, parse_rating_args
from services.predictor.training import Split

TEACHER_FILE = "teacher.json"
TEACHER_BATCH = 16
DISTILLED_NAME = "distilled"


def teacher_dataset(
    prompts: Sequence[Prompt], llms: Sequence[str], tokens: np.ndarray
) -> LengthDataset:
    """``prompts`` labelled with a teacher's predicted ``tokens`` (``[len(llms), len(prompts)]``),
    rounded to whole tokens of at least one, as if each LLM had answered them."""
    whole = np.maximum(1, np.rint(tokens)).astype(np.int64)
    lengths = {
        llm: {prompt.prompt_id: int(count) for prompt, count in zip(prompts, row, strict=True)}
        for llm, row in zip(llms, whole, strict=True)
    }
    return LengthDataset(list(prompts), lengths)


def artifact_labels(
    runtime: ArtifactRuntime, prompts: Sequence[Prompt], progress: bool = False
) -> LengthDataset:
    """``prompts`` labelled by every per-LLM head of a loaded artifact (the all-LLM head is
    left out: training derives its own from the per-LLM lengths)."""
    tokens = np.empty((len(runtime.llms), len(prompts)), dtype=np.float32)
    starts = range(0, len(prompts), TEACHER_BATCH)
    for start in tqdm(starts, desc="teacher", unit="batch", disable=not progress):
        chunk = prompts[start : start + TEACHER_BATCH]
        predicted = runtime.predict_all([prompt.text for prompt in chunk])
        tokens[:, start : start + len(chunk)] = predicted[:, : len(runtime.llms)].T
    return teacher_dataset(prompts, runtime.llms, tokens)


def write_teacher_labels(
    teacher: Path, prompts_file: Path, out: Path, threads: int = 2
) -> dict[str, Any]:
    """Label ``prompts_file`` with the ``teacher`` artifact into ``out`` (an ``ssjf collect``
    directory) and return what ``teacher.json`` records."""
    started = time.monotonic()
    prompts = load_prompts(prompts_file)
    if not prompts:
        raise ValueError(f"{prompts_file}: no prompts")
    empty = [str(prompt.prompt_id) for prompt in prompts if not prompt.text.strip()]
    if empty:
        raise ValueError(f"{prompts_file}: empty prompt text for ids {', '.join(empty[:5])}")
    runtime = ArtifactRuntime(teacher, intra_op_threads=threads)
    write_dataset(artifact_labels(runtime, prompts, progress=True), out)
    record = {
        "teacher": runtime.version,
        "teacher_artifact": str(teacher),
        "prompts": len(prompts),
        "heads": len(runtime.llms),
        "minutes": (time.monotonic() - started) / 60,
    }
    (out / TEACHER_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def out_of_fold_student(
    setting: FoldSetting,
    features: np.ndarray,
    unlabelled: list[Prompt],
    unlabelled_features: np.ndarray,
    work: Path,
    threads: int,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """``[len(setting.llms), prompts]`` out-of-fold predicted tokens of the shipped recipe
    trained, per fold, on the fold's training prompts plus ``unlabelled`` labelled by a ridge
    probe (``features`` of the labelled prompts in ``setting.column`` order, and of the
    unlabelled ones) fitted on those training prompts alone; and per fold its summary."""
    dataset = setting.dataset
    ordered = dataset.subset(setting.gain.test_ids)
    llms = ordered.llms
    log_tokens = np.log1p(ordered.length_matrix(llms))
    recipe = Recipe.of("shipped", threads)
    predicted = np.full(setting.true.shape, np.nan)
    folds = []
    for held_out in range(len(setting.parts)):
        started = time.monotonic()
        split = fold_split(setting.parts, held_out)
        train = np.array([setting.column[pid] for pid in split.train])
        taught = [
            llm
            for index, llm in enumerate(llms)
            if (~np.isnan(log_tokens[index, train])).sum() >= 2
        ]
        teacher = np.stack(
            [
                np.expm1(unlabelled_features @ weights + bias)
                for weights, bias in (
                    fit_ridge(features[train], log_tokens[llms.index(llm), train]) for llm in taught
                )
            ]
        )
        directory = work / f"fold{held_out + 1}" / "unlabelled"
        write_dataset(teacher_dataset(unlabelled, taught, teacher), directory)
        combined = add_prompt_set(dataset, directory)
        added = [pid for pid in combined.prompt_ids if pid not in setting.column]
        student_split = Split(train=[*split.train, *added], dev=split.dev, test=split.test)
        print(
            f"fold {held_out + 1}/{len(setting.parts)}: {len(split.train)} labelled + "
            f"{len(added)} teacher-labelled train, {len(split.dev)} dev",
            flush=True,
        )
        dev_tau = train_fold(
            combined, recipe, student_split, setting.column, setting.llms, predicted
        )
        folds.append({"best_dev_tau": dev_tau, "minutes": (time.monotonic() - started) / 60})
    return predicted, folds


# What the distilled student is read beside: the plain recipe (two seeds) and its teacher's
# kind, each from its own benchmark's JSON when that was cut into the same folds.
BESIDE = {
    "predictor_crossval.json": ("shipped", "seed1"),
    "predictor_probe.json": ("llm-probe",),
}


def rated_beside(results_dir: Path, folds: int) -> dict[str, Any]:
    """The BESIDE entries found in ``results_dir``'s JSON results with ``folds`` folds."""
    found = {}
    for file, names in BESIDE.items():
        path = results_dir / file
        variants = json.loads(path.read_text())["variants"] if path.exists() else {}
        for name in names:
            if name in variants and variants[name]["folds"] == folds:
                found[name] = variants[name]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = default_data_dir()
    parser.add_argument(
        "--unlabelled",
        default=str(data.parent / "arena_hard_v2" / "prompts.jsonl") if data else "",
        help="prompts.jsonl of the prompt set the teacher labels (no LLM's lengths needed)",
    )
    parser.add_argument("--layer", type=int, default=SERVED_LAYER, help="the teacher probe's layer")
    parser.add_argument("--folds", type=int, default=5, help="parts the prompts are cut into")
    args = parse_rating_args(parser, argv, "predictor_distill.json")
    if not args.unlabelled or not Path(args.unlabelled).is_file():
        parser.error(f"--unlabelled {args.unlabelled!r} is not a prompts.jsonl")
    started = time.monotonic()
    result = run_record("services.predictor.distill", argv)
    setting = FoldSetting.of(args)
    unlabelled = load_prompts(Path(args.unlabelled))
    states = LlmStates("smollm2-135m-instruct", [args.layer], threads=args.threads)
    labelled = setting.dataset.subset(setting.gain.test_ids).prompts
    features = states([prompt.text for prompt in labelled], progress=True)[:, 0]
    unlabelled_features = states([prompt.text for prompt in unlabelled], progress=True)[:, 0]
    out = Path(args.out)
    predictions_dir = out.with_suffix("")
    predicted, folds = out_of_fold_student(
        setting, features, unlabelled, unlabelled_features, predictions_dir, args.threads
    )
    np.save(predictions_dir / f"{DISTILLED_NAME}.npy", predicted)
    result["variants"] = {
        DISTILLED_NAME: {
            "teacher": f"ridge probe, smollm2-135m-instruct layer {args.layer}",
            "unlabelled": {"file": args.unlabelled, "prompts": len(unlabelled)},
            "folds": args.folds,
            "by_fold": folds,
            **setting.rate(predicted),
        }
    }
    result["variants"].update(rated_beside(out.parent, args.folds))
    result["oracle_gain_setting"] = setting.gain.setting()
    finish_record(out, result, started)
    print_table(result, setting.llms)
    print("\ntau of each fold's model on its own prompts, fold by fold:")
    for llm in setting.llms:
        for name, entry in result["variants"].items():
            taus = " ".join(
                "-" if tau is None else f"{tau:.3f}" for tau in entry["tau_by_fold"][llm]
            )
            print(f"  {llm[:24]:<26}{name:<12}{taus}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
