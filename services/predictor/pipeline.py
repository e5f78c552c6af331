"""train -> export (+int8, parity) -> held-out evaluation through ONNX, for one or more
formulations: what ``ssjf train-predictor`` and ``make predictor`` run."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.common.alpaca import (
    LengthDataset,
    PromptId,
    add_collected,
    ids_by_prompt_set,
    load_dataset,
)
from services.common.first_stage import FIRST_STAGE_FILE, fit_first_stage
from services.predictor.evaluate import ALL_SOURCES, evaluate_by_source, score
from services.predictor.export import FP32_MODEL_FILE, METADATA_FILE, write_artifact
from services.predictor.model import FORMULATIONS
from services.predictor.runtime import ArtifactRuntime
from services.predictor.training import (
    DEFAULT_LLM,
    EVAL_LLMS,
    Split,
    TrainConfig,
    Trainer,
    split_dataset,
)

log = logging.getLogger(__name__)

# The served model's own LLM gets a first-stage head whenever its labels are in the data.
FIRST_STAGE_EXTRA_LLMS = ("smollm2-135m-instruct",)

__all__ = ["FORMULATIONS", "format_table", "train_and_export"]


def training_data(data_dir: Path, label_dirs: Sequence[Path] = ()) -> LengthDataset:
    """The shared-format training data plus ``ssjf collect`` directories: other LLMs' lengths
    of the same prompts (one more head each) or another prompt set's (more prompts)."""
    dataset = load_dataset(data_dir)
    for directory in label_dirs:
        dataset = add_collected(dataset, directory)
    return dataset


def train_and_export(
    *,
    data_dir: Path,
    label_dirs: Sequence[Path] = (),
    formulations: Sequence[str],
    out: Path,
    nested: bool,
    llms: list[str],
    name: str,
    quantize: bool,
    keep_fp32: bool = False,
    serve_max_prompt_tokens: int | None = None,
    **train_options: Any,
) -> list[dict[str, Any]]:
    """Train each formulation, write its artifact (``out`` or ``out/<formulation>``) and score
    it on the held-out test prompts. Returns one result row per formulation."""
    dataset = training_data(data_dir, label_dirs)
    results = []
    lower = None  # the frozen layers' states, shared by every formulation
    for formulation in formulations:
        config = TrainConfig(formulation=formulation, llms=llms or None, **train_options)
        trainer = Trainer(dataset, config, lower)
        lower = trainer.lower
        model = trainer.train()
        directory = out / formulation if nested else out
        default_llm = DEFAULT_LLM if DEFAULT_LLM in trainer.llms else trainer.llms[0]
        metadata = write_artifact(
            model,
            trainer.llms,
            default_llm,
            config.max_prompt_tokens,
            directory,
            name=name,
            quantize=quantize,
            keep_fp32=keep_fp32,
            training_summary=trainer.summary(),
            serve_max_prompt_tokens=serve_max_prompt_tokens,
        )
        held_out = score_artifact(
            directory, metadata, dataset, trainer.split, trainer.eval_llms, keep_fp32 and quantize
        )
        results.append(
            {
                "formulation": formulation,
                "artifact": str(directory),
                "version": metadata["version"],
                "best_dev_tau": metadata["training"]["best_dev_tau"],
                "parity": metadata["parity"],
                "held_out_test": held_out,
            }
        )
    if nested:
        (out / "comparison.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def score_artifact(
    directory: Path,
    metadata: dict[str, Any],
    dataset: LengthDataset,
    split: Split,
    eval_llms: Sequence[str],
    score_fp32: bool = False,
) -> dict[str, Any]:
    """Score a written artifact on the split's held-out test prompts (each other prompt set
    apart), fit its first-stage model, and write both into its metadata. Returns the main
    set's held-out metrics."""
    test_sets = held_out_by_prompt_set(dataset, split.test)
    test_set = test_sets.pop("")
    llms = metadata["llms"]
    report_llms = [*eval_llms, *(llm for llm in FIRST_STAGE_EXTRA_LLMS if llm in llms)]
    runtime = ArtifactRuntime(directory)
    held_out = held_out_metrics(runtime, test_set, report_llms)
    metadata["held_out_test"] = held_out
    if test_sets:
        # Reported apart: the main set's numbers stay comparable with earlier artifacts.
        metadata["held_out_test_other_prompt_sets"] = {
            name: held_out_metrics(runtime, subset, answering(subset), by_source=True)
            for name, subset in test_sets.items()
        }
    metadata["first_stage"] = write_first_stage(
        dataset, split, [*eval_llms, metadata["default_llm"]], directory
    )
    if score_fp32:
        fp32 = ArtifactRuntime(directory, model_file=FP32_MODEL_FILE)
        metadata["held_out_test_fp32"] = held_out_metrics(fp32, test_set, eval_llms)
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return held_out


