"""WKV-6 / WKV-5 on the CUDA kernel (csrc/wkv6_cuda.cu): bf16/fp32 inputs, fp32 bonus and state, any T.

Same autograd contract as the CPU kernel: the initial state is an input with a gradient, the
final state an output that gradients can flow from. WKV-5 broadcasts its constant decay.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from rwkv_peft.ops.build import load_kernel
from rwkv_peft.ops.checks import check_wkv6_inputs, kernel_state, needs_grad


class WKV6CUDA(torch.autograd.Function):
    """(r, w, k, v) contiguous CUDA tensors, fp32 u and s0 -> (y, final fp32 state)."""

    @staticmethod
    def forward(ctx, r, w, k, v, u, s0, save):  # noqa: D102
        B, T, H, N = r.shape
        kernel = load_kernel("wkv6", "cuda", N)
        y, sT = torch.empty_like(r), torch.empty_like(s0)
        ckpt = s0.new_empty(B, H, -(-T // kernel.chunk()), N, N) if save else None
        kernel.forward(int(r.dtype == torch.bfloat16), B, T, H, r, w, k, v, u, s0, y, sT, ckpt)
        if save:
            ctx.save_for_backward(r, w, k, v, u, ckpt)
        return y, sT

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dsT):  # noqa: D102
        r, w, k, v, u, ckpt = ctx.saved_tensors
        B, T, H, N = r.shape
        kernel = load_kernel("wkv6", "cuda", N)
        dy, dsT = dy.to(r.dtype).contiguous(), dsT.float().contiguous()
        dr, dw, dk, dv = (torch.empty_like(x) for x in (r, w, k, v))
        du, ds0 = dsT.new_empty(B, H, N), torch.empty_like(dsT)
        hist = dsT.new_empty(B * H * kernel.chunk() * N * N)
        kernel.backward(int(r.dtype == torch.bfloat16), B, T, H, r, w, k, v, u, dy, dsT, ckpt, hist,
                        dr, dw, dk, dv, du, ds0)
        return dr, dw, dk, dv, du.sum(0), ds0, None


def wkv6_cuda(xs: Sequence[torch.Tensor], u: torch.Tensor,
              state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-6 of CUDA tensors r, w, k, v (bf16 or fp32) and bonus u; returns (y in the input dtype, final fp32 state)."""
    check_wkv6_inputs(xs, u, state, "cuda")
    s0 = kernel_state("wkv6", "cuda", xs[0], state)
    ins = tuple(x.to(xs[0].dtype).contiguous() for x in xs)  # the kernel reads one dtype
    return WKV6CUDA.apply(*ins, u.float().contiguous(), s0, needs_grad(*xs, u, s0))

