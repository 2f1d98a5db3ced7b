"""DoRA: the layer against the paper's formula, merge = adapted (fp32 <= 1e-5), unmerge, the merge CLI, the trainer."""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import perturbed_model
from torch import nn

from rwkv_peft.merge import main as merge_main
from rwkv_peft.merge import merge_adapter
from rwkv_peft.model import load_model, save_model
from rwkv_peft.peft import adapter_config, apply_peft, parse_peft_config, trainable_state_dict
from rwkv_peft.peft.dora import DoraConfig, DoraLinear, dora_merge, dora_unmerge, dora_weight_norm

ROOT = Path(__file__).resolve().parents[1]


def trained_layer(out_f: int = 48, in_f: int = 80, r: int = 4, seed: int = 0) -> DoraLinear:
    """A DoRA layer moved off its init: B and m non-zero, so direction and magnitude both matter."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.1)
    layer = DoraLinear(base, DoraConfig(r=r, alpha=2 * r))
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(out_f, r, generator=g) * 0.1)
        layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand(out_f, generator=g))
    return layer


def test_layer_is_the_papers_formula_with_a_row_norm():
    """y = x (m / ||W + sBA||_row * (W + sBA))^T, the norm over the input dim of the (out, in) weight."""
    layer = trained_layer()
    w = layer.weight + layer.scale * layer.lora_B @ layer.lora_A
    rows = torch.stack([torch.sqrt((w[o] ** 2).sum()) for o in range(w.shape[0])])  # one per output
    x = torch.randn(3, 5, w.shape[1])
    want = x @ (layer.lora_magnitude_vector[:, None] * w / rows[:, None]).t()
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    assert layer.lora_magnitude_vector.shape == (w.shape[0],)


def test_fresh_layer_equals_base_and_norm_gets_no_gradient():
    base = nn.Linear(64, 32, bias=False)
    layer = DoraLinear(base, DoraConfig(r=8, alpha=16))
    x = torch.randn(4, 64)
    assert torch.equal(layer(x), F.linear(x, base.weight))  # m / ||W|| is exactly 1 at step 0
    layer = trained_layer()
    x = torch.randn(6, layer.weight.shape[1])
    layer(x).square().sum().backward()
    got = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)]
    a, b, m = (p.detach().clone().requires_grad_() for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector))
    v = layer.weight + layer.scale * b @ a
    y = x @ ((m / torch.linalg.vector_norm(v, dim=1).detach())[:, None] * v).t()  # DoRA sec. 4.3: norm is constant
    y.square().sum().backward()
    for g, want in zip(got, (a.grad, b.grad, m.grad), strict=True):  # fp32: within 1e-5 of each tensor's max
        assert (g - want).abs().max() <= 1e-5 * want.abs().max()


def test_merge_equals_adapted_and_unmerge_recovers_base():
    layer = trained_layer(seed=3)
    x = torch.randn(7, layer.weight.shape[1])
    merged = layer.merged_weight()
    y, want = F.linear(x, merged), layer(x)
    assert (y - want).abs().max() / want.abs().max() <= 1e-5  # fp32: the same products summed in another order
    a, b, m = (t.detach() for t in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector))
    norm = dora_weight_norm(layer.weight, a, b, layer.scale)
    back = dora_unmerge(dora_merge(layer.weight, a, b, m, layer.scale), a, b, m, layer.scale, norm)
    torch.testing.assert_close(back, layer.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.linalg.vector_norm(merged, dim=1), m, rtol=1e-5, atol=0)  # |W'_o| = m_o


def test_zero_rows_stay_finite_train_and_merge():
    """A fresh RWKV model zero-initialises att.output and ffn.value: a zero row has no direction, and
    DoRA there must not divide 0 by 0 (NaN from the first step) -- it trains and merges like the others."""
    base = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        base.weight[:8].zero_()
    layer = DoraLinear(base, DoraConfig(r=4, alpha=8))
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(64, 32, generator=g), torch.randn(64, 16, generator=g)
    assert torch.equal(layer(x), F.linear(x, base.weight))
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.5)
    for _ in range(4):
        opt.zero_grad()
        (layer(x) - target).square().mean().backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in layer.parameters())
    y = layer(x)
    assert y[:, :8].abs().max() > 0  # the zero rows learned
    assert (F.linear(x, layer.merged_weight()) - y).abs().max() <= 1e-5 * y.abs().max()


def test_config_is_loras_without_pissa():
    cfg = parse_peft_config("dora", '{"r":8,"alpha":16}')
    assert isinstance(cfg, DoraConfig) and cfg.r == 8 and cfg.scale == 2
    with pytest.raises(ValueError, match="--lora_config: pissa does not apply to --peft dora"):
        parse_peft_config("dora", '{"pissa":true}')


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory) -> dict[str, Path]:
    """A World-vocab base (so --verify can tokenize) and a DoRA adapter with every tensor non-trivial."""
    d = tmp_path_factory.mktemp("dora")
    base = d / "base.pth"
    save_model(perturbed_model(n_layer=1, n_embd=64, vocab=65536, seed=5), base)
    model = load_model(base, op="torch")
    cfg = parse_peft_config("dora", '{"r":8,"alpha":16}')
    apply_peft(model, "dora", cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (0.05 if n.endswith("lora_magnitude_vector") else 0.02))
    out = d / "run"
    out.mkdir()
    torch.save(trainable_state_dict(model), out / "rwkv-final.pth")
    (out / "adapter_config.json").write_text(json.dumps(adapter_config(model, "dora", cfg)))
    return {"base": base, "adapter": out / "rwkv-final.pth", "model": model.eval()}


def test_merged_file_equals_adapted_model(dora_run, tmp_path: Path):
    merged = merge_adapter(dora_run["base"], dora_run["adapter"], tmp_path / "merged.pth")
    sd = torch.load(merged, weights_only=True)
    assert set(sd) == set(torch.load(dora_run["base"], weights_only=True))  # the base's keys, nothing added
    idx = torch.randint(0, 65536, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = dora_run["model"](idx)
        got = load_model(merged, op="torch")(idx)
    assert (got - want).abs().max() / want.abs().max() <= 1e-5


def test_merge_lora_script_verifies_dora_and_refuses_unmerge(dora_run, tmp_path: Path, capsys, monkeypatch):
    """merge/merge_lora.py folds DoRA and --verify compares it in the rwkv runtime; --unmerge is one line, no file."""
    out = tmp_path / "merged.pth"
    argv = ["merge_lora.py", "--base_model", str(dora_run["base"]), "--peft_checkpoint", str(dora_run["adapter"]),
            "--output", str(out), "--verify", "--n_tokens", "2", "--quiet"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "merge" / "merge_lora.py"), run_name="__main__")  # the script itself, in-process
    diff = float(re.search(r"max \|logit diff\|.*?: (\S+) over", capsys.readouterr().out).group(1))
    assert diff <= 1e-4  # runtime (merged, its own kernels) vs our adapted model, fp32
    back = tmp_path / "back.pth"
    with pytest.raises(SystemExit, match="DoRA rescales.*cannot be recovered") as e:
        merge_main(["--unmerge", "--base_model", str(out), "--peft_checkpoint", str(dora_run["adapter"]),
                    "--output", str(back), "--quiet"])
    assert "\n" not in str(e.value) and not back.exists() and sorted(tmp_path.iterdir()) == [out]
