"""The first-stage length estimate: a linear model on hashed word n-grams, in microseconds.

The scheduler scores a job with it the moment the job is submitted, so that no job waits for
the proxy model (services/predictor) before it is queued; the proxy model's prediction then
re-scores the job while it is still queued (services/scheduler/prediction.py). Trained by
``ssjf train-predictor`` beside the proxy model and shipped in the same artifact directory
(``first_stage.npz``); numpy only, so the scheduler loads it without ONNX Runtime or torch.

Features: lower-cased word unigrams and bigrams plus a few prompt-length buckets, hashed
(CRC-32, stable across processes, unlike Python's ``hash``) into ``dim`` columns, counts
``log1p``-damped and the row L2-normalised. One ridge regression per head on the per-LLM
normalised log length ``z`` (the proxy model's target); the ``*`` head learns the mean ``z``.
"""

from __future__ import annotations

import itertools
import math
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FIRST_STAGE_FILE = "first_stage.npz"
ALL_LLMS = "*"
DEFAULT_DIM = 1 << 14
_WORD = re.compile(r"\w+|[^\w\s]")
# Enough text for the estimate: a 100k-character prompt must not cost milliseconds here.
MAX_CHARS = 4000


def features(text: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Sparse feature row of ``text``: (column indices, values), L2-normalised."""
    words = _WORD.findall(text[:MAX_CHARS].lower())
    grams = Counter(words)
    grams.update(f"{a} {b}" for a, b in itertools.pairwise(words))
    grams[f"<len:{min(int(math.log2(1 + len(words))), 12)}>"] += 3
    counts: Counter[int] = Counter()
    for gram, count in grams.items():
        counts[zlib.crc32(gram.encode()) % dim] += count
    columns = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    values = np.log1p(np.fromiter(counts.values(), dtype=np.float32, count=len(counts)))
    values /= max(float(np.linalg.norm(values)), 1e-6)
    return columns, values


def feature_matrix(texts: Sequence[str], dim: int) -> np.ndarray:
    matrix = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        columns, values = features(text, dim)
        np.add.at(matrix[row], columns, values)
    return matrix


@dataclass
class FirstStageModel:
    heads: list[str]  # LLM names; the last is ``*`` (all LLMs)
    weights: np.ndarray  # [len(heads), dim]
    bias: np.ndarray  # [len(heads)]
    log_mean: np.ndarray  # [len(heads)]: z -> log1p(tokens)
    log_std: np.ndarray
    version: str

    def __post_init__(self) -> None:
        self._row = {head: index for index, head in enumerate(self.heads)}
        if ALL_LLMS not in self._row:
            raise ValueError("a first-stage model needs the all-LLM head '*'")

    @property
    def dim(self) -> int:
        return int(self.weights.shape[1])

    def head_for(self, llm: str) -> str:
        return llm if llm in self._row else ALL_LLMS

    def predict(self, prompt: str, llm: str) -> float:
        """Estimated output tokens of ``llm`` (its head, else the all-LLM one) for ``prompt``."""
        row = self._row[self.head_for(llm)]
        columns, values = features(prompt, self.dim)
        z = float(self.weights[row, columns] @ values) + float(self.bias[row])
        return max(1.0, math.expm1(z * float(self.log_std[row]) + float(self.log_mean[row])))

    def save(self, path: Path) -> None:
        np.savez_compressed(
            path,
            heads=np.array(self.heads),
            weights=self.weights.astype(np.float16),
            bias=self.bias.astype(np.float32),
            log_mean=self.log_mean.astype(np.float32),
            log_std=self.log_std.astype(np.float32),
            version=np.array(self.version),
        )

    @classmethod
    def load(cls, path: Path) -> FirstStageModel:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                heads=[str(head) for head in data["heads"]],
                weights=data["weights"].astype(np.float32),
                bias=data["bias"],
                log_mean=data["log_mean"],
                log_std=data["log_std"],
                version=str(data["version"]),
            )


def fit_first_stage(
    texts: Sequence[str],
    log_lengths: np.ndarray,
    heads: Sequence[str],
    *,
    dim: int = DEFAULT_DIM,
    ridge: float = 3.0,  # best mean dev tau of 0.1 / 0.3 / 1 / 3 / 10 over six LLMs
    version: str = "first-stage",
) -> FirstStageModel:
    """Ridge regression per head. ``log_lengths`` ``[len(heads), len(texts)]`` holds
    ``log1p(tokens)`` (NaN: unknown); an extra ``*`` head is fitted to the mean ``z``.

    Solved in the dual (``len(texts)`` is far below ``dim``): ``w = X^T (X X^T + r I)^-1 y``.
    """
    mean = np.nanmean(log_lengths, axis=1)
    std = np.nanstd(log_lengths, axis=1).clip(min=1e-3)
    z = (log_lengths - mean[:, None]) / std[:, None]
    mean_z = np.nanmean(z, axis=0)
    x = feature_matrix(texts, dim).astype(np.float64)
    weights = np.zeros((len(heads) + 1, dim), dtype=np.float32)
    bias = np.zeros(len(heads) + 1, dtype=np.float32)
    for row, target in enumerate([*z, mean_z]):
        known = ~np.isnan(target)
        xs, ys = x[known], target[known]
        offset = float(ys.mean())
        gram = xs @ xs.T + ridge * np.eye(len(xs))
        weights[row] = xs.T @ np.linalg.solve(gram, ys - offset)
        bias[row] = offset
    overall_mean = np.array([float(mean.mean())])
    overall_std = np.array([float(std.mean())])
    return FirstStageModel(
        heads=[*heads, ALL_LLMS],
        weights=weights,
        bias=bias,
        log_mean=np.concatenate([mean, overall_mean]).astype(np.float32),
        log_std=np.concatenate([std, overall_std]).astype(np.float32),
        version=version,
    )
