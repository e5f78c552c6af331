"""Turn the scheduler's record of finished jobs into proxy-model training data.

Every job that finishes DONE is appended to its LLM's capped Redis stream
(``ssjf:completions:{T}<llm>``, keys.py) as
(prompt, LLM, generated tokens). ``ssjf export-completions`` writes them in the shared data
format (prompts.jsonl + lengths.csv, see services/common/alpaca.py), which
``ssjf train-predictor --data DIR`` and ``ssjf eval-predictor`` read, so the proxy model can
be retrained or checked on the served LLMs' own behaviour.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from services.common.alpaca import LengthDataset, Prompt, write_dataset
from services.common.redis_store import connect
from services.scheduler.keys import LLMS_KEY, completions_key
from services.scheduler.models import FinishReason

# Replayed lengths are the benchmark's choice, not the LLM's: they would teach the proxy
# model the trace, not the model.
_NOT_LLM_BEHAVIOUR = {FinishReason.REPLAY_LENGTH.value}
_READ_BATCH = 1_000


@dataclass(frozen=True)
class ExportSummary:
    completions_read: int
    completions_used: int
    prompts: int
    llms: int


async def export_completions(redis_url: str, out_dir: Path) -> ExportSummary:
    """Write every usable completion of the completions streams to ``out_dir``.

    Identical prompts become one prompt; an LLM that answered one prompt several times is
    given the median of its lengths.
    """
    redis = connect(redis_url)
    answers: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    read = used = 0
    try:
        for llm in sorted(await redis.smembers(LLMS_KEY)):  # one stream per LLM queue
            last_id = "-"
            while True:
                entries = await redis.xrange(completions_key(llm), min=last_id, count=_READ_BATCH)
                if last_id != "-":
                    entries = entries[1:]  # XRANGE's start is inclusive
                if not entries:
                    break
                for entry_id, fields in entries:
                    last_id = entry_id
                    read += 1
                    if fields.get("finish_reason") in _NOT_LLM_BEHAVIOUR:
                        continue
                    tokens = int(fields["generated_tokens"])
                    answers[fields["prompt"]][fields["llm"]].append(tokens)
                    used += 1
    finally:
        await redis.aclose()
    prompts = [Prompt(prompt_id, text) for prompt_id, text in enumerate(answers)]
    lengths: dict[str, dict[int, int]] = defaultdict(dict)
    for prompt in prompts:
        for llm, tokens in answers[prompt.text].items():
            lengths[llm][prompt.prompt_id] = round(statistics.median(tokens))
    write_dataset(LengthDataset(prompts, dict(lengths)), out_dir)
    return ExportSummary(read, used, len(prompts), len(lengths))
