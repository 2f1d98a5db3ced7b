"""Pure-PyTorch WKV-7 recurrence: the readable reference every kernel is checked against."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rwkv_peft.ops.checks import TORCH_DTYPES, check_wkv7_inputs


def wkv7_torch(xs: Sequence[torch.Tensor], state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-7 of r, w, k, v, a, b over a sequence, autograd-differentiable, in any float dtype.

    Inputs are (B, T, H, N); ``w`` is the log-log decay of RWKV-LM's trainer, so the
    per-channel decay is ``exp(-exp(w))``. ``state`` is (B, H, N, N) fp32 indexed
    [value, key]. Per step, with S the state:

        S = S * decay_t (along keys) + (S a_t) b_t^T + v_t k_t^T,    y_t = S r_t

    Returns ``y`` in the input dtype and the final state in fp32.
    """
    check_wkv7_inputs(xs, state, TORCH_DTYPES, need_contiguous=False, op="torch")
    B, T, H, N = xs[0].shape
    dtype = xs[0].dtype
    r, w, k, v, a, b = (t.float() for t in xs)
    decay = torch.exp(-torch.exp(w))
    S = r.new_zeros(B, H, N, N) if state is None else state.float()
    ys = []
    for t in range(T):
        S = (
            S * decay[:, t, :, None, :]
            + (S @ a[:, t, :, :, None]) @ b[:, t, :, None, :]
            + v[:, t, :, :, None] @ k[:, t, :, None, :]
        )
        ys.append((S @ r[:, t, :, :, None]).squeeze(-1))
    return torch.stack(ys, dim=1).to(dtype), S
