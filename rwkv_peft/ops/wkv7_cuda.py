"""WKV-7 on the CUDA kernel (csrc/wkv7_cuda.cu): bf16/fp32 inputs, fp32 state, any T.

Same autograd contract as the CPU kernel: the initial state is an input with a gradient,
the final state an output that gradients can flow from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from rwkv_peft.ops.build import load_kernel
from rwkv_peft.ops.checks import KERNEL_DTYPES, check_wkv7_inputs, kernel_state, needs_grad


class WKV7CUDA(torch.autograd.Function):
    """(r, w, k, v, a, b, s0) contiguous CUDA tensors -> (y, final fp32 state)."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, save):  # noqa: D102
        B, T, H, N = r.shape
        kernel = load_kernel("wkv7", "cuda", N)
        y, sT = torch.empty_like(r), torch.empty_like(s0)
        ckpt = sa = None
        if save:
            nchunk = -(-T // kernel.chunk())
            ckpt = s0.new_empty(B, H, nchunk, N, N)
            sa = s0.new_empty(B, H, T, N)
        kernel.forward(int(r.dtype == torch.bfloat16), B, T, H, r, w, k, v, a, b, s0, y, sT, ckpt, sa)
        if save:
            ctx.save_for_backward(r, w, k, v, a, b, ckpt, sa)
        return y, sT

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dsT):  # noqa: D102
        r, w, k, v, a, b, ckpt, sa = ctx.saved_tensors
        B, T, H, N = r.shape
        kernel = load_kernel("wkv7", "cuda", N)
        dy, dsT = dy.to(r.dtype).contiguous(), dsT.float().contiguous()
        grads = [torch.empty_like(x) for x in (r, w, k, v, a, b)]
        ds0 = torch.empty_like(dsT)
        hist = dsT.new_empty(B * H * kernel.chunk() * N * N)
        kernel.backward(int(r.dtype == torch.bfloat16), B, T, H, r, w, k, v, a, b, dy, dsT, ckpt, sa, hist,
                        *grads, ds0)
        return (*grads, ds0, None)


def wkv7_cuda(xs: Sequence[torch.Tensor], state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-7 of CUDA tensors r, w, k, v, a, b (bf16 or fp32); returns (y in the input dtype, final fp32 state)."""
    check_wkv7_inputs(xs, state, KERNEL_DTYPES, need_contiguous=True, op="cuda")
    s0 = kernel_state("wkv7", "cuda", xs[0], state)
    return WKV7CUDA.apply(*xs, s0, needs_grad(*xs, s0))
