"""Leave-one-source-out: how the proxy model and the first-stage model generalise to prompts
from a source they never saw.

alpaca_eval's 805 prompts come from five sources (selfinstruct, oasst, koala, helpful_base,
vicuna). For each source: train on the other four (90% train, 10% dev for epoch selection,
split by prompt, seed 0), test on every prompt of the held-out source. Reported per LLM as
Kendall's tau, beside the in-distribution number of the same configuration.

``python -m services.predictor.loso [--data DIR] [--epochs 3] [--trainable-layers 2] ...``
prints a table and writes ``bench/results/predictor_loso.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.common.alpaca import default_data_dir, prompt_set_of, split_by_prompt
from services.common.first_stage import fit_first_stage
from services.common.paths import CHECKOUT_ROOT, default_labels, label_dirs
from services.predictor.bench import run_record, write_result
from services.predictor.pipeline import training_data
from services.predictor.training import EVAL_LLMS, Split, TrainConfig, Trainer, known_tau

REPORT_LLMS = (*EVAL_LLMS[:3], "smollm2-135m-instruct")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(default_data_dir() or ""))
    parser.add_argument(
        "--labels",
        default=default_labels(),
        help="comma-separated collect directories: more heads, or another prompt set that "
        "stays in training in every fold (as train-predictor)",
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--trainable-layers", type=int, default=2)
    parser.add_argument("--encoder-layers", type=int, default=6)
    parser.add_argument("--max-prompt-tokens", type=int, default=128)
    parser.add_argument("--formulation", default="regression-mse")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", default=str(CHECKOUT_ROOT / "bench" / "results" / "predictor_loso.json")
    )
    args = parser.parse_args(argv)
    dataset = training_data(Path(args.data), label_dirs(args.labels))
    llms = [llm for llm in REPORT_LLMS if llm in dataset.lengths]
    # The folds are the main set's sources (alpaca_eval's five); another prompt set's prompts
    # (--labels) stay in every fold's training.
    main_set = [prompt for prompt in dataset.prompts if not prompt_set_of(prompt)]
    sources = sorted({str(prompt.extra.get("source", "")) for prompt in main_set})
    config = TrainConfig(
        formulation=args.formulation,
        epochs=args.epochs,
        trainable_layers=args.trainable_layers,
        encoder_layers=args.encoder_layers,
        max_prompt_tokens=args.max_prompt_tokens,
        threads=args.threads,
    )
    result: dict[str, Any] = {
        **run_record("services.predictor.loso", argv),
        "config": vars(args),
        "folds": {},
    }
    lower = None
    for source in sources:
        started = time.monotonic()
        held = [p.prompt_id for p in main_set if p.extra.get("source") == source]
        held_ids = set(held)
        rest = [pid for pid in dataset.prompt_ids if pid not in held_ids]
        train_ids, dev_ids = split_by_prompt(rest, (0.9, 0.1), seed=0)
        trainer = Trainer(dataset, config, lower, split=Split(train_ids, dev_ids, held))
        lower = trainer.lower
        model = trainer.train()
        test = dataset.subset(held)
        texts = [prompt.text for prompt in test.prompts]
        predicted = trainer.predict_z(model, texts)
        true = test.length_matrix(llms)
        fitted = dataset.subset(train_ids + dev_ids)
        first = fit_first_stage(
            [prompt.text for prompt in fitted.prompts], np.log1p(fitted.length_matrix(llms)), llms
        )
        fold: dict[str, Any] = {"test_prompts": len(held), "minutes": 0.0, "tau": {}}
        for row, llm in enumerate(llms):
            column = trainer.llms.index(llm) if llm in trainer.llms else None
            fold["tau"][llm] = {
                "proxy_model": None if column is None else known_tau(predicted[column], true[row]),
                "first_stage": known_tau(
                    np.array([first.predict(text, llm) for text in texts]), true[row]
                ),
                "labelled": int((~np.isnan(true[row])).sum()),
            }
        fold["minutes"] = (time.monotonic() - started) / 60
        result["folds"][source] = fold
        print(f"{source}: {json.dumps(fold['tau'])}", flush=True)
    result["load_average_1m_at_end"] = os.getloadavg()[0]
    print(f"\n{'held-out source':<14}{'n':>5}" + "".join(f"{llm[:22]:>25}" for llm in llms))
    for source, fold in result["folds"].items():
        cells = ""
        for llm in llms:
            entry = fold["tau"][llm]
            proxy, first = entry["proxy_model"], entry["first_stage"]
            text = f"{proxy:.3f}" if proxy is not None else "-"
            text += f" / {first:.3f}" if first is not None else " / -"
            cells += f"{text:>25}"
        print(f"{source:<14}{fold['test_prompts']:>5}{cells}")
    print("(each cell: proxy model / first stage, Kendall's tau on the held-out source)")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
