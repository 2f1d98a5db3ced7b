"""Rollouts: G sampled completions per prompt from the batched recurrent decoder, each token's log-prob kept.

The policy is pi(. | context) = softmax(logits / temperature): the decoder samples from it (after a
top-p cut) and records log pi of the sampled token; the trainer computes the same numbers
teacher-forced (``rwkv_peft.train.objectives.grpo.completion_logps``), in one parallel forward pass
with gradients, so the importance ratio of the first PPO epoch is 1 up to float rounding and the
trainer optimises the policy that produced the samples.

Each prompt is read once; its recurrent state is then copied to its G completions (an RNN state is
a few tensors per layer, no KV cache), which decode together one token per step until every one has
emitted the end token or ``max_new_tokens`` is reached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice

import torch
from torch import nn

from rwkv_peft.data.tokenizer import END_TOKEN
from rwkv_peft.decoder import Decoder, eval_mode


@dataclass
class Rollouts:
    """B = prompts x G completions; a prompt's G completions are consecutive rows."""

    prompts: list[list[int]]  # (B) prompt ids, each prompt repeated G times
    tokens: torch.Tensor  # (B, L) generated ids; END_TOKEN after a completion's end
    mask: torch.Tensor  # (B, L) 1.0 on generated tokens, the end token included
    logps: torch.Tensor  # (B, L) fp32 log pi(token) when it was sampled (0 where mask is 0)
    group_size: int
    texts: list[str]  # (B) each completion's text, the end token excluded ('' without a tokenizer)

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(1)

    def completion(self, b: int) -> list[int]:
        """Row ``b``'s generated ids without the end token."""
        ids = self.tokens[b, : int(self.lengths[b])].tolist()
        return ids[:-1] if ids and ids[-1] == END_TOKEN else ids


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                  rng: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of (B, V) logits from softmax(logits / temperature) cut to its top-p nucleus;
    returns (tokens (B,), their log-probs under the uncut tempered softmax (B,), fp32)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    probs = logp.exp()
    if top_p < 1:
        ranked, order = probs.sort(dim=-1, descending=True)
        ranked[ranked.cumsum(-1) - ranked >= top_p] = 0  # the mass before these already reached top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, ranked)
    # inverse CDF: the first token whose cumulative mass exceeds u ~ U[0, total); on CPU over a 65536-token
    # vocab it is about 20x faster than torch.multinomial
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=rng, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(1)


@torch.no_grad()
def rollout(model: nn.Module, prompts: Sequence[Sequence[int]], group_size: int, max_new_tokens: int,
            temperature: float = 1.0, top_p: float = 1.0, rng: torch.Generator | None = None,
            stop_early: bool = True, tokenizer=None) -> Rollouts:
    """``group_size`` sampled completions of each token-id prompt, up to ``max_new_tokens`` each.

    ``stop_early=False`` decodes all ``max_new_tokens`` steps even when every completion has ended:
    processes that gather sharded weights per forward call (ZeRO-3) must make the same calls.
    ``rng`` (on the model's device; None: torch's default generator) draws the samples.
    """
    if temperature <= 0:
        raise ValueError(f"--temperature must be > 0 for sampled rollouts, got {temperature}")
    if group_size < 1 or max_new_tokens < 1:
        raise ValueError(f"rollout: group_size {group_size} and max_new_tokens {max_new_tokens} must be >= 1")
    tokens, logps = [], []

    def pick(logits: torch.Tensor) -> list[int]:
        tok, lp = sample_tokens(logits, temperature, top_p, rng)
        tokens.append(tok)
        logps.append(lp)
        return tok.tolist()

    with eval_mode(model):
        dec = Decoder(model, tokenizer)
        dec.feed_each(prompts)
        dec.state = [[t.repeat_interleave(group_size, 0) for t in block] for block in dec.state]
        dec.logits = dec.logits.repeat_interleave(group_size, 0)
        live = torch.ones(dec.logits.shape[0], dtype=torch.bool, device=dec.logits.device)
        masks = []
        for _ in islice(dec.steps(pick), max_new_tokens):
            masks.append(live)
            live = live & (tokens[-1] != END_TOKEN)
            if stop_early and not live.any():
                break
    mask = torch.stack(masks, 1).float()
    out = Rollouts([list(p) for p in prompts for _ in range(group_size)],
                   torch.where(mask.bool(), torch.stack(tokens, 1), END_TOKEN), mask, torch.stack(logps, 1) * mask,
                   group_size, [])
    out.texts = [dec.text(out.completion(b)) if tokenizer is not None else "" for b in range(len(out.prompts))]
    return out

