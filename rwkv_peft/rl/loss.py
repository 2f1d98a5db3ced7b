"""GRPO's objective and the variants users ask for by name, on plain tensors.

For a prompt, G completions o_1..o_G are sampled and scored r_1..r_G. Per token t of o_i, with
ratio rho = pi(o_it) / pi_old(o_it) and advantage A_i shared by the sequence's tokens,

    l_it = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + beta * KL_it,
    KL_it = pi_ref / pi - log(pi_ref / pi) - 1          (Schulman's k3: unbiased, never negative)

and the variants differ in A and in how the l_it are averaged:

- ``grpo`` (DeepSeekMath): A_i = (r_i - mean(r)) / (std(r) + eps); the mean over each sequence's
  tokens, then over sequences (a long completion's tokens weigh less).
- ``dr_grpo`` (Dr. GRPO, "Understanding R1-Zero-Like Training"): A_i = r_i - mean(r), no std; the
  sum over all tokens divided by a constant, sequences x max_new_tokens (no length bias).
- ``dapo`` (DAPO): A as grpo; token level, the sum over all tokens divided by their number; and
  clip-higher, eps_high = 0.28 > eps_low = 0.2 by default.

std is the sample standard deviation (n - 1), as in TRL; eps = 1e-4 keeps a group of equal
rewards at A = 0 rather than 0 / 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ADV_EPS = 1e-4


@dataclass(frozen=True)
class Variant:
    """What a named loss changes: std scaling of the advantages, how tokens are averaged, default clip."""

    scale_std: bool
    average: str  # "sequence" | "constant" | "token"
    clip_high: float  # eps_high when --clip_eps_high is not given


VARIANTS = {
    "grpo": Variant(scale_std=True, average="sequence", clip_high=0.2),
    "dr_grpo": Variant(scale_std=False, average="constant", clip_high=0.2),
    "dapo": Variant(scale_std=True, average="token", clip_high=0.28),
}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"--grpo_loss {name!r}: expected one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def group_advantages(rewards: torch.Tensor, scale_std: bool = True) -> torch.Tensor:
    """Advantages of (N, G) rewards, G completions per prompt: centred per group, std-scaled if asked."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"group_advantages: expected (prompts, group_size >= 2) rewards, got {tuple(rewards.shape)}")
    rewards = rewards.double()
    adv = rewards - rewards.mean(1, keepdim=True)
    if scale_std:
        adv = adv / (rewards.std(1, keepdim=True) + ADV_EPS)
    return adv.float()


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from the sampled token's log-probs (k3: exp(d) - d - 1, d = ref - logp)."""
    d = ref_logp - logp
    return torch.expm1(d) - d


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    variant: Variant,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    max_new_tokens: int = 0,
) -> torch.Tensor:
    """The clipped surrogate with the KL term, averaged as ``variant`` says (a scalar, with gradient through logp).

    ``logp``, ``old_logp``, ``ref_logp``, ``mask``: (B, L) per completion token (mask 1 on real tokens);
    ``advantages``: (B,). ``max_new_tokens`` is Dr. GRPO's constant (default: L).
    """
    clip_high = variant.clip_high if clip_high is None else clip_high
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.dtype)[:, None]
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)
    if ref_logp is not None and kl_beta:
        per_token = per_token + kl_beta * kl_k3(logp, ref_logp)
    summed = (per_token * mask).sum(1)
    if variant.average == "sequence":
        return (summed / mask.sum(1).clamp(min=1)).mean()
    if variant.average == "constant":
        return summed.sum() / (mask.shape[0] * (max_new_tokens or mask.shape[1]))
    return summed.sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def policy_stats(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 variant: Variant, clip_low: float = 0.2, clip_high: float | None = None,
                 ref_logp: torch.Tensor | None = None) -> dict[str, float]:
    """Per completion token: the mean KL to the reference (0 without one) and the fraction whose clipped term
    was the one taken (``clip_frac``)."""
    clip_high = variant.clip_high if clip_high is None else clip_high
    mask = mask.to(logp.dtype)
    n = mask.sum().clamp(min=1)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.dtype)[:, None]
    clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
    kl = 0.0 if ref_logp is None else float((kl_k3(logp, ref_logp) * mask).sum() / n)
    return {"kl": kl, "clip_frac": float((clipped.to(mask.dtype) * mask).sum() / n)}
