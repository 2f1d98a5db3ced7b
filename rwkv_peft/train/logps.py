"""Token log-probabilities from the output head, and losses over them, without the logits of every token.

Preference objectives (DPO, ORPO, SimPO) score whole completions: log pi(y|x) is the sum of the
log-probabilities of the completion's tokens; policy-gradient objectives (GRPO) weigh each token's.
Either loss is a small function of the (B, T) token log-probs, so, as in ``loss.LinearCrossEntropy``,
the head never holds the logits of every token: ``LinearLogpLoss`` walks the tokens in chunks for the
log-probs, evaluates the loss on them, takes its gradient with respect to each token's log-prob
(B x T numbers, through autograd on that small function). Each token's log-prob gradient with respect
to its hidden state, ``(onehot - softmax) @ weight``, is computed in the first walk (as the
cross-entropy's is), so the hidden states' gradient is those rows scaled by the coefficients; only a
trained head weight needs a second walk, which recomputes a chunk's logits unless all tokens fit in
one chunk. All of it happens in forward, where DeepSpeed ZeRO-3 has the head weight gathered;
backward only scales by the upstream gradient. ``head_chunk=0`` is the plain path
(full logits, ``log_softmax``), which defines the result. No L2Wrap: these losses are the published
formulas, term for term.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rwkv_peft.train.loss import auto_head_chunk

LogpObjective = Callable[[torch.Tensor], torch.Tensor]  # token log-probs (B, T) -> scalar loss
LogpHead = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _logp_chunk(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, acc: torch.dtype,
                grad: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(onehot - softmax of a chunk's logits, in ``acc``: d log-prob / d logits, when ``grad``; the log-prob
    of each target)."""
    lf = (h @ weight.t()).to(acc)
    picked = lf.gather(1, y).squeeze(1)
    maxx = lf.max(-1, keepdim=True).values
    p = lf.sub_(maxx).exp_()  # in place: the chunk's one (n, V) buffer
    sumexp = p.sum(-1, keepdim=True)
    q = p.div_(sumexp).neg_().scatter_add_(1, y, torch.ones_like(picked[:, None])) if grad else None
    return q, picked - (maxx + sumexp.log()).squeeze(1)


class LinearLogpLoss(torch.autograd.Function):
    """(objective(lp), lp) with lp[b, t] = log softmax(hidden[b, t] @ weight.T)[targets[b, t]], ``chunk``
    tokens at a time; the gradients of hidden and weight are computed in forward.

    d lp_t / d hidden_t = (onehot_t - softmax_t) @ weight is computed in the first walk, before the
    loss is known; the loss's gradient then only scales each token's row by its coefficient. Only the
    head weight's gradient mixes tokens, so only it (a trained head) needs the second walk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, objective: LogpObjective,
                chunk: int, grad_enabled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # forward runs with grad mode off and needs_input_grad ignores it: the caller's mode comes in
        want_h, want_w = (grad_enabled and need for need in ctx.needs_input_grad[:2])
        h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1, 1)
        n = h.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 sums for bf16/fp16
        token_lp = torch.empty(n, dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        kept = None
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            q, token_lp[s:e] = _logp_chunk(h[s:e], weight, y[s:e], acc, want_h or want_w)
            if want_h:
                torch.mm(q.to(hidden.dtype), weight, out=grad_h[s:e])
            kept = q if want_w and n <= chunk else None  # one chunk: kept for the weight's gradient
        token_lp = token_lp.view(targets.shape)
        with torch.enable_grad():
            lp = token_lp.detach().requires_grad_(True)
            loss = objective(lp)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        if want_h or want_w:
            (coef,) = torch.autograd.grad(loss, lp)
            coef = coef.to(acc).reshape(-1, 1)  # d loss / d log-prob of each token
            if want_h:
                grad_h.mul_(coef.to(grad_h.dtype))
            for s in range(0, n, chunk) if want_w else ():
                e = min(s + chunk, n)
                q = kept if kept is not None else _logp_chunk(h[s:e], weight, y[s:e], acc)[0]
                grad_w += (q.mul_(coef[s:e]).to(hidden.dtype).t() @ h[s:e]).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.hidden_shape, ctx.weight_dtype = hidden.shape, weight.dtype
        ctx.mark_non_differentiable(token_lp)
        return loss.detach(), token_lp

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _: torch.Tensor) -> tuple:
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = (grad_h * grad.to(grad_h.dtype)).view(ctx.hidden_shape)
        if grad_w is not None:
            grad_w = (grad_w * grad).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def logp_loss(targets: torch.Tensor, objective: LogpObjective = torch.sum, head_chunk: int = -1) -> LogpHead:
    """What a model's head computes from (hidden, weight) for a loss over token log-probs: (``objective``
    of the (B, T) log-probs of ``targets``, those log-probs, detached). Use as ``model(idx, loss=...)``.

    ``head_chunk``: tokens per chunk (-1: ``auto_head_chunk``; 0: the plain path, full logits).
    Without gradients (a reference pass, evaluation) only the log-probs are computed.
    """

    def head(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if head_chunk == 0:
            logits = F.linear(hidden, weight)
            acc = torch.promote_types(logits.dtype, torch.float32)
            lp = torch.log_softmax(logits.to(acc), -1).gather(-1, targets[..., None]).squeeze(-1)
            return objective(lp), lp.detach()
        chunk = auto_head_chunk(weight.shape[0]) if head_chunk < 0 else head_chunk
        return LinearLogpLoss.apply(hidden, weight, targets, objective, chunk, torch.is_grad_enabled())

    return head


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's log-prob of its masked tokens (B,)."""
    return (token_logps * mask.to(token_logps.dtype)).sum(-1)
