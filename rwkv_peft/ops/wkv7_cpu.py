"""WKV-7 on the compiled CPU kernel (csrc/wkv7_cpu.cpp): fp32 compute, exact gradients.

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
    """(r, w, k, v, a, b, s0) fp32 contiguous -> (y, final state)."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, save):  # noqa: D102
        kernel = load_kernel("wkv7", "cpu")
        B, T, H, N = r.shape
        y, sT = torch.empty_like(r), torch.empty_like(s0)
        decay = torch.exp(-torch.exp(w))  # vectorised here, once, instead of per kernel step
        ckpt = sa = None
        if save:
            nchunk = -(-T // kernel.chunk())
            ckpt = r.new_empty(B, H, nchunk, N, N)
            sa = r.new_empty(B, H, T, N)
        kernel.forward(B, T, H, N, r, decay, k, v, a, b, s0, y, sT, ckpt, sa)
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
        load_kernel("wkv7", "cpu").backward(B, T, H, N, r, decay, k, v, a, b, dy, dsT, ckpt, sa, *grads, ds0)
        # grads[1] holds dL/d(decay); d(decay)/dw = -exp(w - exp(w)), finite for any w
        grads[1] = grads[1].mul_(torch.exp(w - torch.exp(w))).neg_()
        return (*grads, ds0, None)


def wkv7_cpu(xs: Sequence[torch.Tensor], state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-7 of CPU tensors r, w, k, v, a, b (fp32 or bf16, computed in fp32); returns (y, final fp32 state)."""
    check_wkv7_inputs(xs, state, KERNEL_DTYPES, need_contiguous=True, op="cpu")
    s0 = kernel_state("wkv7", "cpu", xs[0], state)
    if xs[0].shape[-1] % 2:
        raise ValueError(f"wkv7 (cpu): head size N must be even (rows go in pairs), got {xs[0].shape[-1]}")
    y, sT = WKV7CPU.apply(*(x.float() for x in xs), s0, needs_grad(*xs, s0))
    return y.to(xs[0].dtype), sT
