"""Loading prompt/length data in the shared format, and splitting it by prompt.

The shared format (``../shared/data/alpaca_eval`` and the slices vendored into this repo) is a
directory holding two files:

- ``prompts.jsonl``: one JSON object per line with ``prompt_id`` and ``prompt`` (text);
  other keys (``source``, ``prompt_tokens``) are kept in :attr:`Prompt.extra`.
- ``lengths.csv``: header ``model,prompt_id,output_tokens[,output_chars]``: how many tokens
  ``model`` answered ``prompt_id`` with.

API:

- :func:`load_dataset(directory)` -> :class:`LengthDataset` (also
  ``load_dataset(prompts=..., lengths=...)`` for two explicit files).
- :class:`LengthDataset`: ``prompts`` (list of :class:`Prompt`, file order), ``llms`` (sorted
  model names), ``lengths_for(llm)`` -> ``{prompt_id: output_tokens}``, ``length_matrix(llms)``
  -> float array ``[len(llms), len(prompts)]`` with NaN where a model has no answer,
  ``subset(prompt_ids)`` -> a dataset restricted to those prompts.
- :func:`split_by_prompt(prompt_ids, fractions, seed)` -> one list of ids per fraction. The
  split is by prompt, never by row: every model's answer to one prompt lands on the same side.
  It depends only on the set of ids and the seed, so it is repeatable across runs and machines.
- :func:`add_prompt_set(dataset, directory)`: another prompt set's prompts and lengths (e.g.
  the served model's answers to Arena prompts), ids namespaced as ``"<set>:<id>"`` and each
  prompt tagged with its set (:func:`prompt_set_of`), so splits can be drawn per set.
- :func:`add_collected(dataset, directory)`: whichever of the two an ``ssjf collect`` directory
  is (same prompts: more lengths; other prompts: another set).
- :func:`write_dataset(dataset, directory, llms=None)`: write the shared format back (to
  vendor a slice: ``write_dataset(full.subset(ids), path, ["vicuna-13b"])``).
- :func:`default_data_dir()` -> ``../shared/data/alpaca_eval`` beside the repository, or None.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.common.paths import SHARED_DATA_DIR

PROMPTS_FILE = "prompts.jsonl"
LENGTHS_FILE = "lengths.csv"


# Prompt ids are integers (alpaca_eval) or strings (hex, UUID or text ids of other data sets).
# A decimal string in canonical form ("42") is read as the integer, so a prompts.jsonl with
# integers and a lengths.csv (always text) agree; "0042" or "0x2a" stay strings.
PromptId = int | str


def parse_prompt_id(value: object) -> PromptId:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"prompt_id must be an integer or a string, got {value!r}")
    if isinstance(value, int):
        return value
    text = value.strip()
    if not text:
        raise ValueError("prompt_id is empty")
    if text.isdecimal() and str(int(text)) == text:
        return int(text)
    return text


def _id_order(prompt_id: PromptId) -> tuple[bool, int | str]:
    """Integers first in numeric order (the split of all-integer data is unchanged), then
    strings."""
    return (isinstance(prompt_id, str), prompt_id)


@dataclass(frozen=True)
class Prompt:
    prompt_id: PromptId
    text: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class LengthDataset:
    """Prompts and, per model, the number of tokens each prompt was answered with."""

    prompts: list[Prompt]
    lengths: dict[str, dict[PromptId, int]]

    @property
    def llms(self) -> list[str]:
        return sorted(self.lengths)

    @property
    def prompt_ids(self) -> list[PromptId]:
        return [prompt.prompt_id for prompt in self.prompts]

    def lengths_for(self, llm: str) -> dict[PromptId, int]:
        if llm not in self.lengths:
            known = ", ".join(self.llms[:10])
            raise KeyError(f"no lengths for LLM {llm!r} (the data has {known}, ...)")
        return self.lengths[llm]

    def length_matrix(self, llms: Sequence[str]) -> np.ndarray:
        """Output tokens as ``[len(llms), len(prompts)]``, NaN where a model did not answer."""
        matrix = np.full((len(llms), len(self.prompts)), np.nan, dtype=np.float64)
        for row, llm in enumerate(llms):
            answered = self.lengths_for(llm)
            for column, prompt in enumerate(self.prompts):
                tokens = answered.get(prompt.prompt_id)
                if tokens is not None:
                    matrix[row, column] = tokens
        return matrix

    def subset(self, prompt_ids: Iterable[PromptId]) -> LengthDataset:
        keep = set(prompt_ids)
        return LengthDataset(
            prompts=[prompt for prompt in self.prompts if prompt.prompt_id in keep],
            lengths={
                llm: {pid: tokens for pid, tokens in answered.items() if pid in keep}
                for llm, answered in self.lengths.items()
            },
        )


def load_prompts(path: Path) -> list[Prompt]:
    prompts = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            try:
                prompt_id = parse_prompt_id(record.pop("prompt_id"))
                text = str(record.pop("prompt"))
            except KeyError as missing:
                raise ValueError(f"{path}:{number}: missing key {missing}") from None
            except ValueError as bad:
                raise ValueError(f"{path}:{number}: {bad}") from None
            prompts.append(Prompt(prompt_id, text, record))
    return prompts


def load_lengths(path: Path) -> dict[str, dict[PromptId, int]]:
    lengths: dict[str, dict[PromptId, int]] = {}
    with path.open(encoding="utf-8", newline="") as rows:
        for number, row in enumerate(csv.DictReader(rows), start=2):
            try:
                prompt_id = parse_prompt_id(row["prompt_id"])
                tokens = int(row["output_tokens"])
            except (KeyError, ValueError, TypeError) as bad:
                raise ValueError(f"{path}:{number}: {bad!r}") from None
            lengths.setdefault(row["model"], {})[prompt_id] = tokens
    return lengths


def load_dataset(
    directory: Path | str | None = None,
    *,
    prompts: Path | str | None = None,
    lengths: Path | str | None = None,
) -> LengthDataset:
    """Read a shared-format directory, or an explicit prompts.jsonl + lengths.csv pair."""
    if directory is not None:
        prompts = prompts or Path(directory) / PROMPTS_FILE
        lengths = lengths or Path(directory) / LENGTHS_FILE
    if prompts is None or lengths is None:
        raise ValueError("give a data directory, or both a prompts and a lengths file")
    return LengthDataset(load_prompts(Path(prompts)), load_lengths(Path(lengths)))


def add_labels(
    dataset: LengthDataset, directory: Path | str, labels: LengthDataset | None = None
) -> LengthDataset:
    """``dataset`` plus the lengths of a shared-format directory labelling the same prompts
    (an ``ssjf collect`` run, e.g. the served model's own answers; ``labels`` when already
    loaded). Prompt ids must name the same texts: prompt sets that both count from 0 are
    refused, not silently mixed."""
    labels = labels or load_dataset(directory)
    texts = {prompt.prompt_id: prompt.text for prompt in dataset.prompts}
    for prompt in labels.prompts:
        if texts.get(prompt.prompt_id, prompt.text) != prompt.text:
            raise ValueError(
                f"{directory}: prompt {prompt.prompt_id!r} is not the same prompt as in the "
                "training data: label the training data's prompts"
            )
    lengths = dict(dataset.lengths)
    for llm, answered in labels.lengths.items():
        if llm in lengths:
            raise ValueError(f"{directory}: the data already has lengths for {llm!r}")
        lengths[llm] = {pid: tokens for pid, tokens in answered.items() if pid in texts}
    return LengthDataset(dataset.prompts, lengths)


# Prompt.extra key naming the prompt set a prompt was added from (absent: the main set).
PROMPT_SET_KEY = "prompt_set"


def prompt_set_of(prompt: Prompt) -> str:
    """The set ``prompt`` came from: '' for the main data, else :func:`add_prompt_set`'s name."""
    return str(prompt.extra.get(PROMPT_SET_KEY, ""))


