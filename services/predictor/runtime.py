"""Running an exported artifact with ONNX Runtime: prompts in, predicted tokens per LLM out.

Plain domain code: no gRPC, no asyncio. The service wraps it in a micro-batcher; ``ssjf
predict`` without ``--server``, ``ssjf eval-predictor`` and the benchmark call it directly.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.errors import InvalidArgument
from services.predictor.export import METADATA_FILE, MODEL_FILE, TOKENIZER_FILE
from services.predictor.model import ALL_LLMS
from services.predictor.tokenization import PromptTemplate, PromptTokenizer

log = logging.getLogger(__name__)

DEFAULT_ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "default"
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
PADDING_SLACK = 1.5  # at most 1.5x the real tokens (plus a little) computed per model call


@dataclass(frozen=True)
class Prediction:
    tokens: float
    llm: str  # the head that answered: the requested LLM, or "*" (all-LLM head)


def available_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it (onnxruntime-gpu), then CPU."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    return [provider for provider in PREFERRED_PROVIDERS if provider in available]


def similar_length_chunks(lengths: Sequence[int], slack: float = PADDING_SLACK) -> list[list[int]]:
    """Indices grouped so that each group, padded to its longest row, computes at most
    ``slack`` times its real tokens (plus one short row's worth).

    One 256-token prompt in a batch of 32 short ones would otherwise make the model compute
    32 x 256 positions; an extra ONNX Runtime call costs far less than that padding.
    """
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    chunks: list[list[int]] = []
    current: list[int] = []
    real = 0
    for index in order:  # ascending: the newest row is the chunk's longest
        length = lengths[index]
        if current and (len(current) + 1) * length > slack * (real + length) + 32:
            chunks.append(current)
            current, real = [], 0
        current.append(index)
        real += length
    if current:
        chunks.append(current)
    return chunks


class ArtifactRuntime:
    """One loaded artifact: an ONNX Runtime session, its tokenizer and its metadata."""

    def __init__(
        self,
        artifact: Path = DEFAULT_ARTIFACT,
        *,
        intra_op_threads: int | None = None,
        providers: Sequence[str] | None = None,
        model_file: str = MODEL_FILE,
    ) -> None:
        import onnxruntime as ort

        artifact = Path(artifact)
        if not (artifact / model_file).exists():
            raise FileNotFoundError(f"no {model_file} in {artifact}: run `make predictor`")
        self.artifact = artifact
        self.metadata = json.loads((artifact / METADATA_FILE).read_text())
        self.version: str = self.metadata["version"]
        self.llms: list[str] = list(self.metadata["llms"])
        self.default_llm: str = self.metadata["default_llm"]
        self.formulation: str = self.metadata["formulation"]
        self.max_prompt_tokens: int = int(self.metadata["max_prompt_tokens"])
        self._column = {llm: index for index, llm in enumerate(self.llms)}
        self._column[ALL_LLMS] = len(self.llms)
        template = self.metadata.get("prompt_template")  # absent: MiniLM's [CLS] ... [SEP]
        self.tokenizer = PromptTokenizer(
            artifact / TOKENIZER_FILE,
            self.max_prompt_tokens,
            PromptTemplate.from_dict(template) if template else None,
        )
        options = ort.SessionOptions()
        # One process per core budget: the batcher runs one batch at a time, so ORT may use
        # every core for it; more threads than cores only adds contention.
        options.intra_op_num_threads = intra_op_threads or min(os.cpu_count() or 1, 4)
        options.inter_op_num_threads = 1
        # Idle ORT threads otherwise spin for a while after each batch, burning the CPU that
        # workers on the same machine need; a batch's few-ms start-up is the cheaper cost.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(artifact / model_file),
            sess_options=options,
            providers=list(providers or available_providers()),
        )
        self.execution_provider: str = self.session.get_providers()[0]
        log.info(
            "predictor model loaded",
            extra={
                "version": self.version,
                "llms": len(self.llms),
                "provider": self.execution_provider,
            },
        )

    def resolve_llm(self, llm: str) -> str:
        """The head for ``llm``: its own, the default LLM's when empty, else the all-LLM one."""
        if not llm:
            return self.default_llm
        return llm if llm in self._column else ALL_LLMS

    def column(self, head: str) -> int:
        """Column of ``head`` (an LLM of the artifact, or ``*``) in :meth:`predict_all`."""
        return self._column[head]

    def predict_all(self, prompts: Sequence[str]) -> np.ndarray:
        """Predicted tokens ``[len(prompts), len(llms) + 1]`` (last column: all-LLM head)."""
        for prompt in prompts:
            if not prompt:
                raise InvalidArgument("prompt is empty: send the prompt text to predict for")
        rows = self.tokenizer.token_ids(prompts)
        tokens = np.empty((len(rows), len(self.llms) + 1), dtype=np.float32)
        for chunk in similar_length_chunks([len(row) for row in rows]):
            input_ids, attention_mask = self.tokenizer.pad([rows[index] for index in chunk])
            (tokens[chunk],) = self.session.run(
                None, {"input_ids": input_ids, "attention_mask": attention_mask}
            )
        return tokens

    def predict(self, prompts: Sequence[str], llms: Sequence[str]) -> list[Prediction]:
        """One prediction per (prompt, LLM) pair; each LLM resolved by :meth:`resolve_llm`."""
        heads = [self.resolve_llm(llm) for llm in llms]
        tokens = self.predict_all(prompts)
        return [
            Prediction(float(row[self._column[head]]), head)
            for row, head in zip(tokens, heads, strict=True)
        ]

    def warm_up(self) -> None:
        """Run short and long shapes once, so the first real request pays no allocation."""
        for batch in (1, 8):
            self.predict_all(["warm up " * (self.max_prompt_tokens // 2)] * batch)
            self.predict_all(["warm up"] * batch)