def write_first_stage(
    dataset: LengthDataset, split: Split, heads: Sequence[str], directory: Path
) -> dict[str, Any]:
    """Fit the scheduler's first-stage model (hashed n-gram ridge) on the split's training and
    dev prompts for ``heads`` (plus the served model's, when its labels are in the data),
    write it into the artifact ``directory`` and score it on the held-out test prompts."""
    heads = list(dict.fromkeys(heads))
    heads += [llm for llm in FIRST_STAGE_EXTRA_LLMS if llm in dataset.lengths and llm not in heads]
    fitted_on = dataset.subset(split.train + split.dev)
    model = fit_first_stage(
        [prompt.text for prompt in fitted_on.prompts],
        np.log1p(fitted_on.length_matrix(heads)),
        heads,
    )
    digest = hashlib.sha256(model.weights.astype(np.float16).tobytes()).hexdigest()[:12]
    model.version = f"first-stage-{digest}"
    model.save(directory / FIRST_STAGE_FILE)
    test_set = held_out_by_prompt_set(dataset, split.test)[""]
    held_out = {}
    for llm in heads:
        answered = test_set.lengths_for(llm)
        prompts = [prompt for prompt in test_set.prompts if prompt.prompt_id in answered]
        if len(prompts) < 2:
            continue
        metrics = score(
            [model.predict(prompt.text, llm) for prompt in prompts],
            [answered[prompt.prompt_id] for prompt in prompts],
        )
        held_out[llm] = metrics.as_dict()
    return {
        "file": FIRST_STAGE_FILE,
        "version": model.version,
        "heads": model.heads,
        "trained_on_prompts": len(fitted_on.prompts),
        "held_out_test": held_out,
    }


def add_first_stage(
    data_dir: Path, directory: Path, label_dirs: Sequence[Path] = ()
) -> dict[str, Any]:
    """Fit and write the first-stage model into an existing artifact (its metadata too)."""
    dataset = training_data(data_dir, label_dirs)
    metadata = json.loads((directory / METADATA_FILE).read_text())
    heads = [*EVAL_LLMS, metadata["default_llm"]]
    heads = [llm for llm in heads if llm in dataset.lengths]
    metadata["first_stage"] = write_first_stage(dataset, split_dataset(dataset), heads, directory)
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata["first_stage"]


def held_out_by_prompt_set(
    dataset: LengthDataset, test_ids: Sequence[PromptId]
) -> dict[str, LengthDataset]:
    """The held-out prompts of each prompt set ('' the main one, always present)."""
    held = set(test_ids)
    ids = {"": [], **ids_by_prompt_set(p for p in dataset.prompts if p.prompt_id in held)}
    return {name: dataset.subset(chosen) for name, chosen in ids.items()}


def answering(dataset: LengthDataset) -> list[str]:
    """The LLMs with lengths for at least two of ``dataset``'s prompts (a tau needs two)."""
    return [llm for llm in dataset.llms if len(dataset.lengths_for(llm)) >= 2]


def held_out_metrics(
    runtime: ArtifactRuntime,
    test_set: LengthDataset,
    llms: Sequence[str],
    by_source: bool = False,
) -> dict[str, dict[str, Any]]:
    """Each LLM's held-out metrics and prompt length's tau; with ``by_source`` also both taus
    per prompt source."""
    held_out: dict[str, dict[str, Any]] = {}
    for llm in llms:
        groups, _ = evaluate_by_source(runtime, test_set, llm, progress=False)
        metrics, baseline = groups.pop(ALL_SOURCES)
        held_out[llm] = {**metrics.as_dict(), "prompt_length_tau": baseline.kendall_tau}
        if by_source:
            held_out[llm]["by_source"] = {
                source: {"kendall_tau": model.kendall_tau, "prompt_length_tau": length.kendall_tau}
                for source, (model, length) in groups.items()
            }
    return held_out


def format_table(results: list[dict[str, Any]]) -> str:
    lines = [
        f"{'formulation':<16} {'dev tau':>8}  {'llm':<26} {'tau':>6} {'rho':>6} "
        f"{'MAE':>7} {'bucket':>6}"
    ]
    for row in results:
        for llm, metrics in row["held_out_test"].items():
            lines.append(
                f"{row['formulation']:<16} {row['best_dev_tau']:>8.4f}  {llm:<26} "
                f"{metrics['kendall_tau']:>6.3f} {metrics['spearman_rho']:>6.3f} "
                f"{metrics['mae_tokens']:>7.1f} {metrics['bucket_accuracy']:>6.3f}"
            )
    return "\n".join(lines)
