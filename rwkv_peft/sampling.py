"""How the next token is chosen: the `rwkv` package's PIPELINE sampling.

Presence/frequency penalties on the logits, then top-p and top-k on the probabilities, then the
temperature (0: greedy argmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_NO_PENALTY = set(" \t0123456789")  # tokens made only of these add no presence/frequency count

@dataclass
class Sampling:
    """How the next token is chosen (RWKV's PIPELINE_ARGS, without token bans)."""

    temperature: float = 1.0  # 0: greedy
    top_p: float = 0.3
    top_k: int = 0  # 0: off
    alpha_presence: float = 0.0  # subtracted once from every token already generated
    alpha_frequency: float = 0.0  # subtracted per (decayed) occurrence
    alpha_decay: float = 0.996  # occurrences fade by this factor per generated token
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"--top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"--top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.alpha_decay <= 1:
            raise ValueError(f"--alpha_decay must be in [0, 1], got {self.alpha_decay}")

    def rng(self) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)


def sample(logits: torch.Tensor, s: Sampling, rng: torch.Generator | None = None) -> int:
    """One token id from (V,) logits."""
    if s.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu(), dim=-1)
    if s.top_p < 1:
        ranked = probs.sort(descending=True).values
        i = int(torch.searchsorted(ranked.cumsum(0), torch.tensor([s.top_p])))
        probs[probs < ranked[min(i, len(ranked) - 1)]] = 0
    if 0 < s.top_k < len(probs):
        probs[probs < probs.topk(s.top_k).values[-1]] = 0
    if s.temperature != 1:
        probs = probs ** (1 / s.temperature)
    return int(torch.multinomial(probs, 1, generator=rng))



class Penalties:
    """PIPELINE's presence and frequency penalties over the tokens generated so far."""

    def __init__(self, s: Sampling):
        self.s = s
        self.counts: dict[int, float] = {}  # occurrences per token, fading by alpha_decay per token

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (V,) less presence + frequency * count for every token generated so far."""
        if not self.counts:
            return logits
        logits = logits.clone()
        ids = torch.tensor(list(self.counts), device=logits.device)
        counts = torch.tensor(list(self.counts.values()), device=logits.device)
        logits[ids] -= self.s.alpha_presence + counts * self.s.alpha_frequency
        return logits

    def count(self, tok: int, piece: str) -> None:
        """One more ``tok`` (of text ``piece``; only spaces and digits count nothing)."""
        if not (self.s.alpha_presence or self.s.alpha_frequency):
            return
        for k in self.counts:
            self.counts[k] *= self.s.alpha_decay
        self.counts[tok] = self.counts.get(tok, 0.0) + (0.0 if set(piece) <= _NO_PENALTY else 1.0)

