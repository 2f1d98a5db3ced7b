"""infctx: train on L tokens in chunks of C with exact gradients and the activation memory of one chunk.

A sample is cut into chunks; chunk k starts from the recurrent state that chunk k-1 ended with
(token-shift and WKV state of every block), so the forward pass is the full-context one. Each chunk
runs under a (non-reentrant) ``torch.utils.checkpoint`` that takes the incoming state as input and
returns the chunk's summed loss and its outgoing state: the autograd graph keeps only the states at
chunk boundaries, and backward recomputes one chunk at a time, sending the state gradient back into
the previous chunk. Nothing is truncated, so loss and gradients equal full-context training up to
float rounding; memory is one chunk's activations plus L / C small states.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def masked_ce_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of mask * cross-entropy: additive over chunks, so chunking does not change it."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (ce * mask.flatten().to(ce.dtype)).sum()


def masked_mean_ce(mask: torch.Tensor) -> LossFn:
    """Chunk shares of the masked mean cross-entropy of a whole (B, L) sample with loss mask ``mask``."""
    total = mask.sum().clamp(min=1.0)
    return lambda logits, targets, m: masked_ce_sum(logits, targets, m) / total


def _chunk_loss(
    model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, state: list | None,
    loss_fn: LossFn,
) -> tuple[torch.Tensor, list]:
    logits, state = model.forward_state(idx, state)
    return loss_fn(logits, targets, mask), state


def infctx_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    chunk_ctx: int,
    loss_fn: LossFn | None = None,
    state: list | None = None,
) -> torch.Tensor:
    """The sample's loss over (B, L) tokens, computed chunk by chunk; ``loss.backward()`` is exact.

    ``model`` needs ``forward_state(idx, state) -> (logits, state)``. ``loss_fn(logits, targets, mask)``
    returns one chunk's *share* of the sample's loss and the shares are summed, so a loss that
    normalises over the whole sample must do so with whole-sample totals (see ``masked_mean_ce``,
    the default). ``L`` need not be a multiple of ``chunk_ctx``: the last chunk is shorter.
    ``state`` is the state before the first token (None: zeros, or the blocks' learned ``time_state``).
    Chunks are recomputed in backward only when gradients are being recorded.
    """
    if chunk_ctx < 1:
        raise ValueError(f"--chunk_ctx: expected a positive number of tokens, got {chunk_ctx}")
    if input_ids.dim() != 2 or targets.shape != input_ids.shape:
        raise ValueError(f"infctx: input_ids and targets must be (B, L), got {input_ids.shape}, {targets.shape}")
    if mask is None:
        mask = torch.ones(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    if mask.shape != input_ids.shape:
        raise ValueError(f"infctx: mask must be (B, L) like input_ids, got {tuple(mask.shape)}")
    loss_fn = masked_mean_ce(mask) if loss_fn is None else loss_fn
    recompute = torch.is_grad_enabled() and model.training
    total = None
    for t0 in range(0, input_ids.shape[1], chunk_ctx):
        part = slice(t0, t0 + chunk_ctx)
        args = (model, input_ids[:, part], targets[:, part], mask[:, part], state, loss_fn)
        if recompute:
            part_loss, state = checkpoint(_chunk_loss, *args, use_reentrant=False)
        else:
            part_loss, state = _chunk_loss(*args)
        total = part_loss if total is None else total + part_loss
    return total
