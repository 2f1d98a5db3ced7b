"""MiSS math: layer == x @ merged_W.T, dW against loop-over-blocks constructions, unmerge, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwkv_peft.peft.miss import (
    MODES,
    BatColLinear,
    BatRowLinear,
    MissConfig,
    MissLinear,
    ShardLinear,
    ShardSum,
    miss_check,
    miss_delta,
    miss_linear,
    miss_merge,
    miss_shape,
    miss_unmerge,
)

# (out, in, r) per mode; balance/mini include in % r != 0 and a non-square shape
SHAPES = {
    "balance": [(12, 16, 4), (12, 10, 4), (7, 9, 9)],
    "mini": [(12, 16, 4), (12, 10, 4)],
    "bat_row": [(12, 8, 4), (8, 16, 4)],
    "bat_col": [(12, 8, 4), (8, 16, 4)],
}
CASES = [(mode, *shape) for mode in MODES for shape in SHAPES[mode]]


pytestmark = pytest.mark.usefixtures("one_thread")


def loop_delta(w: torch.Tensor, a: torch.Tensor, mode: str, mini_r: int = 3) -> torch.Tensor:
    """dW element by element / block by block, straight from the definitions in rwkv_peft/peft/miss.py's docstring."""
    out_features, in_features = w.shape
    dw = torch.zeros_like(w)
    if mode == "balance":
        for o in range(out_features):
            for j in range(in_features):
                dw[o, j] = a[j % a.shape[0], o]
    elif mode == "mini":  # M = m.repeat(1, out // mini_r): column o of M is column o % mini_r of m
        for o in range(out_features):
            for j in range(in_features):
                dw[o, j] = a[j % a.shape[0], o % a.shape[1]]
    else:
        r = a.shape[-1]
        for ia in range(out_features // r):
            for ib in range(in_features // r):
                d = a[ia] if mode == "bat_row" else a[ib]
                rows, cols = slice(ia * r, (ia + 1) * r), slice(ib * r, (ib + 1) * r)
                dw[rows, cols] = w[rows, cols] @ d + d
    return dw


def make(mode: str, out_features: int, in_features: int, r: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = MissConfig(r=r, mode=mode, mini_r=3 if out_features % 3 == 0 else 1)
    w = torch.randn(out_features, in_features, generator=g, dtype=dtype)
    a = torch.randn(miss_shape(out_features, in_features, cfg), generator=g, dtype=dtype) * 0.3
    x = torch.randn(2, 5, in_features, generator=g, dtype=dtype)
    return cfg, w, a, x


@pytest.mark.parametrize("mode,out_features,in_features,r", CASES)
def test_delta_matches_loop_and_layer_matches_merged(mode, out_features, in_features, r):
    cfg, w, a, x = make(mode, out_features, in_features, r)
    dw = miss_delta(w, a, mode)
    assert dw.dtype == torch.float32 and dw.shape == w.shape
    torch.testing.assert_close(dw, loop_delta(w, a, mode), rtol=0, atol=1e-6)
    merged = miss_merge(w, a, mode)
    torch.testing.assert_close(merged, w + loop_delta(w, a, mode), rtol=0, atol=1e-6)
    # fp32 accumulations over <= 16 terms of O(1) values: 1e-5 absolute is ~100 ulp of slack
    torch.testing.assert_close(miss_linear(x, w, a, mode), x @ merged.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(miss_unmerge(merged, a, mode), w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode,out_features,in_features,r", CASES)
def test_gradients_match_merged_linear(mode, out_features, in_features, r):
    _, w, a, x = make(mode, out_features, in_features, r, dtype=torch.float64)
    x1, a1 = x.clone().requires_grad_(), a.clone().requires_grad_()
    x2, a2 = x.clone().requires_grad_(), a.clone().requires_grad_()
    gy = torch.randn(2, 5, out_features, dtype=torch.float64)
    (miss_linear(x1, w, a1, mode) * gy).sum().backward()
    (F.linear(x2, w + loop_delta(w, a2, mode)) * gy).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_layer(mode):
    out_features, in_features, r = SHAPES[mode][-1]
    _, w, a, x = make(mode, out_features, in_features, r, dtype=torch.float64)
    x, a = x[:1, :3].clone().requires_grad_(), a.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, a: miss_linear(x, w, a, mode), (x, a))
    # a trainable weight takes the composed (plain autograd / BatRowLinear weight-gradient) path
    assert torch.autograd.gradcheck(lambda x, a, w: miss_linear(x, w, a, mode), (x, a, w.requires_grad_()))


def test_gradcheck_custom_functions():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 10, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ShardSum.apply(x, 4), (x,))  # 10 % 4 != 0: padded shard
    for width in (12, 3):  # balance's (r, out) and mini's (r, mini_r)
        w = torch.randn(12, 10, generator=g, dtype=torch.float64)
        m = torch.randn(4, width, generator=g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, m, w=w: ShardLinear.apply(x, w, m), (x, m))
    x = torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, 8, generator=g, dtype=torch.float64, requires_grad=True)
    d = torch.randn(3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, d: BatColLinear.apply(x, w.detach(), d), (x, d[:2]))
    assert torch.autograd.gradcheck(BatRowLinear.apply, (x, w, d, True))
    assert torch.autograd.gradcheck(BatRowLinear.apply, (x, w, d, False))


def test_mini_with_full_width_equals_balance():
    w = torch.randn(12, 10)
    m = torch.randn(4, 12)
    x = torch.randn(3, 10)
    torch.testing.assert_close(miss_delta(w, m, "mini"), miss_delta(w, m, "balance"), rtol=0, atol=0)
    torch.testing.assert_close(miss_linear(x, w, m, "mini"), miss_linear(x, w, m, "balance"), rtol=0, atol=0)


def test_unmerge_bf16_weight_roundtrip_dtype():
    cfg, w, a, _ = make("bat_col", 8, 8, 4)
    merged = miss_merge(w.bfloat16(), a, "bat_col")
    assert merged.dtype == torch.bfloat16
    assert miss_unmerge(merged, a, "bat_col").dtype == torch.bfloat16


def saved_tensors(fn) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("mode", MODES)
def test_backward_keeps_no_input_copy_or_full_matrix(mode):
    """balance/mini keep only r-wide shard sums; no mode keeps an out x in tensor besides W itself."""
    out_features, in_features, r = 16, 32, 8
    cfg = MissConfig(r=r, mode=mode, mini_r=4)
    layer = MissLinear(nn.Linear(in_features, out_features, bias=False), cfg)
    x = torch.randn(4, 6, in_features, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    extra = [t for t in saved_tensors(lambda: layer(x)) if t.untyped_storage().data_ptr() not in params]
    assert not [t for t in extra if t.shape[-2:] in ((out_features, in_features), (in_features, out_features))]
    if mode in ("balance", "mini"):  # only s (tokens x r)
        assert sum(t.numel() for t in extra) == 4 * 6 * r


@pytest.mark.parametrize("mode", MODES)
def test_layer_step0_equals_base_and_dropout_path(mode):
    base = nn.Linear(16, 8, bias=False)
    cfg = MissConfig(r=4, mode=mode, mini_r=2, dropout=0.5)
    layer = MissLinear(base, cfg)
    assert not layer.weight.requires_grad and layer.weight is base.weight
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), base(x))  # training mode, dropout active: zero adapter adds exact zeros
    layer.eval()
    assert torch.equal(layer(x), base(x))
    layer.train()
    with torch.no_grad():
        layer.miss.normal_()
    layer.train()
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    xa = F.dropout(x, 0.5, training=True)
    expected = x @ base.weight.T + xa @ miss_delta(base.weight, layer.miss, mode).T
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x), x @ layer.merged_weight().T, rtol=1e-5, atol=1e-5)


