"""Prompt -> token ids, the same way in training, export and serving.

Long prompts keep their head and their tail: the instruction usually opens a prompt and the
format request ("answer in one word", "write 500 words") often closes it; both predict the
answer's length better than the middle does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

# Characters kept from each end before tokenizing: bounds the cost of a huge prompt while
# leaving far more text than ``max_tokens`` word pieces need.
CHARS_PER_TOKEN_BOUND = 16


class PromptTokenizer:
    """The fast (Rust) WordPiece tokenizer with head+tail truncation and batch padding."""

    def __init__(self, tokenizer_file: Path, max_tokens: int) -> None:
        if max_tokens < 4:
            raise ValueError("max_tokens must be at least 4")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.max_tokens = max_tokens
        self.cls_id = self._special("[CLS]")
        self.sep_id = self._special("[SEP]")
        self.pad_id = self._special("[PAD]")

    def _special(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no {token} token")
        return token_id

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids with [CLS]/[SEP], at most ``max_tokens`` each (head and tail kept), unpadded."""
        char_bound = self.max_tokens * CHARS_PER_TOKEN_BOUND
        clipped = [
            text if len(text) <= 2 * char_bound else text[:char_bound] + " " + text[-char_bound:]
            for text in texts
        ]
        budget = self.max_tokens - 2
        head = (budget + 1) // 2
        tail = budget - head
        rows = []
        for encoding in self.tokenizer.encode_batch(clipped, add_special_tokens=False):
            ids = encoding.ids
            if len(ids) > budget:
                ids = ids[:head] + ids[len(ids) - tail :]
            rows.append([self.cls_id, *ids, self.sep_id])
        return rows

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
