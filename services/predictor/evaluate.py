"""Scoring predicted lengths against true ones: the numbers the predictor is judged by."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import kendalltau, spearmanr
from tqdm import tqdm

from services.common.alpaca import LengthDataset
from services.predictor.runtime import ArtifactRuntime

# Bucket accuracy: quartiles of the true lengths of the evaluated set; a prediction is right
# when it falls in the same quartile range as the true length.
NUM_EVAL_BUCKETS = 4


@dataclass(frozen=True)
class LengthMetrics:
    n: int
    kendall_tau: float
    spearman_rho: float
    mae_tokens: float
    bucket_accuracy: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def score(predicted: Sequence[float], true: Sequence[float]) -> LengthMetrics:
    predicted_array = np.asarray(predicted, dtype=np.float64)
    true_array = np.asarray(true, dtype=np.float64)
    if len(true_array) < 2:
        raise ValueError("need at least two prompts with known lengths to score a ranking")
    quantiles = np.linspace(0, 1, NUM_EVAL_BUCKETS + 1)[1:-1]
    edges = np.quantile(true_array, quantiles)
    return LengthMetrics(
        n=len(true_array),
        kendall_tau=float(kendalltau(predicted_array, true_array).statistic),
        spearman_rho=float(spearmanr(predicted_array, true_array).statistic),
        mae_tokens=float(np.abs(predicted_array - true_array).mean()),
        bucket_accuracy=float(
            (np.searchsorted(edges, predicted_array) == np.searchsorted(edges, true_array)).mean()
        ),
    )


def predict_dataset(
    runtime: ArtifactRuntime,
    texts: Sequence[str],
    llm: str,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[np.ndarray, str]:
    """Predicted tokens for every text (length-sorted batches), and the head that answered."""
    head = runtime.resolve_llm(llm)
    column = runtime.llms.index(head) if head in runtime.llms else len(runtime.llms)
    order = sorted(range(len(texts)), key=lambda index: len(texts[index]))
    predicted = np.zeros(len(texts))
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="predict", unit="batch", leave=False, disable=not progress):
        chunk = order[start : start + batch_size]
        predicted[chunk] = runtime.predict_all([texts[index] for index in chunk])[:, column]
    return predicted, head


# The key of ``evaluate_by_source``'s result that holds every answered prompt.
ALL_SOURCES = "all"


def evaluate_by_source(
    runtime: ArtifactRuntime, dataset: LengthDataset, llm: str, progress: bool = True
) -> tuple[dict[str, tuple[LengthMetrics, LengthMetrics]], str]:
    """(model, prompt-length baseline) metrics on every answered prompt (``ALL_SOURCES``,
    first) and per prompt source (``source`` in prompts.jsonl; sources with fewer than two
    answered prompts are left out), and the head used. A head can rank the prompts within
    each source and still fail across them, or the other way round."""
    answered = dataset.lengths_for(llm)
    prompts = [prompt for prompt in dataset.prompts if prompt.prompt_id in answered]
    texts = [prompt.text for prompt in prompts]
    true = np.asarray([answered[prompt.prompt_id] for prompt in prompts], dtype=np.float64)
    predicted, head = predict_dataset(runtime, texts, llm, progress=progress)
    # The baseline a length-unaware scheduler can use for free: untruncated prompt length.
    prompt_tokens = np.asarray(
        [len(encoding.ids) for encoding in runtime.tokenizer.tokenizer.encode_batch(texts)],
        dtype=np.float64,
    )
    sources = np.asarray([str(prompt.extra.get("source", "")) for prompt in prompts])
    groups = {ALL_SOURCES: (score(predicted, true), score(prompt_tokens, true))}
    for source in sorted(set(sources) - {""}):
        chosen = sources == source
        if chosen.sum() >= 2:
            groups[source] = (
                score(predicted[chosen], true[chosen]),
                score(prompt_tokens[chosen], true[chosen]),
            )
    return groups, head
