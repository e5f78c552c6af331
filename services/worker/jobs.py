"""The worker's domain objects: what the engine is asked to generate and what it reports.

Plain dataclasses, free of gRPC; the gateway client translates them to and from protobuf.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from services.common.errors import InvalidArgument
from services.common.penalties import check_penalties

# Padded prompt tokens (rows x longest prompt) one prefill forward pass may hold (the
# engine's and the worker's --max-prefill-tokens default). A prefill's activations and
# attention scores grow with this product, so newcomers are prefilled in groups under it: one
# 6,000-token prompt among fifteen short ones would otherwise pad all sixteen to 6,000 for the
# pass. A prompt longer than the budget is prefilled alone.
DEFAULT_MAX_PREFILL_TOKENS = 8192

# Cached token slots (rows x the longest row's prompt + answer cap) a running batch may reach
# (the engine's and the worker's --max-batch-total-tokens default, as TGI's flag of that
# name). The left-padded KV cache is rows x longest row wide, so sixteen multi-thousand-token
# prompts with 1,024-token answer caps grow it to gigabytes: a labelling worker was
# OOM-killed at 15.7 GB that way. 32,768 slots are 1.5 GB of fp32 cache for SmolLM2-135M.
DEFAULT_MAX_BATCH_TOTAL_TOKENS = 32768


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    REPLAY_LENGTH = "replay_length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class Sampling:
    """How one job samples. ``max_new_tokens`` and ``replay_output_tokens`` count the whole
    answer, tokens streamed by an earlier attempt included."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    replay_output_tokens: int = 0
    # 0: the model's default (see services/worker/sampling.py); 1: off.
    repetition_penalty: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        check_penalties(self.repetition_penalty, self.presence_penalty, self.frequency_penalty)
        if self.temperature < 0:
            raise InvalidArgument(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 and self.replay_output_tokens < 1:
            raise InvalidArgument("max_new_tokens must be at least 1")
        if any(not stop for stop in self.stop):
            raise InvalidArgument("stop strings must not be empty")

    @property
    def answer_limit(self) -> int:
        """Tokens the whole answer may hold; replay mode fixes it exactly."""
        return self.replay_output_tokens or self.max_new_tokens

    @property
    def replay(self) -> bool:
        return self.replay_output_tokens > 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationRequest:
    """One job for the engine: prompt ids (chat template applied) and how to sample.

    ``resume_token_ids`` are answer tokens an earlier attempt already streamed: they are
    appended to the prompt and generation continues after them, at index len(resume)."""

    job_id: str
    prompt_ids: tuple[int, ...]
    sampling: Sampling
    resume_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GeneratedToken:
    index: int
    token_id: int
    text: str


@dataclass(frozen=True)
class Outcome:
    finish_reason: FinishReason
    generated_tokens: int
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    error: str = ""


@dataclass
class JobUpdate:
    """What one engine step produced for one job: new tokens, and the outcome when it ended."""

    job_id: str
    tokens: list[GeneratedToken] = field(default_factory=list)
    outcome: Outcome | None = None
