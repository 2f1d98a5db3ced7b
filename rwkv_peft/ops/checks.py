"""Input validation shared by every WKV-7 op: one clear ValueError instead of a crash."""

from __future__ import annotations

import torch

NAMES = ("r", "w", "k", "v", "a", "b")


def check_wkv7_inputs(
    xs: tuple[torch.Tensor, ...],
    state: torch.Tensor | None,
    dtypes: tuple[torch.dtype, ...],
    need_contiguous: bool,
    op: str,
) -> None:
    """Check (B,T,H,N) inputs r, w, k, v, a, b and an optional fp32 (B,H,N,N) state."""
    for name, x in zip(NAMES, xs, strict=True):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"wkv7 ({op}): {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"wkv7 ({op}): {name} must be 4-D (B,T,H,N), got shape "
                             f"{tuple(x.shape)}")
    shape, dtype, device = xs[0].shape, xs[0].dtype, xs[0].device
    if 0 in shape:
        raise ValueError(f"wkv7 ({op}): empty input, r has shape {tuple(shape)}")
    for name, x in zip(NAMES, xs, strict=True):
        if x.shape != shape:
            raise ValueError(f"wkv7 ({op}): {name} has shape {tuple(x.shape)}, r has "
                             f"{tuple(shape)}; all six must match")
        if x.dtype != dtype:
            raise ValueError(f"wkv7 ({op}): {name} is {x.dtype}, r is {dtype}; all six must "
                             "share one dtype")
        if x.device != device:
            raise ValueError(f"wkv7 ({op}): {name} is on {x.device}, r on {device}")
        if need_contiguous and not x.is_contiguous():
            raise ValueError(f"wkv7 ({op}): {name} is not contiguous (call .contiguous())")
    if dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"wkv7 ({op}): inputs are {dtype}, expected one of {allowed}")
    if state is None:
        return
    B, _, H, N = shape
    if not isinstance(state, torch.Tensor):
        raise ValueError(f"wkv7 ({op}): state must be a torch.Tensor, got {type(state).__name__}")
    if tuple(state.shape) != (B, H, N, N):
        raise ValueError(f"wkv7 ({op}): state has shape {tuple(state.shape)}, expected "
                         f"(B,H,N,N) = {(B, H, N, N)}")
    if state.dtype != torch.float32:
        raise ValueError(f"wkv7 ({op}): state must be float32, got {state.dtype}")
    if state.device != device:
        raise ValueError(f"wkv7 ({op}): state is on {state.device}, inputs on {device}")
    if need_contiguous and not state.is_contiguous():
        raise ValueError(f"wkv7 ({op}): state is not contiguous (call .contiguous())")
