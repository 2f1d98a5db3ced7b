"""infctx: chunked training must give the full-context loss and gradients (exact, nothing truncated)."""

from __future__ import annotations

import pytest
import torch
from helpers import perturbed_model
from torch import nn

from rwkv_peft.ops import wkv7
from rwkv_peft.peft.state import add_time_state
from rwkv_peft.train.loss import infctx_loss, masked_loss

# fp32 throughout; chunking only changes float summation order, so 1e-4 relative is generous.
REL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _sample(B: int, L: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (B, L), generator=g)
    tgt = torch.randint(0, vocab, (B, L), generator=g)
    mask = (torch.rand(B, L, generator=g) > 0.3).float()
    return idx, tgt, mask


def _full_loss(model: nn.Module, idx: torch.Tensor, tgt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The trainer's loss on the whole sample through the plain head (every logit at once)."""
    return masked_loss(model, idx, tgt, mask, head_chunk=0)


def _loss_and_grads(model: nn.Module, loss_fn) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    # layer 0's v0/v1/v2 are unused by the model itself (its value is v_first): no gradient either way
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def _assert_same(full: tuple, chunked: tuple) -> None:
    (loss_f, g_f), (loss_c, g_c) = full, chunked
    assert abs(loss_c - loss_f) <= REL * abs(loss_f)
    assert g_f.keys() == g_c.keys()
    for name, g in g_f.items():
        assert g.norm() > 0, f"{name}: zero gradient hides nothing"
        err = ((g_c[name] - g).norm() / g.norm()).item()
        assert err <= REL, f"{name}: relative gradient error {err:.2e}"


def _cpu_kernel_with_state() -> bool:
    """Whether op='cpu' (the compiled kernel) is built here and takes an initial state."""
    try:
        x = torch.zeros(1, 2, 1, 64)
        wkv7(x, x - 1, x, x, x, x, state=torch.zeros(1, 1, 64, 64), op="cpu")
    except Exception:  # noqa: BLE001 - any failure: the kernel is not usable here
        return False
    return True


OPS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not _cpu_kernel_with_state(),
                                                             reason="compiled CPU WKV kernel with state unavailable"))]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("L,C", [(48, 16), (50, 16)])
def test_infctx_equals_full_context_all_params(op: str, L: int, C: int) -> None:
    """Every parameter trainable (a superset of any PEFT method's): loss and each gradient match."""
    model = perturbed_model(n_layer=2, n_embd=64, vocab=97, head_size=64, op=op).train()
    idx, tgt, mask = _sample(2, L, 97)
    full = _loss_and_grads(model, lambda: _full_loss(model, idx, tgt, mask))
    chunked = _loss_and_grads(model, lambda: infctx_loss(model, idx, tgt, mask, C))
    _assert_same(full, chunked)


def test_infctx_state_tuning_and_grad_cp() -> None:
    """A learned initial state (state tuning) enters only chunk 0, yet its gradient is the full one;
    per-block checkpointing nested inside the per-chunk one changes nothing."""
    model = perturbed_model(n_layer=2, n_embd=64, vocab=97, head_size=32).train()
    g = torch.Generator().manual_seed(3)
    for p in model.parameters():
        p.requires_grad_(False)
    add_time_state(model)
    with torch.no_grad():
        for block in model.blocks:
            block.att.time_state.copy_(0.1 * torch.randn(2, 32, 32, generator=g))
    idx, tgt, mask = _sample(1, 45, 97, seed=1)
    full = _loss_and_grads(model, lambda: _full_loss(model, idx, tgt, mask))
    model.grad_cp = True
    chunked = _loss_and_grads(model, lambda: infctx_loss(model, idx, tgt, mask, 8))
    _assert_same(full, chunked)


def test_infctx_eval_no_grad_and_bad_chunk() -> None:
    model = perturbed_model(n_layer=1, n_embd=64, vocab=97).eval()
    idx, tgt, mask = _sample(1, 20, 97)
    with torch.no_grad():
        ref = _full_loss(model, idx, tgt, mask)
        assert torch.allclose(infctx_loss(model, idx, tgt, mask, 7), ref, rtol=REL)
        assert torch.allclose(infctx_loss(model, idx, tgt, None, 7), _full_loss(model, idx, tgt, mask * 0 + 1),
                              rtol=REL)
    with pytest.raises(ValueError, match="chunk_ctx"):
        infctx_loss(model, idx, tgt, mask, 0)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("w0", [20.0, -20.0])
def test_infctx_long_strong_decay_is_finite(op: str, w0: float) -> None:
    """Long L with the strongest (w0 >> 0: decay exp(-e^-0.5) per step) and the weakest decays
    (w0 << 0: decay -> 1, nothing forgotten): loss and every gradient stay finite."""
    model = perturbed_model(n_layer=2, n_embd=64, vocab=97, op=op).train()
    with torch.no_grad():
        for block in model.blocks:
            block.att.w0.fill_(w0)
    L, C = (256, 64) if op == "torch" else (4096, 512)  # the reference is slow; the kernel gets real length
    idx, tgt, mask = _sample(1, L, 97, seed=2)
    model.zero_grad()
    loss = infctx_loss(model, idx, tgt, mask, C)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("mode", ["balance", "bat_row"])
def test_infctx_miss_adapters(mode: str) -> None:
    """MiSS layers (custom autograd inside) under per-chunk recompute: adapter gradients match."""
    from rwkv_peft.peft.miss import MissConfig, MissLinear

    model = perturbed_model(n_layer=2, n_embd=64, vocab=97).train()
    g = torch.Generator().manual_seed(4)
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        for part, names in model.peft_targets.items():
            mod = getattr(block, part)
            for name in names:
                layer = MissLinear(getattr(mod, name), MissConfig(r=16, mode=mode), name)
                with torch.no_grad():
                    layer.miss.normal_(0, 0.02, generator=g)
                setattr(mod, name, layer)
    idx, tgt, mask = _sample(1, 40, 97, seed=5)
    full = _loss_and_grads(model, lambda: _full_loss(model, idx, tgt, mask))
    chunked = _loss_and_grads(model, lambda: infctx_loss(model, idx, tgt, mask, 16))
    assert all(n.endswith(".miss") for n in full[1]) and len(full[1]) == 12
    _assert_same(full, chunked)


@pytest.mark.parametrize("head_chunk", [0, 7])
@pytest.mark.parametrize("masked", [True, False])
def test_trainer_loss_chunked_equals_whole(masked: bool, head_chunk: int) -> None:
    """The trainer's loss (masked mean CE + L2Wrap) in chunks == on the whole sample (plain head), with
    the plain head inside each recomputed chunk (0) or the chunked head outside it (7 tokens: several
    per 16-token chunk, one of them short). With an all-zero mask only L2Wrap's gradient is left,
    which checks its whole-sample position count on its own."""
    model = perturbed_model(n_layer=1, n_embd=64, vocab=97).train()
    model.head.weight.requires_grad_(True)
    idx, tgt, mask = _sample(2, 40, 97, seed=6)
    if not masked:
        mask = torch.zeros_like(mask)
    full = _loss_and_grads(model, lambda: _full_loss(model, idx, tgt, mask))
    chunked = _loss_and_grads(model, lambda: infctx_loss(model, idx, tgt, mask, 16, head_chunk))
    assert "head.weight" in full[1]
    _assert_same(full, chunked)
