"""Prompt -> token ids, the same way in training, export and serving.

Long prompts keep their head and their tail: the instruction usually opens a prompt and the
format request ("answer in one word", "write 500 words") often closes it; both predict the
answer's length better than the middle does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

# Characters kept from each end before tokenizing: bounds the cost of a huge prompt while
# leaving far more text than ``max_tokens`` word pieces need.
CHARS_PER_TOKEN_BOUND = 16


def head_and_tail(ids: Sequence[int], budget: int) -> list[int]:
    """``ids`` as they are when they fit ``budget``, else their first and last tokens (the
    head one longer when ``budget`` is odd)."""
    if len(ids) <= budget:
        return list(ids)
    head = (budget + 1) // 2
    return [*ids[:head], *ids[len(ids) - (budget - head) :]]


@dataclass(frozen=True)
class PromptTemplate:
    """What a model reads around a prompt's own tokens, and the id its padding uses: BERT's
    [CLS] ... [SEP] for MiniLM, a chat template's user turn for a served LLM's probe."""

    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    pad_id: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "prefix_ids": list(self.prefix_ids),
            "suffix_ids": list(self.suffix_ids),
            "pad_id": self.pad_id,
        }

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> PromptTemplate:
        return cls(tuple(fields["prefix_ids"]), tuple(fields["suffix_ids"]), int(fields["pad_id"]))


class PromptTokenizer:
    """A fast (Rust) tokenizer with head+tail truncation, a template and batch padding."""

    def __init__(
        self, tokenizer_file: Path, max_tokens: int, template: PromptTemplate | None = None
    ) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.template = template or PromptTemplate(
            (self._special("[CLS]"),), (self._special("[SEP]"),), self._special("[PAD]")
        )
        self.budget = max_tokens - len(self.template.prefix_ids) - len(self.template.suffix_ids)
        if self.budget < 2:
            raise ValueError(
                f"max_tokens {max_tokens} leaves fewer than 2 of the prompt's own tokens"
            )
        self.max_tokens = max_tokens
        self.pad_id = self.template.pad_id

    def _special(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no {token} token")
        return token_id

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids inside the template, at most ``max_tokens`` each (head and tail of the prompt's
        own tokens kept), unpadded."""
        char_bound = self.max_tokens * CHARS_PER_TOKEN_BOUND
        clipped = [
            text if len(text) <= 2 * char_bound else text[:char_bound] + " " + text[-char_bound:]
            for text in texts
        ]
        prefix, suffix = self.template.prefix_ids, self.template.suffix_ids
        return [
            [*prefix, *head_and_tail(encoding.ids, self.budget), *suffix]
            for encoding in self.tokenizer.encode_batch(clipped, add_special_tokens=False)
        ]

    def pad(self, rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Pad to the longest row: ``(input_ids, attention_mask)``, both int64 ``[batch, seq]``."""
        width = max(len(row) for row in rows)
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for index, row in enumerate(rows):
            input_ids[index, : len(row)] = row
            attention_mask[index, : len(row)] = 1
        return input_ids, attention_mask

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.pad(self.token_ids(texts))
