"""The ranges of the repetition, presence and frequency penalties, checked once for both the
scheduler (at Submit) and the worker (its own jobs), so both reject the same values."""

from __future__ import annotations

import math

from services.common.errors import InvalidArgument

# HF / vLLM style: logits of tokens already seen are divided (when positive) or multiplied
# (when negative) by this; 1 is off, > 1 discourages repeats. 0 means the server's default.
MAX_REPETITION_PENALTY = 10.0
# OpenAI style: subtracted from the logits once per token seen (presence) or once per
# occurrence (frequency); OpenAI accepts [-2, 2].
PENALTY_RANGE = (-2.0, 2.0)


def check_penalties(repetition: float, presence: float, frequency: float) -> None:
    """Raise InvalidArgument, naming the field, for a value outside its range (or NaN/inf)."""
    if not math.isfinite(repetition) or not 0 <= repetition <= MAX_REPETITION_PENALTY:
        raise InvalidArgument(
            f"sampling.repetition_penalty must be within (0, {MAX_REPETITION_PENALTY:g}] "
            f"(1 is off, 0 is the server default), got {repetition}"
        )
    low, high = PENALTY_RANGE
    for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if not math.isfinite(value) or not low <= value <= high:
            raise InvalidArgument(
                f"sampling.{name} must be within [{low:g}, {high:g}] (0 is off), got {value}"
            )
