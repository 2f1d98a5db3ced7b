"""infctx: train on L tokens in chunks of C with exact gradients and the activation memory of one chunk.

A sample is cut into chunks; chunk k starts from the recurrent state that chunk k-1 ended with
(token-shift and WKV state of every block), so the forward pass is the full-context one. Each chunk
runs under a (non-reentrant) ``torch.utils.checkpoint`` that takes the incoming state as input and
returns the chunk's hidden states and its outgoing state: the autograd graph keeps only the states at
chunk boundaries, and backward recomputes one chunk at a time, sending the state gradient back into
the previous chunk. Nothing is truncated, so loss and gradients equal full-context training up to
float rounding; memory is one chunk's activations plus L / C small states and the gradient of the
head's input (B x L x C, which the chunked head computes in forward instead of any logits).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rwkv_peft.train.loss import head_loss


def infctx_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    chunk_ctx: int,
    head_chunk: int = -1,
    state: list | None = None,
) -> torch.Tensor:
    """The trainer's loss of a (B, L) sample, computed chunk by chunk; ``loss.backward()`` is exact.

    Each chunk adds its share of the masked mean cross-entropy with L2Wrap, normalised by the whole
    sample's mask total and token count, so the sum is the full-context loss. ``model`` needs
    ``forward_hidden(idx, state)``, ``forward_state(idx, state, loss)`` and ``head(hidden, loss)``.
    With the chunked head (``head_chunk`` != 0, see ``head_loss``) the head runs outside the recomputed
    part, on the chunk's hidden states, and keeps only their gradient; the plain head (0) stays inside,
    so its logits are recomputed in backward rather than kept. ``L`` need not be a multiple of
    ``chunk_ctx``: the last chunk is shorter. ``state`` is the state before the first token (None:
    zeros, or the blocks' learned ``time_state``). Chunks are recomputed in backward only when
    gradients are being recorded.
    """
    if chunk_ctx < 1:
        raise ValueError(f"--chunk_ctx: expected a positive number of tokens, got {chunk_ctx}")
    if input_ids.dim() != 2 or targets.shape != input_ids.shape:
        raise ValueError(f"infctx: input_ids and targets must be (B, L), got {input_ids.shape}, {targets.shape}")
    if mask is None:
        mask = torch.ones(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    if mask.shape != input_ids.shape:
        raise ValueError(f"infctx: mask must be (B, L) like input_ids, got {tuple(mask.shape)}")
    total, positions = mask.sum().clamp(min=1), mask.numel()
    recompute = torch.is_grad_enabled() and model.training

    def run(fn, *args):
        return checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args)

    loss = None
    for t0 in range(0, input_ids.shape[1], chunk_ctx):
        part = slice(t0, t0 + chunk_ctx)
        share = head_loss(targets[:, part], mask[:, part], total, positions, head_chunk)
        if head_chunk == 0:
            part_loss, state = run(model.forward_state, input_ids[:, part], state, share)
        else:
            hidden, state = run(model.forward_hidden, input_ids[:, part], state)
            part_loss = model.head(hidden, share)
        loss = part_loss if loss is None else loss + part_loss
    return loss
