"""WKV-7 through flash-linear-attention's Triton kernels (optional: ``pip install fla``).

fla takes the log decay ``-exp(w)`` and keeps its state as [key, value], the transpose of
ours; both are converted here so the op is a drop-in for the others.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rwkv_peft.ops.checks import KERNEL_DTYPES, check_wkv7_inputs


def wkv7_fla(xs: Sequence[torch.Tensor], state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-7 of r, w, k, v, a, b via ``fla.ops.rwkv7.chunk_rwkv7``; returns (y, final fp32 state [value, key])."""
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except ImportError as e:
        raise RuntimeError("wkv7: --op fla needs flash-linear-attention (pip install "
                           f"flash-linear-attention): {e}") from e
    check_wkv7_inputs(xs, state, KERNEL_DTYPES, need_contiguous=False, op="fla")
    r, w, k, v, a, b = xs
    h0 = None if state is None else state.transpose(-1, -2).contiguous()
    y, hT = chunk_rwkv7(r, -torch.exp(w.float()).to(r.dtype), k, v, a, b, scale=1.0,
                        initial_state=h0, output_final_state=True)
    return y, hT.float().transpose(-1, -2)
