"""WKV-7 on the compiled CPU kernel (cuda/wkv7_cpu.cpp): fp32 compute, exact gradients.

The autograd Function takes the initial state as an input and returns the final state as
an output, so gradients reach the initial state (state tuning) and a loss on the final
state backpropagates through the whole sequence (exact chunked long-context training).
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch.autograd.function import once_differentiable

from rwkv_peft.ops.build import load_cpu
from rwkv_peft.ops.checks import check_wkv7_inputs

DTYPES = (torch.float32, torch.bfloat16)


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


@functools.cache
def _lib() -> ctypes.CDLL:
    """The built kernel with its C signatures declared (ctypes would guess them wrong)."""
    lib = load_cpu()
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.wkv7_cpu_chunk.restype = i64
    lib.wkv7_cpu_forward.argtypes = [i64] * 4 + [p] * 11
    lib.wkv7_cpu_forward.restype = None
    lib.wkv7_cpu_backward.argtypes = [i64] * 4 + [p] * 17
    lib.wkv7_cpu_backward.restype = None
    return lib


class WKV7CPU(torch.autograd.Function):
    """(r, w, k, v, a, b, s0) fp32 contiguous -> (y, final state)."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, save):  # noqa: D102
        lib = _lib()
        B, T, H, N = r.shape
        y, sT = torch.empty_like(r), torch.empty_like(s0)
        decay = torch.exp(-torch.exp(w))  # vectorised here, once, instead of per kernel step
        ckpt = sa = None
        if save:
            nchunk = -(-T // lib.wkv7_cpu_chunk())
            ckpt = r.new_empty(B, H, nchunk, N, N)
            sa = r.new_empty(B, H, T, N)
        lib.wkv7_cpu_forward(B, T, H, N, *map(_ptr, (r, decay, k, v, a, b, s0, y, sT, ckpt, sa)))
        if save:
            ctx.save_for_backward(r, w, decay, k, v, a, b, ckpt, sa)
        return y, sT

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dsT):  # noqa: D102
        r, w, decay, k, v, a, b, ckpt, sa = ctx.saved_tensors
        B, T, H, N = r.shape
        dy, dsT = dy.float().contiguous(), dsT.float().contiguous()
        grads = [torch.empty_like(x) for x in (r, w, k, v, a, b)]
        ds0 = torch.empty_like(dsT)
        _lib().wkv7_cpu_backward(
            B, T, H, N, *map(_ptr, (r, decay, k, v, a, b, dy, dsT, ckpt, sa, *grads, ds0))
        )
        # grads[1] holds dL/d(decay); d(decay)/dw = -exp(w - exp(w)), finite for any w
        grads[1] = grads[1].mul_(torch.exp(w - torch.exp(w))).neg_()
        return (*grads, ds0, None)


def wkv7_cpu(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-7 on CPU tensors (fp32 or bf16, computed in fp32); returns (y, final fp32 state)."""
    xs = (r, w, k, v, a, b)
    check_wkv7_inputs(xs, state, DTYPES, need_contiguous=True, op="cpu")
    if r.device.type != "cpu":
        raise ValueError(f"wkv7 (cpu): inputs must be CPU tensors, got {r.device}")
    B, _, H, N = r.shape
    if N % 2:
        raise ValueError(f"wkv7 (cpu): head size N must be even (rows go in pairs), got {N}")
    s0 = r.new_zeros(B, H, N, N, dtype=torch.float32) if state is None else state
    save = torch.is_grad_enabled() and any(x.requires_grad for x in (*xs, s0))
    y, sT = WKV7CPU.apply(*(x.float() for x in xs), s0, save)
    return y.to(r.dtype), sT
