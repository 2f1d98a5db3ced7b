"""Input validation shared by every WKV op: one clear ValueError instead of a crash."""

from __future__ import annotations

import torch

NAMES = ("r", "w", "k", "v", "a", "b")
KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what the compiled kernels read
TORCH_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # the reference: any float


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


def check_wkv6_inputs(
    xs: tuple[torch.Tensor, ...], u: torch.Tensor, state: torch.Tensor | None, op: str
) -> None:
    """One clear ValueError for bad (B,T,H,N) r, w, k, v, bonus u (H,N) or fp32 (B,H,N,N) state."""
    shape = xs[0].shape if isinstance(xs[0], torch.Tensor) else None
    for name, x in zip(("r", "w", "k", "v"), xs, strict=True):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape != shape or 0 in x.shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"wkv6 ({op}): {name} must be a non-empty 4-D (B,T,H,N) tensor shaped like r, got {got}")
        if x.dtype not in KERNEL_DTYPES or x.device != xs[0].device:
            raise ValueError(f"wkv6 ({op}): {name} is {x.dtype} on {x.device}; expected float32 or "
                             f"bfloat16 on r's device ({xs[0].device})")
    B, _, H, N = shape
    if not isinstance(u, torch.Tensor) or tuple(u.shape) != (H, N):
        got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
        raise ValueError(f"wkv6 ({op}): u must be (H,N) = {(H, N)}, got {got}")
    if state is not None and (not isinstance(state, torch.Tensor) or tuple(state.shape) != (B, H, N, N)
                              or state.dtype != torch.float32 or state.device != xs[0].device):
        got = (tuple(state.shape), state.dtype) if isinstance(state, torch.Tensor) else type(state).__name__
        raise ValueError(f"wkv6 ({op}): state must be float32 (B,H,N,N) = {(B, H, N, N)} on r's device, got {got}")


def kernel_state(family: str, device: str, r: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
    """The initial state a compiled kernel gets (zeros for None), after checking the inputs suit that kernel."""
    if r.device.type != device:
        raise ValueError(f"{family} ({device}): inputs must be {device.upper()} tensors, got {r.device}")
    B, _, H, N = r.shape
    if device == "cuda" and B > 65535:
        raise ValueError(f"{family} (cuda): batch size {B} exceeds the grid limit 65535")
    return r.new_zeros(B, H, N, N, dtype=torch.float32) if state is None else state.contiguous()


def needs_grad(*xs: torch.Tensor) -> bool:
    """Whether a kernel must save what backward needs."""
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)
