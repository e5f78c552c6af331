"""A chat job's conversation -> the model's input ids, through the model's own chat template.

The scheduler hands a chat job over as its turns (system, user, assistant, ...); only the
worker knows which model it runs, so only it can render them the way that model was tuned.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

Turn = tuple[str, str]  # (role, content)


def render_conversation(tokenizer: Any, turns: tuple[Turn, ...]) -> str:
    """The prompt text the model reads: its chat template with the assistant's turn opened,
    or, for a model without a template, a plain "role: content" transcript."""
    messages = [{"role": role, "content": content} for role, content in turns]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(f"{role}: {content}\n" for role, content in turns) + "assistant:"


def encode_conversation(tokenizer: Any, turns: tuple[Turn, ...]) -> list[int]:
    """Input ids of ``turns`` as the model reads them (see render_conversation)."""
    if log.isEnabledFor(logging.DEBUG):  # it holds the users' words: debug level only
        log.debug("rendered chat prompt", extra={"prompt": render_conversation(tokenizer, turns)})
    if getattr(tokenizer, "chat_template", None):
        # As LoadedModel.encode_prompt does for a single user turn.
        encoded = tokenizer.apply_chat_template(
            [{"role": role, "content": content} for role, content in turns],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )
        return list(encoded["input_ids"])
    return list(tokenizer(render_conversation(tokenizer, turns))["input_ids"])
