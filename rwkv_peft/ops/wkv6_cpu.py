"""WKV-6 / WKV-5 on the compiled CPU kernel (cuda/wkv6_cpu.cpp): fp32 compute, exact gradients.

Same autograd contract as WKV-7's kernels: the initial state is an input with a gradient and
the final state an output gradients can flow from (state tuning, chunked long contexts).
WKV-5 runs on the same kernel with its constant decay broadcast over batch and time.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch.autograd.function import once_differentiable

from rwkv_peft.ops.build import CPU_FLAGS, _load

DTYPES = (torch.float32, torch.bfloat16)


def check_wkv6_inputs(
    xs: tuple[torch.Tensor, ...], u: torch.Tensor, state: torch.Tensor | None, op: str
) -> None:
    """One clear ValueError for bad (B,T,H,N) r, w, k, v, bonus u (H,N) or fp32 (B,H,N,N) state."""
    shape = xs[0].shape if isinstance(xs[0], torch.Tensor) else None
    for name, x in zip(("r", "w", "k", "v"), xs, strict=True):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape != shape or 0 in x.shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"wkv6 ({op}): {name} must be a non-empty 4-D (B,T,H,N) tensor shaped like r, got {got}")
        if x.dtype not in DTYPES or x.device != xs[0].device:
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


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


@functools.cache
def _lib() -> ctypes.CDLL:
    """The built kernel with its C signatures declared (ctypes would guess them wrong)."""
    lib = _load("rwkv_peft_wkv6_cpu", ("wkv6_cpu.cpp",), CPU_FLAGS)
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.wkv6_cpu_chunk.restype = i64
    lib.wkv6_cpu_forward.argtypes = [i64] * 4 + [p] * 9
    lib.wkv6_cpu_forward.restype = None
    lib.wkv6_cpu_backward.argtypes = [i64] * 4 + [p] * 14
    lib.wkv6_cpu_backward.restype = None
    return lib


class WKV6CPU(torch.autograd.Function):
    """(r, w, k, v, u, s0) fp32 contiguous -> (y, final state)."""

    @staticmethod
    def forward(ctx, r, w, k, v, u, s0, save):  # noqa: D102
        lib = _lib()
        B, T, H, N = r.shape
        y, sT = torch.empty_like(r), torch.empty_like(s0)
        ckpt = r.new_empty(B, H, -(-T // lib.wkv6_cpu_chunk()), N, N) if save else None
        lib.wkv6_cpu_forward(B, T, H, N, *map(_ptr, (r, w, k, v, u, s0, y, sT, ckpt)))
        if save:
            ctx.save_for_backward(r, w, k, v, u, ckpt)
        return y, sT

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dsT):  # noqa: D102
        r, w, k, v, u, ckpt = ctx.saved_tensors
        B, T, H, N = r.shape
        dy, dsT = dy.float().contiguous(), dsT.float().contiguous()
        dr, dw, dk, dv = (torch.empty_like(x) for x in (r, w, k, v))
        du, ds0 = r.new_empty(B, H, N), torch.empty_like(dsT)
        _lib().wkv6_cpu_backward(B, T, H, N, *map(_ptr, (r, w, k, v, u, dy, dsT, ckpt, dr, dw, dk, dv, du, ds0)))
        return dr, dw, dk, dv, du.sum(0), ds0, None


def wkv6_cpu(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-6 on CPU tensors (fp32 or bf16, computed in fp32); returns (y, final fp32 state)."""
    check_wkv6_inputs((r, w, k, v), u, state, "cpu")
    if r.device.type != "cpu":
        raise ValueError(f"wkv6 (cpu): inputs must be CPU tensors, got {r.device}")
    B, _, H, N = r.shape
    s0 = r.new_zeros(B, H, N, N, dtype=torch.float32) if state is None else state.contiguous()
    xs = tuple(x.float().contiguous() for x in (r, w, k, v, u))
    save = torch.is_grad_enabled() and any(x.requires_grad for x in (r, w, k, v, u, s0))
    y, sT = WKV6CPU.apply(*xs, s0, save)
    return y.to(r.dtype), sT

