"""WKV-7 on the compiled CPU kernel (csrc/wkv7_cpu.cpp): fp32 or bf16 in, fp32 compute, exact gradients.

The autograd Function takes the initial state as an input and returns the final state as
an output, so gradients reach the initial state (state tuning) and a loss on the final
state backpropagates through the whole sequence (exact chunked long-context training).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from rwkv_peft.ops.build import load_kernel
from rwkv_peft.ops.checks import KERNEL_DTYPES, check_wkv7_inputs, kernel_state, needs_grad


class WKV7CPU(torch.autograd.Function):
    """(r, w, k, v, a, b) contiguous, all fp32 or all bf16, and an fp32 s0 -> (y in their dtype, final state)."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, save):  # noqa: D102
        kernel = load_kernel("wkv7", "cpu")
        B, T, H, N = r.shape
        y, sT = torch.empty_like(r), torch.empty_like(s0)
        decay = torch.exp(-torch.exp(w.float()))  # fp32 (near 1 bf16 cannot hold it); vectorised, once
        ckpt = sa = None
        if save:
            nchunk = -(-T // kernel.chunk())
            ckpt = s0.new_empty(B, H, nchunk, N, N)
            sa = s0.new_empty(B, H, T, N)
        kernel.forward(int(r.dtype == torch.bfloat16), B, T, H, N, r, decay, k, v, a, b, s0, y, sT, ckpt, sa)
        if save:
            ctx.save_for_backward(r, w, decay, k, v, a, b, ckpt, sa)
        return y, sT

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dsT):  # noqa: D102
        r, w, decay, k, v, a, b, ckpt, sa = ctx.saved_tensors
        B, T, H, N = r.shape
        dy, dsT = dy.to(r.dtype).contiguous(), dsT.float().contiguous()
        dr, dk, dv, da, db = (torch.empty_like(x) for x in (r, k, v, a, b))
        dd, ds0 = torch.empty_like(decay), torch.empty_like(dsT)
        load_kernel("wkv7", "cpu").backward(int(r.dtype == torch.bfloat16), B, T, H, N, r, decay, k, v, a, b, dy,
                                            dsT, ckpt, sa, dr, dd, dk, dv, da, db, ds0)
        # dd holds dL/d(decay); d(decay)/dw = -exp(w - exp(w)), finite for any w
        wf = w.float()
        dw = dd.mul_(torch.exp(wf - torch.exp(wf))).neg_().to(w.dtype)
        return dr, dw, dk, dv, da, db, ds0, None


def wkv7_cpu(xs: Sequence[torch.Tensor], state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-7 of CPU tensors r, w, k, v, a, b (fp32 or bf16, read as they are, computed in fp32); returns
    (y in their dtype, final fp32 state)."""
    check_wkv7_inputs(xs, state, KERNEL_DTYPES, need_contiguous=True, op="cpu")
    s0 = kernel_state("wkv7", "cpu", xs[0], state)
    if xs[0].shape[-1] % 2:
        raise ValueError(f"wkv7 (cpu): head size N must be even (rows go in pairs), got {xs[0].shape[-1]}")
    return WKV7CPU.apply(*xs, s0, needs_grad(*xs, s0))
