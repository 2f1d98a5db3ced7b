"""WKV-7 on the CUDA kernel (cuda/wkv7_cuda.cu): bf16/fp32 inputs, fp32 state, any T.

Same autograd contract as the CPU kernel: the initial state is an input with a gradient,
the final state an output that gradients can flow from.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch.autograd.function import once_differentiable

from rwkv_peft.ops.build import load_cuda
from rwkv_peft.ops.checks import check_wkv7_inputs

DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def cuda_lib(head_size: int) -> ctypes.CDLL:
    """The kernel built for ``head_size`` with its C signatures declared."""
    lib = load_cuda(head_size)
    i32, p = ctypes.c_int, ctypes.c_void_p
    lib.wkv7_cuda_head_size.restype = i32
    lib.wkv7_cuda_chunk.restype = i32
    lib.wkv7_cuda_error_string.argtypes = [i32]
    lib.wkv7_cuda_error_string.restype = ctypes.c_char_p
    lib.wkv7_cuda_forward.argtypes = [i32] * 4 + [p] * 12
    lib.wkv7_cuda_forward.restype = i32
    lib.wkv7_cuda_backward.argtypes = [i32] * 4 + [p] * 19
    lib.wkv7_cuda_backward.restype = i32
    if lib.wkv7_cuda_head_size() != head_size:
        raise RuntimeError(f"wkv7 cuda: library built for head size {lib.wkv7_cuda_head_size()}, "
                           f"wanted {head_size}")
    return lib


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _check(lib: ctypes.CDLL, code: int, what: str) -> None:
    if code != 0:
        msg = lib.wkv7_cuda_error_string(code).decode()
        raise RuntimeError(f"wkv7 cuda: {what} kernel launch failed: {msg}")


class WKV7CUDA(torch.autograd.Function):
    """(r, w, k, v, a, b, s0) contiguous CUDA tensors -> (y, final fp32 state)."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, save):  # noqa: D102
        B, T, H, N = r.shape
        lib = cuda_lib(N)
        y, sT = torch.empty_like(r), torch.empty_like(s0)
        ckpt = sa = None
        if save:
            nchunk = -(-T // lib.wkv7_cuda_chunk())
            ckpt = s0.new_empty(B, H, nchunk, N, N)
            sa = s0.new_empty(B, H, T, N)
        with torch.cuda.device(r.device):
            stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
            code = lib.wkv7_cuda_forward(
                int(r.dtype == torch.bfloat16), B, T, H,
                *map(_ptr, (r, w, k, v, a, b, s0, y, sT, ckpt, sa)), stream,
            )
        _check(lib, code, "forward")
        if save:
            ctx.save_for_backward(r, w, k, v, a, b, ckpt, sa)
        return y, sT

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dsT):  # noqa: D102
        r, w, k, v, a, b, ckpt, sa = ctx.saved_tensors
        B, T, H, N = r.shape
        lib = cuda_lib(N)
        dy, dsT = dy.to(r.dtype).contiguous(), dsT.float().contiguous()
        grads = [torch.empty_like(x) for x in (r, w, k, v, a, b)]
        ds0 = torch.empty_like(dsT)
        hist = dsT.new_empty(B * H * lib.wkv7_cuda_chunk() * N * N)
        with torch.cuda.device(r.device):
            stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
            code = lib.wkv7_cuda_backward(
                int(r.dtype == torch.bfloat16), B, T, H,
                *map(_ptr, (r, w, k, v, a, b, dy, dsT, ckpt, sa, hist, *grads, ds0)), stream,
            )
        _check(lib, code, "backward")
        return (*grads, ds0, None)


def wkv7_cuda(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-7 on CUDA tensors (bf16 or fp32); returns (y in the input dtype, final fp32 state)."""
    xs = (r, w, k, v, a, b)
    check_wkv7_inputs(xs, state, DTYPES, need_contiguous=True, op="cuda")
    if not r.is_cuda:
        raise ValueError(f"wkv7 (cuda): inputs must be CUDA tensors, got {r.device}")
    B, T, H, N = r.shape
    if B > 65535:
        raise ValueError(f"wkv7 (cuda): batch size {B} exceeds the grid limit 65535")
    s0 = r.new_zeros(B, H, N, N, dtype=torch.float32) if state is None else state
    save = torch.is_grad_enabled() and any(x.requires_grad for x in (*xs, s0))
    return WKV7CUDA.apply(*xs, s0, save)
