"""WKV dispatch: one entry point per recurrence, backed by cuda | cpu | torch implementations."""

from __future__ import annotations

import torch

from rwkv_peft.ops.wkv5_torch import wkv5_torch
from rwkv_peft.ops.wkv6_torch import wkv6_torch
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


def wkv6(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
    op: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-6 of (B, T, H, N) inputs and bonus u (H, N); returns (y, final fp32 state). See ``wkv6_torch``."""
    if op not in OPS:
        raise ValueError(f"--op: expected one of {'|'.join(OPS)}, got {op!r}")
    return wkv6_torch(r, w, k, v, u, state)


def wkv5(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
    op: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-5: (B, T, H, N) r, k, v with a constant decay w and bonus u (H, N). See ``wkv5_torch``."""
    if op not in OPS:
        raise ValueError(f"--op: expected one of {'|'.join(OPS)}, got {op!r}")
    return wkv5_torch(r, w, k, v, u, state)
