"""WKV dispatch: one entry point per recurrence, backed by cuda | cpu | fla | torch implementations.

Every backend ``rwkv_peft.ops.<family>_<op>`` exports ``<family>_<op>(xs, state)`` (WKV-6:
``(xs, u, state)``), checks its own inputs and returns (y, final fp32 state); the entry points
below pick one and hand the inputs over.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from rwkv_peft.ops.build import load_kernel

OPS = ("auto", "cuda", "cpu", "torch", "fla")


@functools.cache
def _kernel_unavailable(kind: str, head_size: int, family: str = "wkv7") -> str | None:
    """Why the ``kind`` kernel cannot be built/loaded here (None when it is ready); cached."""
    try:
        load_kernel(family, kind, head_size)
    except Exception as e:  # noqa: BLE001 - any build failure means: fall back, say why
        lines = str(e).strip().splitlines() or [""]
        return f"{type(e).__name__}: {lines[-1][:200]}"
    return None


def _backend(family: str, op: str) -> Callable:
    """``<family>_<op>`` from ``rwkv_peft.ops.<family>_<op>``, imported on first use."""
    return getattr(importlib.import_module(f"rwkv_peft.ops.{family}_{op}"), f"{family}_{op}")


def _resolve_op(op: str, x: torch.Tensor, family: str = "wkv7") -> str:
    """``auto`` -> the kernel for x's device, or the reference with a one-line warning."""
    if op not in OPS:
        raise ValueError(f"--op: expected one of {'|'.join(OPS)}, got {op!r}")
    if op != "auto":
        return op
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return "cpu"  # let the kernel's checks report the problem
    if x.dtype not in (torch.float32, torch.bfloat16):
        return "torch"  # e.g. float64 for gradcheck: only the reference computes in it
    kind = "cuda" if x.is_cuda else "cpu"
    reason = _kernel_unavailable(kind, x.shape[-1], family)
    if reason is None:
        return kind
    warnings.warn(f"{family}: {kind} kernel unavailable ({reason}); using the slow torch reference",
                  RuntimeWarning, stacklevel=3)
    return "torch"


def wkv7(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None,
         op: str = "auto") -> tuple[Tensor, Tensor]:
    """WKV-7 of (B, T, H, N) inputs; returns (y, final fp32 state). See ``wkv7_torch``.

    ``op``: ``cuda`` (GPU kernel, bf16/fp32), ``cpu`` (compiled CPU kernel, fp32 compute),
    ``torch`` (reference), ``fla`` (flash-linear-attention's Triton kernel, if installed),
    ``auto`` (the kernel for the inputs' device; the reference, with a warning, if it cannot
    be built; the reference for dtypes other than fp32/bf16). Every op takes an initial
    ``state`` with gradients and returns the final state with gradients. ``state`` may be a
    broadcast view (e.g. a learned state expanded over the batch); r..b must be contiguous
    for the kernels.
    """
    op = _resolve_op(op, r)
    if isinstance(state, torch.Tensor):
        state = state.contiguous()
    return _backend("wkv7", op)((r, w, k, v, a, b), state)


def wkv6(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor | None = None,
         op: str = "auto") -> tuple[Tensor, Tensor]:
    """WKV-6 of (B, T, H, N) inputs and bonus u (H, N); returns (y, final fp32 state). See ``wkv6_torch``.

    ``op`` as for ``wkv7`` (cuda | cpu kernels from csrc/wkv6_*, torch reference, auto); no fla.
    """
    op = _resolve_op(op, r, "wkv6")
    if op == "fla":
        raise ValueError("--op fla: flash-linear-attention is wired for WKV-7 only; use cuda, cpu or torch")
    return _backend("wkv6", op)((r, w, k, v), u, state)


def wkv5(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor | None = None,
         op: str = "auto") -> tuple[Tensor, Tensor]:
    """WKV-5 (RWKV-5.2 "Eagle"): WKV-6 with a decay that does not depend on the data.

    ``w`` (H, N) is the checkpoint's ``time_decay`` (decay ``exp(-exp(w))``, the same at every step),
    ``u`` (H, N) the bonus ``time_faaaa``. The recurrence is exactly WKV-6's with ``w`` broadcast over
    batch and time, so every op (kernels and reference) is the WKV-6 one; autograd sums dw over B and T.
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"wkv5: w must be the (H, N) time_decay, got {getattr(w, 'shape', type(w))}")
    return wkv6(r, w.expand_as(r), k, v, u, state, op)
