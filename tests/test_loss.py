"""The training loss: the chunked head (LinearCrossEntropy) equals the plain path (full logits,
masked_ce_sum + L2Wrap) in loss and every gradient, and keeps nothing vocabulary-wide for backward."""

from __future__ import annotations

import pytest
import torch
from helpers import perturbed_model

from rwkv_peft.model import RWKV5Config, RWKV6Config, init_model
from rwkv_peft.peft import apply_peft, parse_peft_config
from rwkv_peft.train.loss import L2Wrap, head_loss, masked_ce_sum, masked_loss

# fp32: the two paths differ only in summation order (chunked matmuls, per-chunk sums).
REL = 1e-5


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def _inputs(B: int, T: int, C: int, V: int, mask_kind: str, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g, dtype=dtype)
    weight = torch.randn(V, C, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = {"ones": torch.ones(B, T), "zeros": torch.zeros(B, T),
            "partial": (torch.rand(B, T, generator=g) > 0.4).float()}[mask_kind]
    if mask_kind == "partial":
        mask[0] = 0.0  # one row entirely masked out, the others partly
    return hidden, weight, targets, mask


def _loss_and_grads(hidden, weight, targets, mask, head_chunk: int, train_head: bool):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(train_head)
    loss = head_loss(targets, mask, head_chunk=head_chunk)(h, w)
    (2.5 * loss).backward()  # an upstream gradient other than 1 must scale both terms
    return loss.detach(), h.grad, w.grad


def test_l2wrap_adds_to_the_max_logit_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, requires_grad=True)
    targets, mask = torch.randint(0, 7, (2, 3)), torch.ones(2, 3)
    L2Wrap.apply(masked_ce_sum(logits, targets, mask) / mask.sum(), logits).backward()
    plain = logits.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(plain.flatten(0, 1), targets.flatten()).backward()
    extra = logits.grad - plain.grad
    maxx, ids = logits.detach().max(-1, keepdim=True)
    want = torch.zeros_like(extra).scatter_(-1, ids, maxx * 1e-4 / 6)
    torch.testing.assert_close(extra, want, rtol=1e-5, atol=1e-8)  # fp32 rounding of the CE gradient
    assert L2Wrap.apply(torch.tensor(2.0), logits).item() == 2.0


@pytest.mark.parametrize("train_head", [True, False])
@pytest.mark.parametrize("mask_kind", ["partial", "zeros", "ones"])
@pytest.mark.parametrize("T,chunk", [(5, 4), (11, 3), (16, 4), (7, 64)])
def test_chunked_head_equals_plain(T: int, chunk: int, mask_kind: str, train_head: bool) -> None:
    """B*T of 10, 22 (not multiples of the chunk), 32 (a multiple) and 14 (one chunk larger than all)."""
    args = _inputs(2, T, 16, 50, mask_kind, seed=T)
    loss_p, gh_p, gw_p = _loss_and_grads(*args, 0, train_head)
    loss_c, gh_c, gw_c = _loss_and_grads(*args, chunk, train_head)
    if mask_kind == "zeros":  # no CE term: the loss is 0 and the gradients are L2Wrap's alone
        assert loss_p == 0 and loss_c == 0
    else:
        assert abs(loss_c - loss_p) <= REL * abs(loss_p)
    assert gh_p.norm() > 0 and rel_err(gh_c, gh_p) <= REL
    if train_head:
        assert gw_p.norm() > 0 and rel_err(gw_c, gw_p) <= REL
    else:
        assert gw_p is None and gw_c is None


def test_chunked_head_gradcheck_float64() -> None:
    """Autograd's numerical check of the chunked gradients (CE part: L2Wrap's term is not a derivative
    of the loss, so a huge position count makes it vanish here; the tests above compare it exactly)."""
    hidden, weight, targets, mask = _inputs(2, 3, 4, 6, "partial", seed=1, dtype=torch.float64)
    mask[1, 0] = 0.0
    loss = head_loss(targets, mask, positions=10**15, head_chunk=4)
    assert torch.autograd.gradcheck(loss, (hidden.requires_grad_(True), weight.requires_grad_(True)))


def test_nothing_vocabulary_wide_is_saved_for_backward() -> None:
    """The plain path keeps (B*T, V) logits for backward; the chunked one keeps the gradients of its
    inputs only: (B*T, C) and, for a trainable head, (V, C)."""
    B, T, C, V = 2, 64, 8, 1000
    hidden, weight, targets, mask = _inputs(B, T, C, V, "ones")
    for head_chunk, biggest in ((0, B * T * V), (16, V * C)):
        saved: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t.numel()) or t,
                                                      lambda t: t):
            head_loss(targets, mask, head_chunk=head_chunk)(hidden.requires_grad_(True), weight.requires_grad_(True))
        assert max(saved) == biggest, (head_chunk, saved)


def test_no_grad_gives_the_same_loss_without_gradients() -> None:
    hidden, weight, targets, mask = _inputs(2, 9, 16, 50, "partial")
    hidden.requires_grad_(True)
    with torch.no_grad():
        plain = head_loss(targets, mask, head_chunk=0)(hidden, weight)
        chunked = head_loss(targets, mask, head_chunk=4)(hidden, weight)
    assert chunked.grad_fn is None and abs(chunked - plain) <= REL * abs(plain)


def test_bf16_accumulates_in_fp32() -> None:
    """bf16 hidden and head: the log-sum-exp runs in fp32, so the loss stays within bf16 rounding of
    the logits (about 2^-8 relative) of the fp32 one, over a vocabulary wide enough to matter."""
    hidden, weight, targets, mask = _inputs(2, 33, 32, 4000, "partial")
    want = _loss_and_grads(hidden, weight, targets, mask, 0, True)
    got = _loss_and_grads(hidden.bfloat16(), weight.bfloat16(), targets, mask, 8, True)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    assert abs(got[0] - want[0]) <= 1e-2 * abs(want[0])
    assert rel_err(got[1].float(), want[1]) <= 2e-2 and rel_err(got[2].float(), want[2]) <= 2e-2


def _model(version: str) -> torch.nn.Module:
    if version == "x070":
        return perturbed_model(n_layer=1, n_embd=64, vocab=97, head_size=32)
    cfg = (RWKV6Config if version == "x060" else RWKV5Config)(1, 64, 97, head_size=32)
    model = init_model(cfg, seed=0, op="torch")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("version,peft", [("x070", "full"), ("x070", "miss"), ("x060", "full"), ("x052", "miss")])
def test_trainer_loss_chunked_head_equals_plain(version: str, peft: str) -> None:
    """Through the model: every trainable parameter's gradient (the head's too with --peft full;
    MiSS adapters with a frozen head) is the plain path's."""
    torch.manual_seed(0)
    model = _model(version).train()
    if peft == "miss":
        apply_peft(model, "miss", parse_peft_config("miss", '{"r":8}'))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".miss"):
                    p.normal_(0, 0.05)
    idx, tgt = torch.randint(0, 97, (2, 19)), torch.randint(0, 97, (2, 19))
    mask = (torch.rand(2, 19) > 0.3).float()
    grads = []
    for head_chunk in (0, 5):
        model.zero_grad(set_to_none=True)
        loss = masked_loss(model, idx, tgt, mask, head_chunk)
        loss.backward()
        grads.append((loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_p, g_p), (loss_c, g_c) = grads
    assert abs(loss_c - loss_p) <= REL * loss_p
    assert g_p.keys() == g_c.keys() and ("head.weight" in g_p) == (peft == "full")
    for n, g in g_p.items():
        assert rel_err(g_c[n], g) <= REL, n