def test_config_json():
    assert MissConfig.from_json('{"r":32,"mode":"bone","load":""}').mode == "balance"
    assert MissConfig.from_json('{"mode":"bat"}').mode == "bat_col"
    assert MissConfig.from_json('{"bone_r":16,"bone_load":""}').r == 16
    cfg = MissConfig.from_json('{"r":8,"mode":"mini","mini_r":2,"parts":["ffn"],"train_parts":["ln"]}')
    assert (cfg.r, cfg.mini_r, cfg.parts, cfg.train_parts) == (8, 2, ("ffn",), ("ln",))
    with pytest.raises(ValueError, match="--miss_config.*unknown key"):
        MissConfig.from_json('{"rank":8}')
    with pytest.raises(ValueError, match="--miss_config.*mode"):
        MissConfig.from_json('{"mode":"lora"}')
    with pytest.raises(ValueError, match="--miss_config.*JSON"):
        MissConfig.from_json("{r: 8}")
    with pytest.raises(ValueError, match="train_parts"):
        MissConfig(train_parts=("bias",))


@pytest.mark.parametrize(
    "mode,out_features,in_features,r,mini_r,what",
    [
        ("bat_col", 12, 10, 4, 1, "divide both"),
        ("bat_row", 10, 12, 4, 1, "divide both"),
        ("mini", 10, 12, 4, 3, "mini_r=3 must divide out_features 10"),
        ("balance", 8, 6, 8, 1, "r must be <= in_features 6"),
    ],
)
def test_invalid_settings_name_module_and_shape(mode, out_features, in_features, r, mini_r, what):
    cfg = MissConfig(r=r, mode=mode, mini_r=mini_r)
    with pytest.raises(ValueError, match=rf"blocks\.1\.ffn\.key \(weight {out_features}x{in_features}.*{what}"):
        miss_check(out_features, in_features, cfg, "blocks.1.ffn.key")
    with pytest.raises(ValueError, match="blocks.1.ffn.key"):
        MissLinear(nn.Linear(in_features, out_features, bias=False), cfg, "blocks.1.ffn.key")