def ids_by_prompt_set(prompts: Iterable[Prompt]) -> dict[str, list[PromptId]]:
    """The prompts' ids grouped by :func:`prompt_set_of`, in order ('' first when present)."""
    groups: dict[str, list[PromptId]] = {}
    for prompt in prompts:
        groups.setdefault(prompt_set_of(prompt), []).append(prompt.prompt_id)
    return groups


def add_prompt_set(
    dataset: LengthDataset, directory: Path | str, added: LengthDataset | None = None
) -> LengthDataset:
    """``dataset`` plus the prompts and lengths of another prompt set (an ``ssjf collect`` run
    over other prompts; ``added`` when already loaded). Both sets may count their ids from 0,
    so the added ids become ``"<directory name>:<id>"``; the added prompts have no lengths for
    the LLMs only the main set has (NaN in ``length_matrix``, which training skips)."""
    directory = Path(directory)
    name = directory.name
    added = added or load_dataset(directory)
    renamed = {prompt.prompt_id: f"{name}:{prompt.prompt_id}" for prompt in added.prompts}
    if set(renamed.values()) & set(dataset.prompt_ids):
        raise ValueError(f"{directory}: prompt set {name!r} is already in the data")
    prompts = [
        *dataset.prompts,
        *(
            Prompt(renamed[prompt.prompt_id], prompt.text, {**prompt.extra, PROMPT_SET_KEY: name})
            for prompt in added.prompts
        ),
    ]
    lengths = {llm: dict(answered) for llm, answered in dataset.lengths.items()}
    for llm, answered in added.lengths.items():
        lengths.setdefault(llm, {}).update(
            {renamed[pid]: tokens for pid, tokens in answered.items() if pid in renamed}
        )
    return LengthDataset(prompts, lengths)


