"""Pure-PyTorch WKV-6 recurrence (RWKV-6 "Finch"): the readable reference kernels are checked against."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rwkv_peft.ops.checks import check_wkv6_inputs


def wkv6_torch(
    xs: Sequence[torch.Tensor], u: torch.Tensor, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-6 of r, w, k, v and the bonus u over a sequence, autograd-differentiable.

    ``r, w, k, v`` are (B, T, H, N); ``w`` is the log-log decay, so the per-key-channel
    decay at step t is ``exp(-exp(w_t))`` (data dependent in RWKV-6). ``u`` (H, N) is the
    bonus ``time_faaaa`` for the current token. ``state`` is (B, H, N, N) fp32 indexed
    [value, key]. Per step, with S the state before the token:

        y_t = S r_t + v_t (sum_j r_tj u_j k_tj),     S = S * decay_t (along keys) + v_t k_t^T

    Returns ``y`` in the input dtype and the final state in fp32.
    """
    check_wkv6_inputs(xs, u, state, "torch")
    B, T, H, N = xs[0].shape
    dtype = xs[0].dtype
    r, w, k, v, u = (t.float() for t in (*xs, u))
    decay = torch.exp(-torch.exp(w))
    S = r.new_zeros(B, H, N, N) if state is None else state.float()
    ys = []
    for t in range(T):
        ys.append((S @ r[:, t, :, :, None]).squeeze(-1))
        S = S * decay[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
    bonus = (r * u * k).sum(-1, keepdim=True) * v  # the current token, weighted by u instead of decayed
    return (torch.stack(ys, dim=1) + bonus).to(dtype), S
