"""WKV-6 / WKV-5 on the CUDA kernel (cuda/wkv6_cuda.cu): bf16/fp32 inputs, fp32 bonus and state, any T.

Same autograd contract as the CPU kernel: the initial state is an input with a gradient, the
final state an output that gradients can flow from. WKV-5 broadcasts its constant decay.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch.autograd.function import once_differentiable

from rwkv_peft.ops.build import CUDA_FLAGS, _load
from rwkv_peft.ops.wkv6_cpu import check_wkv6_inputs


@functools.cache
def cuda_lib(head_size: int) -> ctypes.CDLL:
    """The kernel built for ``head_size`` with its C signatures declared."""
    if head_size % 16 or not 16 <= head_size <= 256:
        raise ValueError(f"wkv6 cuda: head size must be a multiple of 16 in [16, 256], got {head_size}")
    define = f"-DWKV_N={head_size}"
    lib = _load(f"rwkv_peft_wkv6_cuda_n{head_size}", ("wkv6_cuda.cu",), (), CUDA_FLAGS + (define,),
                headers=("wkv6_cuda_kernels.cuh",))
    i32, p = ctypes.c_int, ctypes.c_void_p
    lib.wkv6_cuda_head_size.restype = i32
    lib.wkv6_cuda_chunk.restype = i32
    lib.wkv6_cuda_error_string.argtypes = [i32]
    lib.wkv6_cuda_error_string.restype = ctypes.c_char_p
    lib.wkv6_cuda_forward.argtypes = [i32] * 4 + [p] * 10
    lib.wkv6_cuda_forward.restype = i32
    lib.wkv6_cuda_backward.argtypes = [i32] * 4 + [p] * 16
    lib.wkv6_cuda_backward.restype = i32
    if lib.wkv6_cuda_head_size() != head_size:
        raise RuntimeError(f"wkv6 cuda: library built for head size {lib.wkv6_cuda_head_size()}, wanted {head_size}")
    return lib


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def _check(lib: ctypes.CDLL, code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"wkv6 cuda: {what} kernel launch failed: {lib.wkv6_cuda_error_string(code).decode()}")


def _stream() -> ctypes.c_void_p:
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


class WKV6CUDA(torch.autograd.Function):
    """(r, w, k, v) contiguous CUDA tensors, fp32 u and s0 -> (y, final fp32 state)."""

    @staticmethod
    def forward(ctx, r, w, k, v, u, s0, save):  # noqa: D102
        B, T, H, N = r.shape
        lib = cuda_lib(N)
        y, sT = torch.empty_like(r), torch.empty_like(s0)
        ckpt = s0.new_empty(B, H, -(-T // lib.wkv6_cuda_chunk()), N, N) if save else None
        with torch.cuda.device(r.device):
            code = lib.wkv6_cuda_forward(int(r.dtype == torch.bfloat16), B, T, H,
                                         *map(_ptr, (r, w, k, v, u, s0, y, sT, ckpt)), _stream())
        _check(lib, code, "forward")
        if save:
            ctx.save_for_backward(r, w, k, v, u, ckpt)
        return y, sT

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dsT):  # noqa: D102
        r, w, k, v, u, ckpt = ctx.saved_tensors
        B, T, H, N = r.shape
        lib = cuda_lib(N)
        dy, dsT = dy.to(r.dtype).contiguous(), dsT.float().contiguous()
        dr, dw, dk, dv = (torch.empty_like(x) for x in (r, w, k, v))
        du, ds0 = dsT.new_empty(B, H, N), torch.empty_like(dsT)
        hist = dsT.new_empty(B * H * lib.wkv6_cuda_chunk() * N * N)
        with torch.cuda.device(r.device):
            code = lib.wkv6_cuda_backward(
                int(r.dtype == torch.bfloat16), B, T, H,
                *map(_ptr, (r, w, k, v, u, dy, dsT, ckpt, hist, dr, dw, dk, dv, du, ds0)), _stream(),
            )
        _check(lib, code, "backward")
        return dr, dw, dk, dv, du.sum(0), ds0, None


def wkv6_cuda(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-6 on CUDA tensors (bf16 or fp32); returns (y in the input dtype, final fp32 state)."""
    check_wkv6_inputs((r, w, k, v), u, state, "cuda")
    if not r.is_cuda:
        raise ValueError(f"wkv6 (cuda): inputs must be CUDA tensors, got {r.device}")
    B, T, H, N = r.shape
    if B > 65535:
        raise ValueError(f"wkv6 (cuda): batch size {B} exceeds the grid limit 65535")
    s0 = r.new_zeros(B, H, N, N, dtype=torch.float32) if state is None else state.contiguous()
    xs = tuple(x.to(r.dtype).contiguous() for x in (r, w, k, v))  # the kernel reads one dtype
    save = torch.is_grad_enabled() and any(x.requires_grad for x in (r, w, k, v, u, s0))
    y, sT = WKV6CUDA.apply(*xs, u.float().contiguous(), s0, save)
    return y, sT

