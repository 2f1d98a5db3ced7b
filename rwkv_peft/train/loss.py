"""The training objective: masked cross-entropy of the head's logits plus RWKV-LM's L2Wrap, whole or infctx.

The vocabulary-wide logits are the largest activation of a PEFT step (B x T x V: 128 MB per 512
tokens at V = 65536 in fp32), so the default path never holds them: ``LinearCrossEntropy`` walks
the tokens in chunks, computes a chunk's logits, its log-sum-exp (fp32) and loss, and, when
gradients are wanted, the chunk's logit gradient, which it folds at once into the gradients of the
hidden states and of the head weight before freeing the chunk. The loss is a scalar, so its
gradient is known in forward up to the upstream scale: backward only multiplies by it, and no
logits are recomputed. ``head_chunk=0`` keeps the plain path (full logits, ``masked_ce_sum`` +
``L2Wrap``), which defines the result: both give the same loss and gradients up to float rounding.

``infctx_loss`` trains on L tokens in chunks of C with exact gradients and the activation memory
of one chunk. A sample is cut into chunks; chunk k starts from the recurrent state that chunk k-1 ended with
(token-shift and WKV state of every block), so the forward pass is the full-context one. Each chunk
runs under a (non-reentrant) ``torch.utils.checkpoint`` that takes the incoming state as input and
returns the chunk's hidden states and its outgoing state: the autograd graph keeps only the states at
chunk boundaries, and backward recomputes one chunk at a time, sending the state gradient back into
the previous chunk. Nothing is truncated, so loss and gradients equal full-context training up to
float rounding; memory is one chunk's activations plus L / C small states and the gradient of the
head's input (B x L x C, which the chunked head computes in forward instead of any logits).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rwkv_peft.decoder import eval_mode

HeadLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (hidden after ln_out, head weight) -> loss

L2WRAP_SCALE = 1e-4  # RWKV-LM's factor: each position's max logit gets gradient 1e-4 * max / positions
CHUNK_BYTES = 128 * 2**20  # one chunk's fp32 logits under the automatic head chunk (512 tokens at V = 65536)


def masked_ce_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of mask * cross-entropy: additive over chunks, so chunking does not change it."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (ce * mask.flatten().to(ce.dtype)).sum()


class L2Wrap(torch.autograd.Function):
    """RWKV-LM's logit regulariser: identity on the loss; in backward it pushes each position's
    largest logit towards 0 with gradient 1e-4 * max / positions, which keeps logits from drifting up."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, logits: torch.Tensor, positions: int = 0) -> torch.Tensor:
        maxx, ids = logits.detach().max(-1, keepdim=True)
        ctx.save_for_backward(maxx, ids)
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        ctx.positions = positions or maxx.numel()  # infctx: the whole sample's count, not the chunk's
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        maxx, ids = ctx.saved_tensors
        gy = torch.zeros(ctx.shape, dtype=ctx.dtype, device=maxx.device)
        gy.scatter_(-1, ids, (maxx * (L2WRAP_SCALE / ctx.positions) * grad).to(ctx.dtype))
        return grad, gy, None


