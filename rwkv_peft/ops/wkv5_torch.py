"""Pure-PyTorch WKV-5 recurrence (RWKV-5.2 "Eagle"): WKV-6 with a decay that does not depend on the data."""

from __future__ import annotations

import torch

from rwkv_peft.ops.wkv6_torch import wkv6_torch


def wkv5_torch(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-5 of (B, T, H, N) ``r, k, v`` with a per-head, per-key-channel decay ``w`` (H, N).

    ``w`` is the checkpoint's ``time_decay`` (decay ``exp(-exp(w))``, the same at every step),
    ``u`` (H, N) the bonus ``time_faaaa``; ``state`` (B, H, N, N) fp32, [value, key].
    The recurrence is exactly WKV-6's with ``w`` broadcast over batch and time.
    """
    return wkv6_torch(r, w.expand_as(r), k, v, u, state)
