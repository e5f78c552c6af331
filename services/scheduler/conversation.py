"""Chat jobs: validating a conversation and choosing the text the predictor reads.

The worker renders the whole conversation with its own model's chat template. The proxy
model, however, was trained on single user instructions as the user wrote them (alpaca_eval
prompts, no template, no system prompt, no earlier turns): the text closest to that is the
conversation's last user turn, the request the LLM is about to answer. It is what the
predictor scores, what the job record keeps as its prompt, and what `ssjf export-completions`
exports as training data, so the proxy model is trained on what it is later asked about.
"""

from __future__ import annotations

from services.common.errors import InvalidArgument
from services.scheduler.models import ChatMessage

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 1024


def last_user_turn(messages: tuple[ChatMessage, ...]) -> str:
    """What the predictor reads for a conversation (see the module's docstring)."""
    return next((m.content for m in reversed(messages) if m.role == "user"), "")


def validate_messages(messages: tuple[ChatMessage, ...], max_chars: int) -> None:
    """Raise InvalidArgument unless ``messages`` is a conversation a worker can answer."""
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgument(f"messages has {len(messages)} turns, more than {MAX_MESSAGES}")
    for position, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidArgument(
                f"messages[{position}].role is {message.role!r}; use one of {', '.join(ROLES)}"
            )
    if messages[-1].role != "user":
        raise InvalidArgument("the last of messages must be a user turn (the one to answer)")
    if not messages[-1].content.strip():
        raise InvalidArgument("the last user turn of messages must not be empty")
    chars = sum(len(message.content) for message in messages)
    if chars > max_chars:
        raise InvalidArgument(
            f"messages have {chars} characters, more than the {max_chars} allowed "
            "(--max-prompt-chars)"
        )
