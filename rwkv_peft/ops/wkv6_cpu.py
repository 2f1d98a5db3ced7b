"""WKV-6 / WKV-5 on the compiled CPU kernel (csrc/wkv6_cpu.cpp): fp32 or bf16 in, fp32 compute, exact gradients.

Same autograd contract as WKV-7's kernels: the initial state is an input with a gradient and
the final state an output gradients can flow from (state tuning, chunked long contexts).
WKV-5 runs on the same kernel with its constant decay broadcast over batch and time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from rwkv_peft.ops.build import load_kernel
from rwkv_peft.ops.checks import check_wkv6_inputs, kernel_state, needs_grad


class WKV6CPU(torch.autograd.Function):
    """(r, w, k, v) contiguous, all fp32 or all bf16, fp32 u and s0 -> (y in their dtype, final state)."""

    @staticmethod
    def forward(ctx, r, w, k, v, u, s0, save):  # noqa: D102
        kernel = load_kernel("wkv6", "cpu")
        B, T, H, N = r.shape
        y, sT = torch.empty_like(r), torch.empty_like(s0)
        ckpt = s0.new_empty(B, H, -(-T // kernel.chunk()), N, N) if save else None
        kernel.forward(int(r.dtype == torch.bfloat16), B, T, H, N, r, w, k, v, u, s0, y, sT, ckpt)
        if save:
            ctx.save_for_backward(r, w, k, v, u, ckpt)
        return y, sT

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dsT):  # noqa: D102
        r, w, k, v, u, ckpt = ctx.saved_tensors
        B, T, H, N = r.shape
        dy, dsT = dy.to(r.dtype).contiguous(), dsT.float().contiguous()
        dr, dw, dk, dv = (torch.empty_like(x) for x in (r, w, k, v))
        du, ds0 = u.new_empty(B, H, N), torch.empty_like(dsT)
        load_kernel("wkv6", "cpu").backward(int(r.dtype == torch.bfloat16), B, T, H, N, r, w, k, v, u, dy, dsT,
                                            ckpt, dr, dw, dk, dv, du, ds0)
        return dr, dw, dk, dv, du.sum(0), ds0, None


def wkv6_cpu(xs: Sequence[torch.Tensor], u: torch.Tensor,
             state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-6 of CPU tensors r, w, k, v (fp32 or bf16, read as r's dtype, computed in fp32) and bonus u;
    returns (y in r's dtype, final fp32 state)."""
    check_wkv6_inputs(xs, u, state, "cpu")
    s0 = kernel_state("wkv6", "cpu", xs[0], state)
    ins = [x.to(xs[0].dtype).contiguous() for x in xs]
    return WKV6CPU.apply(*ins, u.float().contiguous(), s0, needs_grad(*xs, u, s0))
