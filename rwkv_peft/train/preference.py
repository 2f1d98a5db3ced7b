"""The preference losses, from per-sequence log-probs of the completions: DPO (cDPO, IPO), ORPO, SimPO.

Inputs are the summed log-probs of the completion tokens (chosen and rejected, one per pair) and
their token counts; each function returns the per-pair losses and the implicit rewards, and
``pair_metrics`` turns them into the logged numbers. The formulas, with c / r for chosen / rejected,
``logp`` summed over completion tokens, ``avg`` = logp / tokens (as TRL computes them):

- DPO (Rafailov et al. 2023): z = (logp_c - ref_c) - (logp_r - ref_r);
  loss = -(1 - ls) log sigmoid(beta z) - ls log sigmoid(-beta z) (ls = label smoothing: conservative
  DPO, Mitchell 2023); rewards beta (logp - ref).
- IPO (Azar et al. 2023): the same z from per-token averages, loss = (z - 1 / (2 beta))^2.
- ORPO (Hong et al. 2024): odds(y) = p / (1 - p) with p = exp(avg);
  loss = -avg_c - beta log sigmoid(log odds_c - log odds_r) (the NLL term is averaged per pair, so a
  batch split over processes gives the same loss); rewards beta avg. Reference-free.
- SimPO (Meng et al. 2024): loss = -(1 - ls) log sigmoid(beta (avg_c - avg_r) - gamma) - ls log
  sigmoid(-(...)); rewards beta avg. Reference-free.

Reward accuracy counts a pair whose chosen reward beats the rejected one; a tie counts one half
(TRL counts it as wrong), so a policy still equal to its reference scores 0.5, a coin's score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rwkv_peft.train.logps import sequence_logps

OBJECTIVES = ("dpo", "orpo", "simpo")
DPO_LOSSES = ("sigmoid", "ipo")
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0}  # TRL's DPO / ORPO defaults, SimPO's paper


@dataclass(frozen=True)
class Pairs:
    """Per-pair log-probs (summed over completion tokens) and completion token counts, shape (B,)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    n_chosen: torch.Tensor
    n_rejected: torch.Tensor

    @classmethod
    def split(cls, logps: torch.Tensor, counts: torch.Tensor) -> Pairs:
        """From a batch laid out as [chosen of every pair, then rejected of every pair] (2B,)."""
        c, r = logps.chunk(2)
        nc, nr = counts.to(logps.dtype).clamp(min=1).chunk(2)
        return cls(c, r, nc, nr)

    @property
    def avg_chosen(self) -> torch.Tensor:
        return self.chosen / self.n_chosen

    @property
    def avg_rejected(self) -> torch.Tensor:
        return self.rejected / self.n_rejected


@dataclass(frozen=True)
class PreferenceLoss:
    """One objective's settings: ``beta`` (DPO's beta, ORPO's lambda, SimPO's beta), label smoothing
    (DPO, SimPO), DPO's loss type (sigmoid | ipo) and SimPO's target margin gamma."""

    objective: str
    beta: float
    label_smoothing: float = 0.0
    dpo_loss: str = "sigmoid"
    gamma: float = 0.5

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective: expected one of {'|'.join(OBJECTIVES)}, got {self.objective!r}")
        if not self.beta > 0:
            raise ValueError(f"--beta: expected > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing: expected a number in [0, 0.5), got {self.label_smoothing}")
        if self.dpo_loss not in DPO_LOSSES:
            raise ValueError(f"--dpo_loss: expected one of {'|'.join(DPO_LOSSES)}, got {self.dpo_loss!r}")

    @property
    def needs_reference(self) -> bool:
        return self.objective == "dpo"

    def __call__(self, policy: Pairs, ref: Pairs | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss per pair, chosen rewards, rejected rewards), each (B,)."""
        if self.objective == "dpo":
            return dpo(policy, ref, self.beta, self.label_smoothing, self.dpo_loss)
        if self.objective == "orpo":
            return orpo(policy, self.beta)
        return simpo(policy, self.beta, self.gamma, self.label_smoothing)


def _smoothed(z: torch.Tensor, ls: float) -> torch.Tensor:
    """-(1 - ls) log sigmoid(z) - ls log sigmoid(-z)."""
    return -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)


def dpo(policy: Pairs, ref: Pairs, beta: float, label_smoothing: float = 0.0,
        loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if loss_type == "ipo":
        dc = policy.avg_chosen - ref.chosen / policy.n_chosen
        dr = policy.avg_rejected - ref.rejected / policy.n_rejected
        losses = (dc - dr - 1 / (2 * beta)) ** 2
    else:
        dc, dr = policy.chosen - ref.chosen, policy.rejected - ref.rejected
        losses = _smoothed(beta * (dc - dr), label_smoothing)
    return losses, beta * dc.detach(), beta * dr.detach()


def log_odds(avg: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(avg), avg <= 0; -expm1 keeps 1 - p exact near p = 1."""
    return avg - torch.log(-torch.expm1(avg))


def orpo(policy: Pairs, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c, r = policy.avg_chosen, policy.avg_rejected
    losses = -c - beta * F.logsigmoid(log_odds(c) - log_odds(r))
    return losses, beta * c.detach(), beta * r.detach()


def simpo(policy: Pairs, beta: float, gamma: float,
          label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c, r = policy.avg_chosen, policy.avg_rejected
    losses = _smoothed(beta * (c - r) - gamma, label_smoothing)
    return losses, beta * c.detach(), beta * r.detach()


def reward_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 if the chosen reward is higher, 1/2 on a tie, 0 otherwise."""
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()


def pair_metrics(losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
                 policy: Pairs) -> dict[str, torch.Tensor]:
    """The logged means over the pairs (TRL's names): loss, rewards, accuracy, margin, log-probs."""
    return {
        "loss": losses.detach().mean(),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": reward_accuracy(chosen, rejected).mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": policy.chosen.detach().mean(),
        "logps/rejected": policy.rejected.detach().mean(),
    }


def batch_objective(loss: PreferenceLoss, mask: torch.Tensor, ref: Pairs | None = None):
    """The mean loss over the pairs as a function of the policy's token log-probs of a [chosen; rejected]
    batch (2B, T) under its completion ``mask`` (what ``logps.logp_loss`` differentiates)."""
    counts = mask.sum(-1)
    return lambda token_logps: loss(Pairs.split(sequence_logps(token_logps, mask), counts), ref)[0].mean()
