"""Token sampling settings and the distributions that target and draft sample from.

Both models' logits go through the same processing, in the order transformers applies
its logits warpers: temperature, then top-k, then top-p (nucleus). Speculative sampling
is exact only when the draft probabilities in the acceptance test are the ones the draft
actually sampled from, so the draft uses ``distribution`` too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """Settings that choose the next token. Temperature 0 is greedy decoding."""

    temperature: float = 0.0
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p; 1 keeps all."""
    seed: int | None = None
    """Seed of the generator for one generation; None draws a fresh seed each time."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        """Return a CPU generator seeded with ``seed``, or with fresh entropy when it is None."""
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return torch.Generator().manual_seed(seed)


def distribution(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Turn float32 logits of shape (rows, vocab) into probabilities after temperature, top-k and top-p.

    Ties at the top-k boundary keep every tied token, and top-p keeps the token that
    crosses the threshold, as transformers' TopKLogitsWarper and TopPLogitsWarper do.
    """
    if sampling.greedy:
        raise ValueError("greedy decoding has no sampling distribution; use argmax")
    scores = logits / sampling.temperature
    if 0 < sampling.top_k < scores.shape[-1]:
        kth_best = torch.topk(scores, sampling.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if sampling.top_p < 1:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # Ascending order: drop the low tail whose total stays within 1 - top_p, but never
        # the most likely token.
        drop_sorted = cumulative <= 1 - sampling.top_p
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores.softmax(dim=-1)


def sample(probabilities: torch.Tensor, generator: torch.Generator) -> int:
    """Draw one token id from a probability vector of shape (vocab,)."""
    return int(torch.multinomial(probabilities, 1, generator=generator))
