"""Choosing each sequence's next token from its logits: penalties, then greedy, or
temperature and top-p.

Every job has its own ``TokenChooser``: its penalty state counts only the job's own tokens
and every sampled job draws from its own ``torch.Generator`` seeded from the job's seed, so
its tokens depend on its seed, prompt and logits only, never on which other jobs share the
batch.

Penalties, applied to the logits before greedy or sampling, all over the job's ANSWER tokens
(a resumed job's already-streamed tokens included), never its prompt:
- ``repetition_penalty`` (Hugging Face's arithmetic): every token id the answer already holds
  has its logit divided by the penalty when positive, multiplied when negative. 1 is off; 0
  (unset) takes the model's default, its ``generation_config.repetition_penalty`` (1.2 for
  the built-in SmolLM2). Unlike Hugging Face ``generate`` and vLLM, the prompt does not
  count: a chat template puts the end-of-turn token (the EOS) in every prompt, so counting
  the prompt penalises ending the answer, and penalising every word of the system prompt
  and question drove SmolLM2 into endless word-association chains (3 of its first 39
  AlpacaEval answers ran to the 1024-token cap; 2 of those 3 end by themselves, at 174 and
  401 tokens, with the answer-only penalty).
- ``presence_penalty`` / ``frequency_penalty`` (as OpenAI and vLLM): subtract ``presence``
  once from every id generated at least once and ``frequency`` once per occurrence.
"""

from __future__ import annotations

import torch

from services.worker.jobs import Sampling


def make_generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    """The job's random stream; greedy jobs need none."""
    if sampling.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(sampling.seed)
    return generator


class TokenChooser:
    """One job's sampling state: its random stream and the token counts its penalties use."""

    def __init__(
        self,
        sampling: Sampling,
        answer_ids: tuple[int, ...] | list[int],
        vocab_size: int,
        device: torch.device,
        default_repetition_penalty: float = 1.0,
    ) -> None:
        self.sampling = sampling
        self.generator = make_generator(sampling, device)
        self.repetition_penalty = sampling.repetition_penalty or default_repetition_penalty
        self.presence_penalty = sampling.presence_penalty
        self.frequency_penalty = sampling.frequency_penalty
        self._seen: torch.Tensor | None = None  # ids in the answer (repetition)
        self._counts: torch.Tensor | None = None  # occurrences in the answer (OpenAI style)
        if self.repetition_penalty != 1.0:
            self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self._seen[_valid_ids(list(answer_ids), vocab_size, device)] = True
        if self.presence_penalty or self.frequency_penalty:
            self._counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            ids = _valid_ids(list(answer_ids), vocab_size, device)
            self._counts.index_add_(0, ids, torch.ones(len(ids), device=device))

    @property
    def penalised(self) -> bool:
        return self._seen is not None or self._counts is not None

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """This job's logits (vocab,) with its penalties applied (a new tensor)."""
        logits = logits.float()
        if self._seen is not None:
            penalty = self.repetition_penalty
            scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(self._seen[: logits.shape[0]], scaled, logits)
        if self._counts is not None:
            counts = self._counts[: logits.shape[0]]
            logits = logits - self.frequency_penalty * counts
            logits = logits - self.presence_penalty * (counts > 0).float()
        return logits

    def observe(self, token_id: int) -> None:
        """Count a token this job generated."""
        if self._seen is not None and 0 <= token_id < self._seen.shape[0]:
            self._seen[token_id] = True
        if self._counts is not None and 0 <= token_id < self._counts.shape[0]:
            self._counts[token_id] += 1


def next_tokens(logits: torch.Tensor, choosers: list[TokenChooser]) -> list[int]:
    """One token per row of ``logits`` (batch, vocab), each row by its own job's rules; each
    chooser then records the token it chose (only once every row has one, so a call that
    raises changes no job's penalty state and may be retried)."""
    chosen = logits.argmax(dim=-1).tolist()
    for row, chooser in enumerate(choosers):
        if chooser.penalised or chooser.generator is not None:
            row_logits = chooser.adjust(logits[row]) if chooser.penalised else logits[row]
            if chooser.generator is not None:
                chosen[row] = _sample_row(row_logits, chooser.sampling, chooser.generator)
            else:
                chosen[row] = int(row_logits.argmax())
    for chooser, token in zip(choosers, chosen, strict=False):
        chooser.observe(token)
    return chosen


def _valid_ids(ids: list[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([i for i in ids if 0 <= i < vocab_size], dtype=torch.long, device=device)


def _sample_row(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    # Shifted so the top logit is 0 before dividing: a tiny temperature (1e-45) then drives
    # the others to -inf (probability 0), the greedy limit, instead of overflowing to inf-inf
    # = nan, which made torch.multinomial raise.
    shifted = logits.float() - logits.float().max()
    probs = torch.softmax(shifted / sampling.temperature, dim=-1)
    if 0 < sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p; the top token always stays.
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())
