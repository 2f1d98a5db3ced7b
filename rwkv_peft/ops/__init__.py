"""WKV dispatch: one entry point per recurrence, backed by cuda | cpu | torch implementations."""

from __future__ import annotations

import torch

from rwkv_peft.ops.wkv7_torch import wkv7_torch

OPS = ("auto", "cuda", "cpu", "torch")


def wkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
    op: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-7 of (B, T, H, N) inputs; returns (y, final fp32 state). See ``wkv7_torch``."""
    if op not in OPS:
        raise ValueError(f"--op: expected one of {'|'.join(OPS)}, got {op!r}")
    return wkv7_torch(r, w, k, v, a, b, state)