class LinearCrossEntropy(torch.autograd.Function):
    """sum(mask * CE(hidden @ weight.T, targets)) / total, with L2Wrap over ``positions``, ``chunk`` tokens
    at a time. Forward keeps the gradients of hidden (B, T, C) and weight (V, C, fp32-accumulated) for
    the inputs that need one; nothing of size T x V outlives a chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                total: torch.Tensor, positions: int, chunk: int, grad_enabled: bool) -> torch.Tensor:
        # forward runs with grad mode off and needs_input_grad ignores it: the caller's mode comes in
        want_h, want_w = (grad_enabled and need for need in ctx.needs_input_grad[:2])
        h = hidden.reshape(-1, hidden.shape[-1])
        y = targets.reshape(-1, 1)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 sums for bf16/fp16 (fp64 stays fp64)
        m = mask.reshape(-1).to(acc)
        w = m / total  # each token's weight in the loss: the logit gradient's scale
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        ce_sum = torch.zeros((), dtype=acc, device=h.device)
        for s in range(0, h.shape[0], chunk):
            e = min(s + chunk, h.shape[0])
            logits = h[s:e] @ weight.t()
            maxx, ids = logits.max(-1, keepdim=True)  # the log-sum-exp's shift, and L2Wrap's max
            lf = logits.to(acc)  # fp32 log-sum-exp even for bf16 logits (the same tensor when fp32)
            picked = lf.gather(1, y[s:e])
            p = lf.sub_(maxx).exp_()  # in place: the chunk's one (n, V) fp32 buffer
            sumexp = p.sum(-1, keepdim=True)
            ce_sum += ((maxx.to(acc) + sumexp.log() - picked).squeeze(1) * m[s:e]).sum()
            if not (want_h or want_w):
                continue
            g = p.mul_(w[s:e, None] / sumexp)  # d loss / d logits = w * (softmax - onehot) + L2Wrap's term
            g.scatter_add_(1, y[s:e], -w[s:e, None])
            g = g.to(logits.dtype)
            g.scatter_add_(1, ids, (maxx * (L2WRAP_SCALE / positions)).to(g.dtype))
            if want_h:
                torch.mm(g, weight, out=grad_h[s:e])
            if want_w:
                if grad_w.dtype == g.dtype:
                    grad_w.addmm_(g.t(), h[s:e])
                else:
                    grad_w += g.t() @ h[s:e]
        ctx.save_for_backward(grad_h, grad_w)
        ctx.hidden_shape, ctx.weight_dtype = hidden.shape, weight.dtype
        return ce_sum / total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = (grad_h * grad.to(grad_h.dtype)).view(ctx.hidden_shape)
        if grad_w is not None:
            grad_w = (grad_w * grad).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def auto_head_chunk(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about ``CHUNK_BYTES``."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def head_loss(targets: torch.Tensor, mask: torch.Tensor, total: torch.Tensor | None = None,
              positions: int = 0, head_chunk: int = -1) -> HeadLoss:
    """The loss a model's head computes from (hidden, weight): sum(mask * CE) / ``total`` with L2Wrap.

    ``total`` defaults to the mask's sum (the masked mean) and ``positions`` to the number of tokens;
    infctx passes the whole sample's for each of its chunks. ``head_chunk``: tokens per chunk of the
    head (-1: ``auto_head_chunk``; 0: the plain path, full logits).
    """
    total = mask.sum().clamp(min=1) if total is None else total
    positions = positions or mask.numel()

    def loss(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if head_chunk == 0:
            logits = F.linear(hidden, weight)
            return L2Wrap.apply(masked_ce_sum(logits, targets, mask) / total, logits, positions)
        chunk = auto_head_chunk(weight.shape[0]) if head_chunk < 0 else head_chunk
        return LinearCrossEntropy.apply(hidden, weight, targets, mask, total, positions, chunk,
                                        torch.is_grad_enabled())

    return loss


def masked_loss(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                head_chunk: int = -1) -> torch.Tensor:
    """The trainer's loss of a whole (B, T) sample: masked mean cross-entropy with L2Wrap.

    ``model`` (or the DeepSpeed engine around it) takes ``(idx, loss=...)`` and applies the loss inside
    its head's call, where DeepSpeed ZeRO-3 gathers the head weight for it.
    """
    return model(input_ids, loss=head_loss(targets, mask, head_chunk=head_chunk))


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


@torch.no_grad()
def heldout_sums(
    model: nn.Module, samples: Sequence[dict[str, torch.Tensor]], batch_size: int = 8
) -> tuple[list[float], list[float]]:
    """Per sample: (sum of masked cross-entropy, number of masked tokens).

    Samples are the trainer's dicts (input_ids, targets, mask), so this is the training loss of unseen
    data; the per-sample sums let a benchmark pair two models sample by sample.
    """
    if not samples:
        raise ValueError("heldout_sums: no samples")
    sums: list[float] = []
    counts: list[float] = []
    with eval_mode(model):
        for i in range(0, len(samples), batch_size):
            batch = samples[i : i + batch_size]
            idx = torch.stack([s["input_ids"] for s in batch])
            targets = torch.stack([s["targets"] for s in batch])
            mask = torch.stack([s["mask"] for s in batch])
            keep = int(mask.nonzero()[:, 1].max()) + 1 if mask.any() else 1  # skip the all-padding tail
            hidden = model.forward_hidden(idx[:, :keep], None)[0]
            for j in range(len(batch)):  # the head + loss per sample, chunked: no (B, T, V) logits
                summed = head_loss(targets[j : j + 1, :keep], mask[j : j + 1, :keep], total=mask.new_tensor(1.0))
                sums.append(float(model.head(hidden[j : j + 1], summed)))
                counts.append(float(mask[j].sum()))
    return sums, counts


def heldout_loss(model: nn.Module, samples: Sequence[dict[str, torch.Tensor]], batch_size: int = 8) -> float:
    """Token-level mean cross-entropy over the masked (answer) tokens of ``samples``.

    Tokens are pooled over all samples (not a mean of per-sample means), so long answers weigh as
    much as they do in training.
    """
    sums, counts = heldout_sums(model, samples, batch_size)
    if sum(counts) == 0:
        raise ValueError("heldout_loss: every sample's loss mask is empty")
    return sum(sums) / sum(counts)
