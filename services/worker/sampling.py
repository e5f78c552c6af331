"""Choosing each sequence's next token from its logits: greedy, or temperature and top-p.

Every sampled job draws from its own ``torch.Generator`` seeded from the job's seed, so its
tokens depend on its seed and logits only, never on which other jobs share the batch.
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


def next_tokens(
    logits: torch.Tensor,
    samplings: list[Sampling],
    generators: list[torch.Generator | None],
) -> list[int]:
    """One token per row of ``logits`` (batch, vocab), each row by its own job's rules."""
    chosen = logits.argmax(dim=-1).tolist()
    for row, (sampling, generator) in enumerate(zip(samplings, generators, strict=True)):
        if generator is not None:
            chosen[row] = _sample_row(logits[row], sampling, generator)
    return chosen


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
