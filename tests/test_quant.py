"""Quantized frozen base (--quant int8|nf4): error bounds of the formats, training on it, merging it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import perturbed_model, tiny_run_files, train_flags

pytest.importorskip("bitsandbytes.functional", reason="--quant needs bitsandbytes (pip install 'bitsandbytes>=0.50')")

from rwkv_peft.peft.inject import apply_peft, parse_peft_config, target_slots, trainable_state_dict  # noqa: E402
from rwkv_peft.quant import QuantWeight, RoundtripView, quant_roundtrip, quantize_base  # noqa: E402
from rwkv_peft.train.loss import infctx_loss, masked_loss  # noqa: E402

FORMATS = ["int8", "nf4"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _error_bound(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Per-element bound on |W - dequant(quant(W))| that follows from the format's definition.

    int8 (LLM.int8() row-wise): W is rounded to fp16, then to the nearest of 255 levels
    absmax_row * k / 127, so the error is at most half a level plus the fp16 rounding.
    nf4 (QLoRA): each block of 64 is scaled by its absmax and rounded to the nearest of the
    16 NormalFloat4 levels, so the error is at most absmax * (largest gap between levels) / 2.
    """
    from bitsandbytes.functional import get_4bit_type

    if fmt == "int8":
        absmax = w.abs().amax(dim=1, keepdim=True)
        return absmax / 127 * 0.5 * (1 + 1e-3) + w.abs() * 2.0**-11
    code = get_4bit_type("nf4", device="cpu").sort().values
    half_gap = (code[1:] - code[:-1]).max() / 2
    absmax = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    return (absmax * half_gap * (1 + 1e-5)).expand(-1, 64).reshape(w.shape)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_linear_within_documented_error(fmt: str) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * 0.05
    w[3, 7] = 0.9  # an outlier row / block: the bound must scale with its absmax
    x = torch.randn(5, 7, 256, generator=g, requires_grad=True)
    q = QuantWeight(w, fmt)
    deq = q.dequantize()
    bound = _error_bound(w, fmt)
    assert ((deq - w).abs() <= bound).all()
    assert (deq - w).abs().max() > 0  # really quantized
    assert torch.equal(deq, quant_roundtrip(w, fmt))  # merging sees exactly what training saw

    y = F.linear(x, q)  # the layer path: dispatched to the dequantizing matmul
    ref = F.linear(x, w)
    out_bound = x.abs() @ bound.t() + 1e-5 * (x.abs() @ w.abs().t())  # + fp32 matmul rounding
    assert ((y - ref).abs() <= out_bound).all()
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    assert torch.allclose(x.grad, gy @ deq, rtol=1e-5, atol=1e-6)  # backward uses the same weights

    stored = q.qweight.nbytes + q.scale.nbytes
    assert stored <= w.nbytes * {"int8": 0.26, "nf4": 0.15}[fmt]  # 8 / 4 bits + fp32 scales (per row / per 64)
    assert q.qweight.dtype == {"int8": torch.int8, "nf4": torch.uint8}[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_base_keeps_adapters_and_survives_casts(fmt: str) -> None:
    model = perturbed_model(n_layer=2, n_embd=64, vocab=97)
    apply_peft(model, "miss", parse_peft_config("miss", '{"r":16,"mode":"balance"}'))
    keys = set(trainable_state_dict(model))
    report = quantize_base(model, fmt)
    assert "quantized 12 frozen linear weights" in report
    assert set(trainable_state_dict(model)) == keys  # the adapter checkpoint is unchanged
    layer = model.blocks[1].ffn.key
    assert isinstance(layer.weight, QuantWeight) and layer.miss.dtype == torch.float32
    before = (layer.weight.qweight.clone(), layer.weight.scale.clone())
    model.bfloat16()  # what a bf16 trainer does to parameters: the stored format must not change
    assert layer.miss.dtype == torch.bfloat16
    assert torch.equal(layer.weight.qweight, before[0]) and torch.equal(layer.weight.scale, before[1])
    idx = torch.randint(0, 97, (1, 9))
    assert model(idx).dtype == torch.bfloat16


def test_quantize_base_bad_input() -> None:
    model = perturbed_model(n_layer=1, n_embd=64, vocab=97)
    with pytest.raises(ValueError, match="--quant: expected one of int8|nf4"):
        quantize_base(model, "int4")
    with pytest.raises(ValueError, match="trainable"):
        quantize_base(model, "nf4")  # nothing frozen: --peft full
    apply_peft(model, "miss", parse_peft_config("miss", '{"r":16,"mode":"bat_row"}'))
    with pytest.raises(ValueError, match="bat_row"):
        quantize_base(model, "int8")
    model = perturbed_model(n_layer=1, n_embd=64, vocab=97)
    apply_peft(model, "state", None)
    quantize_base(model, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_base(model, "int8")


def _train(model: torch.nn.Module, idx: torch.Tensor, steps: int, chunk: int | None = None) -> list[float]:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        tgt, mask = idx.roll(-1, 1), torch.ones(idx.shape)
        if chunk:
            loss = infctx_loss(model, idx, tgt, mask, chunk)
        else:
            loss = masked_loss(model, idx, tgt, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("fmt,mode,chunk", [("int8", "balance", None), ("nf4", "bat_col", 12)])
def test_short_miss_run_on_quantized_base_lowers_loss(fmt: str, mode: str, chunk: int | None) -> None:
    torch.manual_seed(0)
    model = perturbed_model(n_layer=2, n_embd=64, vocab=97).train()
    apply_peft(model, "miss", parse_peft_config("miss", f'{{"r":16,"mode":"{mode}"}}'))
    quantize_base(model, fmt)
    idx = torch.randint(0, 97, (2, 24))
    losses = _train(model, idx, 10, chunk)
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(isinstance(m, QuantWeight) for m in model.modules() if hasattr(m, "qweight"))


def test_infctx_exact_on_quantized_base() -> None:
    """The dequantizing matmul under per-chunk recompute: chunked == full-context gradients."""
    model = perturbed_model(n_layer=2, n_embd=64, vocab=97).train()
    apply_peft(model, "lora", parse_peft_config("lora", '{"r":8}'))
    quantize_base(model, "nf4")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    idx, tgt = torch.randint(0, 97, (1, 40)), torch.randint(0, 97, (1, 40))
    mask = torch.ones(1, 40)
    grads = []
    for fn in (lambda: masked_loss(model, idx, tgt, mask, 0), lambda: infctx_loss(model, idx, tgt, mask, 16)):
        model.zero_grad(set_to_none=True)
        fn().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 24
    for n, g in grads[0].items():
        assert ((grads[1][n] - g).norm() / g.norm()).item() <= 1e-4, n


@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_on_quantized_base_matches_adapted_model(fmt: str) -> None:
    """Merged = dequant(quant(W)) + dW for every target linear; it reproduces the trained model."""
    from rwkv_peft.merge import merge_state_dict
    from rwkv_peft.model import RWKV7

    model = perturbed_model(n_layer=2, n_embd=64, vocab=97)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_peft(model, "miss", parse_peft_config("miss", '{"r":16,"mode":"bat_col"}'))
    quantize_base(model, fmt)
    _train(model.train(), torch.randint(0, 97, (1, 24)), 3)
    adapter = trainable_state_dict(model)

    targets = {f"{path}.weight" for path, _, _ in target_slots(model)}
    base_q = RoundtripView(base, targets, fmt)
    assert torch.equal(base_q["blocks.1.att.key.weight"], model.blocks[1].att.key.weight.dequantize())
    merged = merge_state_dict(base_q, adapter, {"method": "miss", "mode": "bat_col", "r": 16})
    plain = RWKV7(model.cfg, op="torch")
    plain.load_state_dict(merged)
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        want, got = model.eval()(idx), plain.eval()(idx)
    assert ((got - want).norm() / want.norm()).item() < 1e-5  # fp32: merging only reorders sums


def test_trainer_infctx_on_quantized_base_then_merge(tmp_path) -> None:
    """`python -m rwkv_peft.train --train_type infctx --quant nf4` learns; `merge --quant nf4` of its
    adapter reproduces the adapted quantized model."""
    from rwkv_peft.merge import adapted_model, merge_adapter
    from rwkv_peft.model import load_model
    from rwkv_peft.train import main

    vocab, base, out = 97, tmp_path / "base.pth", tmp_path / "out"
    files = tiny_run_files(tmp_path, 3001, vocab)
    main(train_flags(files, out, 20, micro_bsz=2, epoch_steps=6, epoch_count=1, lr_init=2e-2, lr_final=1e-2,
                     random_seed=42, train_type="infctx", chunk_ctx=8, quant="nf4"))
    log = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1] < log[0], log

    merged = merge_adapter(base, out / "rwkv-final.pth", tmp_path / "merged.pth", quant="nf4")
    want_model = adapted_model(base, out / "rwkv-final.pth", quant="nf4")
    assert isinstance(want_model.blocks[0].att.key.weight, QuantWeight)
    idx = torch.randint(0, vocab, (1, 16))
    with torch.no_grad():
        want, got = want_model(idx), load_model(merged, op="torch")(idx)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
