"""The real-generation workload: the served LLM answers each prompt itself, to EOS.

No replay: every request is greedy with the serving defaults (``max_new_tokens`` 1024, the
model's repetition penalty), so each answer ends where the model ends it. Greedy decoding is
deterministic, so the length ``ssjf collect`` recorded for a prompt under the same settings
is that request's exact length: it is the oracle SJF's score and the ``true_output_tokens``
of every result. The prompts and lengths come from a greedy ``ssjf collect`` directory
(``outputs.jsonl``), e.g. ``data/smollm2-135m-instruct/alpaca_eval-greedy``.
"""

from __future__ import annotations

import json
from pathlib import Path

from services.bench.workload import PromptLength
from services.common.alpaca import load_dataset
from services.common.paths import SERVED_MODEL_LABELS

REAL_MODEL = "smollm2-135m-instruct"
# The labels' cap (data/smollm2-135m-instruct/label.sh and the worker's default).
REAL_MAX_NEW_TOKENS = 1024
DEFAULT_LABELS = SERVED_MODEL_LABELS


def load_greedy_lengths(directory: Path) -> tuple[list[PromptLength], str]:
    """Prompts answered in a greedy collect directory, with their greedy answer lengths.

    Only the predictor's held-out test prompts (its own split, by prompt) are used, so the
    proxy model never trained on a benchmark prompt; answers cut at the cap are left out:
    their length is the cap's, not the model's."""
    from services.predictor.training import split_dataset

    outputs = directory / "outputs.jsonl"
    if not outputs.exists():
        raise FileNotFoundError(
            f"{outputs} is missing: label prompts first with ssjf collect (greedy), see "
            "data/smollm2-135m-instruct/README.md"
        )
    labelled = load_dataset(directory)
    held_out = set(split_dataset(labelled).test)
    texts = {prompt.prompt_id: prompt.text for prompt in labelled.prompts}
    items = []
    with outputs.open() as lines:
        for line in lines:
            if not line.strip():
                continue
            record = json.loads(line)
            settings = record.get("settings", {})
            if settings.get("temperature", 0.0) != 0.0:
                raise ValueError(f"{directory} was sampled, not greedy: no exact oracle")
            if record["finish_reason"] == "eos" and record["prompt_id"] in held_out:
                items.append(
                    PromptLength(
                        record["prompt_id"], texts[record["prompt_id"]], record["output_tokens"]
                    )
                )
    if not items:
        raise ValueError(f"{directory}: no EOS-terminated greedy answers yet")
    items.sort(key=lambda item: item.prompt_id)
    return items, f"{directory} (greedy {REAL_MODEL} lengths, {len(items)} held-out prompts)"