def add_collected(dataset: LengthDataset, directory: Path | str) -> LengthDataset:
    """``dataset`` plus an ``ssjf collect`` directory: one more LLM's lengths when it labels the
    training prompts (:func:`add_labels`; prompts beyond them are dropped), more prompts when
    none of its prompts is a training prompt (:func:`add_prompt_set`); a mix is refused."""
    texts = {prompt.prompt_id: prompt.text for prompt in dataset.prompts}
    loaded = load_dataset(directory)
    collected = loaded.prompts
    same = sum(texts.get(prompt.prompt_id) == prompt.text for prompt in collected)
    clashing = sum(
        prompt.prompt_id in texts and texts[prompt.prompt_id] != prompt.text for prompt in collected
    )
    if same and not clashing:
        return add_labels(dataset, directory, loaded)
    if not same:
        if {prompt.text for prompt in collected} & set(texts.values()):
            raise ValueError(f"{directory}: its prompts are already in the data under other ids")
        return add_prompt_set(dataset, directory, loaded)
    raise ValueError(
        f"{directory}: {same} of its prompts are training prompts and {len(collected) - same} "
        "are not (or have other ids): label either the training prompts or another prompt set"
    )


def write_dataset(
    dataset: LengthDataset, directory: Path | str, llms: Sequence[str] | None = None
) -> None:
    """Write ``dataset`` (only ``llms``' lengths when given) as prompts.jsonl + lengths.csv."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / PROMPTS_FILE).open("w", encoding="utf-8") as lines:
        for prompt in dataset.prompts:
            record = {"prompt_id": prompt.prompt_id, **prompt.extra, "prompt": prompt.text}
            lines.write(json.dumps(record, ensure_ascii=False) + "\n")
    with (directory / LENGTHS_FILE).open("w", encoding="utf-8", newline="") as rows:
        writer = csv.writer(rows)
        writer.writerow(["model", "prompt_id", "output_tokens"])
        for llm in llms or dataset.llms:
            for prompt_id, tokens in sorted(
                dataset.lengths_for(llm).items(), key=lambda item: _id_order(item[0])
            ):
                writer.writerow([llm, prompt_id, tokens])


def split_by_prompt(
    prompt_ids: Iterable[PromptId], fractions: Sequence[float], seed: int = 0
) -> list[list[PromptId]]:
    """Shuffle the distinct ids with ``seed`` and cut them into parts of the given fractions.

    The last part takes the rounding remainder. Ids come back sorted within each part.
    """
    if not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must sum to 1, got {list(fractions)}")
    ids = sorted(set(prompt_ids), key=_id_order)
    random.Random(seed).shuffle(ids)
    parts, start = [], 0
    for index, fraction in enumerate(fractions):
        end = len(ids) if index == len(fractions) - 1 else start + round(fraction * len(ids))
        parts.append(sorted(ids[start:end], key=_id_order))
        start = end
    return parts


def default_data_dir() -> Path | None:
    """``../shared/data/alpaca_eval`` beside the repository when it exists (CI, dev boxes)."""
    candidate = SHARED_DATA_DIR / "alpaca_eval"
    return candidate if (candidate / PROMPTS_FILE).exists() else None
