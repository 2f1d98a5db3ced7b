"""DoRA (weight-decomposed low-rank adaptation): a magnitude per output row times LoRA's direction.

With V = W + s * B A (s = alpha / r, A: (r, in), B: (out, r)) and the L2 norm of each of V's rows,
i.e. over the input dimension (peft's ``DoraLinearLayer.get_weight_norm`` on an nn.Linear weight):

    W' = m / ||V||_row * V,     m: (out,), initialised to ||W||_row so W' = W at step 0.

The layer computes y = m / ||V|| * (x W^T + s x A^T B^T) and treats ||V|| as a constant in
backward (DoRA paper, section 4.3, as peft does). A zero row of V has no direction (a fresh RWKV
model's output projections are zero-initialised): its factor is 1, not 0/0, so the row is plain
LoRA until it has a norm, and forward, merge and the gradients stay finite. Merging writes W'; unmerging needs ||V||,
which a merged file does not keep: ``dora_unmerge`` takes it (the layer or caller that merged
has it), and a file merge cannot be undone from the merged file and the adapter alone.
"""

from __future__ import annotations

import torch
from torch import nn

from rwkv_peft.peft.config import Fold
from rwkv_peft.peft.lora import LoraConfig, LoraLinear, lora_delta, lora_factors

MAGNITUDE = "lora_magnitude_vector"  # peft's name for m in a saved adapter


class DoraConfig(LoraConfig):
    """DoRA settings: LoRA's (``--lora_config '{"r":8,"alpha":16}'``), without PiSSA's initialisation."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pissa:
            raise ValueError("--lora_config: pissa does not apply to --peft dora")


def dora_weight_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """||W + s B A|| of each output row (over the input dimension), fp32, shape (out,)."""
    return torch.linalg.vector_norm(weight.float() + lora_delta(lora_a, lora_b, scale), dim=1)


def dora_factor(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """m / ||V|| per output row; 1 where ||V|| = 0 (a zero row has no direction to rescale)."""
    has_norm = norm > 0
    return torch.where(has_norm, magnitude / torch.where(has_norm, norm, 1.0), 1.0)  # no 0/0, not even in backward


def dora_merge(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor,
               scale: float) -> torch.Tensor:
    """W' = m / ||W + s B A||_row * (W + s B A), in fp32."""
    return dora_merge_(weight.to(torch.float32, copy=True), lora_a, lora_b, magnitude, scale)


def dora_merge_(w: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor,
                scale: float) -> torch.Tensor:
    """``dora_merge`` into the fp32 ``w`` itself (the merge's own copy of the weight)."""
    v = w.add_(lora_delta(lora_a, lora_b, scale))
    return v.mul_(dora_factor(magnitude.float(), torch.linalg.vector_norm(v, dim=1))[:, None])


def dora_unmerge(merged: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor,
                 scale: float, weight_norm: torch.Tensor) -> torch.Tensor:
    """W from W' and the row norms ||W + s B A|| the merge divided by (``dora_weight_norm`` of the base), fp32.

    A row whose magnitude is 0 was merged to zero and cannot come back.
    """
    factor = dora_factor(magnitude.float(), weight_norm.float())
    return merged.float() / factor[:, None] - lora_delta(lora_a, lora_b, scale)


def dora_fold(weight: torch.Tensor, tensors: dict[str, torch.Tensor], config: dict, where: str,
              cfg_name: str) -> Fold:
    """Check one linear's lora_A, lora_B and magnitude against its weight; merge writes W'."""
    a, b, scale = lora_factors(weight, tensors, config, where, cfg_name, {MAGNITUDE: (weight.shape[0],)})
    if MAGNITUDE not in tensors:
        raise ValueError(f"{where}: a DoRA adapter needs .{MAGNITUDE}, found {sorted(tensors)}")
    m = tensors[MAGNITUDE]
    return Fold("dora", {"r": a.shape[0], "alpha": config["alpha"]}, lambda w: dora_merge_(w, a, b, m, scale),
                no_unmerge="DoRA rescales each row of W + sBA to its magnitude and the merged file does not keep "
                           "the norms it divided by, so the base cannot be recovered from it (keep the base file)")


class DoraLinear(LoraLinear):
    """A frozen nn.Linear weight, LoRA's ``lora_A`` / ``lora_B`` and the magnitude ``lora_magnitude_vector`` (out,)."""

    def __init__(self, base: nn.Linear, cfg: DoraConfig, name: str = "linear"):
        super().__init__(base, cfg, name)
        norm = dora_weight_norm(self.weight.detach(), self.lora_A.detach(), self.lora_B.detach(), self.scale)
        self.lora_magnitude_vector = nn.Parameter(norm.to(self.weight.dtype))

    def weight_norm(self) -> torch.Tensor:
        """||W + s B A||_row for the current A, B (a constant for autograd, as in the DoRA paper)."""
        with torch.no_grad():
            return dora_weight_norm(self.weight, self.lora_A, self.lora_B, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_off:
            return self.base_forward(x)
        return dora_factor(self.lora_magnitude_vector, self.weight_norm()).to(x.dtype) * super().forward(x)

    def merged_weight(self) -> torch.Tensor:
        m = self.lora_magnitude_vector.detach()
        return dora_merge(self.weight, self.lora_A.detach(), self.lora_B.detach(), m, self.scale).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, dora=True"
