"""Injection into RWKV-7: step-0 equality, freezing, short training runs, adapter save/load, configs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import perturbed_model

from rwkv_peft.peft import (
    LoraConfig,
    LoraLinear,
    MissConfig,
    MissLinear,
    StateConfig,
    adapter_config,
    adapter_disabled,
    apply_peft,
    load_adapter,
    lora_delta,
    parse_peft_config,
    trainable_state_dict,
)
from rwkv_peft.peft.dora import DoraConfig
from rwkv_peft.peft.miss import MODES

VOCAB = 40
SMALL = dict(n_layer=1, n_embd=64, head_size=32, vocab=VOCAB)  # att 64x64, ffn 64x256 / 256x64


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(**kw):
    return perturbed_model(**{**SMALL, **kw})


def miss_cfg(mode: str, **kw) -> MissConfig:
    return MissConfig(r=16, mode=mode, mini_r=4, **kw)


CONFIGS = [("miss", miss_cfg(mode)) for mode in MODES] + [
    ("lora", LoraConfig(r=4, alpha=8)),
    ("pissa", LoraConfig(r=4, alpha=8, pissa=True)),
    ("state", StateConfig()),
]
IDS = [m if m != "miss" else f"miss-{c.mode}" for m, c in CONFIGS]


def tokens(seed: int = 0, batch: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method,cfg", CONFIGS, ids=IDS)
def test_step0_equals_base(method, cfg):
    base, model = perturbed_model(), perturbed_model()  # helpers' default shapes: 2 layers, n_embd 128
    idx = tokens(t=8)
    if method == "miss" and cfg.mode.startswith("bat"):
        cfg = MissConfig(r=32, mode=cfg.mode)  # r must divide 128 and 512
    apply_peft(model, method, cfg)
    with torch.no_grad():
        expected, got = base(idx), model(idx)
    if method == "pissa":  # the residual W - s B0 A0 plus s B0 A0 is W only up to fp32 rounding
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("mode", MODES)
def test_step0_exact_with_dropout_in_train_mode(mode):
    base, model = small_model(), small_model()
    apply_peft(model, "miss", miss_cfg(mode, dropout=0.3))
    model.train()
    assert torch.equal(model(tokens()), base(tokens()))


PERM = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(123))


def pattern_batch(step: int) -> torch.Tensor:
    """Rows that follow a fixed permutation (x[t+1] = PERM[x[t]]) from random starts: a learnable bigram."""
    seq = [torch.randint(0, VOCAB, (8, 1), generator=torch.Generator().manual_seed(step))]
    for _ in range(11):
        seq.append(PERM[seq[-1]])
    return torch.cat(seq, 1)


@pytest.mark.parametrize("method,cfg", CONFIGS, ids=IDS)
def test_short_training_lowers_loss_and_keeps_base(method, cfg):
    torch.manual_seed(0)
    model = small_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_peft(model, method, cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-1 if method == "state" else 1e-2, weight_decay=0.0)

    def loss_at(batch):
        logits = model(batch[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))

    held_out = pattern_batch(10_000)
    with torch.no_grad():
        before = loss_at(held_out).item()
    for step in range(20):
        loss = loss_at(pattern_batch(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = loss_at(held_out).item()
    # mini (16x4 numbers per linear) learns slowly and a start state cannot encode a bigram table:
    # both gain only ~5-15% in 20 steps, the others 50-75%; the seeds are fixed, so this is deterministic
    assert after < (0.98 if method == "state" else 0.92) * before, (before, after)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) and not params[n].requires_grad for n, t in frozen.items())
    residuals = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, LoraLinear) and m.pissa}
    for name, t in base.items():  # every base tensor (bar PiSSA's residuals) is a frozen parameter, same bits
        if name not in residuals:
            assert name in frozen and torch.equal(params[name], t), name


def test_pissa_residual_plus_factors_is_w():
    base, model = small_model(), small_model()
    cfg = LoraConfig(r=4, alpha=8, pissa_niter=2)
    apply_peft(model, "pissa", cfg)
    layer = model.blocks[0].ffn.key
    assert isinstance(layer, LoraLinear) and layer.pissa
    w = base.blocks[0].ffn.key.weight
    torch.testing.assert_close(layer.weight + lora_delta(layer.pissa_A0, layer.pissa_B0, cfg.scale), w)
    torch.testing.assert_close(layer.lora_A, layer.pissa_A0, rtol=0, atol=0)
    # on a weight with a clear rank-4 part, the factors capture it: the residual's spectrum is W's minus the top 4
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 4, generator=g) @ torch.randn(4, 40, generator=g) + 0.01 * torch.randn(48, 40, generator=g)
    linear = torch.nn.Linear(40, 48, bias=False)
    linear.weight.data.copy_(w)
    res = LoraLinear(linear, cfg, pissa=True).weight
    torch.testing.assert_close(torch.linalg.svdvals(res)[:8], torch.linalg.svdvals(w)[4:12], rtol=1e-2, atol=1e-3)
    sd = trainable_state_dict(model)
    assert "blocks.0.ffn.key.pissa_A0" in sd and "blocks.0.ffn.key.pissa_B0" in sd


def test_freezing_and_train_parts():
    model = small_model()
    report = apply_peft(model, "miss", MissConfig(r=16, parts=("ffn",), train_parts=("ln", "time")))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names >= {"blocks.0.ffn.key.miss", "blocks.0.ffn.value.miss", "blocks.0.ln1.weight", "blocks.0.att.w1"}
    assert "blocks.0.att.key.miss" not in dict(model.named_parameters())
    assert not any(n.endswith(".weight") and "ln" not in n for n in names)
    assert set(trainable_state_dict(model)) == names
    total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pct = 100 * n_train / total
    assert report == f"trainable params: {n_train:,} || all params: {total:,} || trainable%: {pct:.4f}"
    full = small_model()
    apply_peft(full, "full", None)
    assert all(p.requires_grad for p in full.parameters())


@pytest.mark.parametrize("method,cfg", CONFIGS, ids=IDS)
def test_adapter_save_load_roundtrip(method, cfg, tmp_path):
    model = small_model()
    apply_peft(model, method, cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path / "rwkv-0.pth"
    sd = trainable_state_dict(model)
    torch.save(sd, path)
    fresh = small_model()
    load_cfg = type(cfg)(**{**cfg.__dict__, "load": str(path)})
    apply_peft(fresh, method, load_cfg)
    idx = tokens()
    torch.testing.assert_close(fresh(idx), model(idx), rtol=1e-5, atol=1e-5)


def test_load_errors(tmp_path):
    model = small_model()
    apply_peft(model, "miss", miss_cfg("balance"))
    for name, method, cfg, match in (
        ("lora", "lora", LoraConfig(r=4), r"lora\.pth: no key matches"),
        ("r8", "miss", MissConfig(r=8), r"r8\.pth: blocks\.0\.att\.receptance\.miss has shape \(8, 64\)"),
    ):
        other = small_model()
        apply_peft(other, method, cfg)
        torch.save(trainable_state_dict(other), tmp_path / f"{name}.pth")
        with pytest.raises(ValueError, match=match):
            load_adapter(model, tmp_path / f"{name}.pth")
    partial = {"blocks.0.att.key.miss": torch.zeros(16, 64), "blocks.9.att.key.miss": torch.zeros(16, 64)}
    with pytest.raises(ValueError, match=r"not in the model.*blocks\.9"):
        load_adapter(model, partial)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_adapter(model, tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError):
        apply_peft(small_model(), "miss", MissConfig(r=16, load=str(tmp_path / "nope.pth")))


def test_load_rwkv_peft_disha_key():
    model = small_model()
    apply_peft(model, "miss", miss_cfg("balance"))
    m = torch.randn(16, 64)
    assert load_adapter(model, {"blocks.0.att.value.disha": m}) == 1
    assert torch.equal(model.blocks[0].att.value.miss, m)


def test_invalid_settings_leave_model_untouched():
    model = small_model()
    with pytest.raises(ValueError, match=r"blocks\.0\.att\.receptance \(weight 64x64, mode bat_col, r=24\)"):
        apply_peft(model, "miss", MissConfig(r=24, mode="bat_col"))
    with pytest.raises(ValueError, match=r"mini_r=3 must divide out_features 64"):
        apply_peft(model, "miss", MissConfig(r=16, mode="mini", mini_r=3))
    with pytest.raises(ValueError, match=r"--miss_config: parts"):
        apply_peft(model, "miss", MissConfig(parts=("head",)))
    with pytest.raises(ValueError, match=r"--peft"):
        apply_peft(model, "vera", None)
    assert not any(isinstance(m, MissLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    apply_peft(model, "miss", miss_cfg("balance"))
    with pytest.raises(ValueError, match="already has adapters"):
        apply_peft(model, "lora", None)


def test_parse_config_and_adapter_config():
    assert parse_peft_config("miss", '{"r":32,"mode":"bat"}').mode == "bat_col"
    lora = parse_peft_config("lora", '{"lora_r":8,"lora_alpha":16,"lora_dropout":0.01,"lora_load":""}')
    assert (lora.r, lora.alpha, lora.dropout, lora.pissa) == (8, 16, 0.01, False)
    pissa = parse_peft_config("pissa", '{"r":8,"svd_niter":2}')
    assert pissa.pissa and pissa.pissa_niter == 2
    assert parse_peft_config("state", "").train_parts == ()
    assert parse_peft_config("full", None).load == ""
    with pytest.raises(ValueError, match="--lora_config: unknown key"):
        parse_peft_config("lora", '{"rank":8}')
    with pytest.raises(ValueError, match="--peft: expected one of"):
        parse_peft_config("ia3", "")
    model = small_model()
    cfg = MissConfig(r=16, mode="mini", mini_r=4, train_parts=("ln",))
    apply_peft(model, "miss", cfg)
    conf = adapter_config(model, "miss", cfg)
    assert conf == {
        "method": "miss",
        "mode": "mini",
        "r": 16,
        "mini_r": 4,
        "alpha": None,
        "parts": ["att", "ffn"],
        "train_parts": ["ln"],
        "base": {"version": "x070", "n_layer": 1, "n_embd": 64, "vocab_size": VOCAB, "head_size": 32, "dim_ffn": 256},
    }
    json.dumps(conf)
    assert adapter_config(model, "lora", LoraConfig(r=4, pissa=True))["method"] == "pissa"


def test_registry_is_the_one_list_of_methods(tmp_path):
    """Trainer flags, adapter keys, the merge CLI and the printed merge command all come from the records."""
    from rwkv_peft.merge.cli import _parser
    from rwkv_peft.peft.registry import METHODS, method_for_keys
    from rwkv_peft.train.config import TrainConfig, build_parser
    from rwkv_peft.train.report import merge_command

    assert method_for_keys({"lora_A", "lora_B"}).name == "lora"
    assert method_for_keys({"disha"}).name == method_for_keys({"miss"}).name == "miss"
    assert method_for_keys({"lora_A"}).name == "lora"  # incomplete: its owner reports what is missing
    assert method_for_keys({"miss", "lora_A"}) is None
    help_text = build_parser().format_help()
    merge_help = _parser("merge").format_help()
    for name, m in METHODS.items():
        assert name in help_text and m.flag in help_text
        assert parse_peft_config(name, "") is not None
        assert all(f.flag in merge_help for f in m.merge_flags)
        want = (f"python merge/{m.merge_script}.py --base_model b.pth --peft_checkpoint "
                f"{tmp_path / 'rwkv-final.pth'} --output {tmp_path / 'merged.pth'}") if m.merge_script else ""
        assert merge_command(TrainConfig(peft=name, load_model="b.pth"), tmp_path) == want
    assert merge_command(TrainConfig(peft="state"), tmp_path) == ""


def test_pissa_refuses_a_zero_weight_and_the_demo_base_has_none(tmp_path):
    """RWKV-LM's init zeroes att.output / ffn.value: PiSSA's factors of such a weight are zero, a saddle with
    no gradient for anything before it (the demo trained nothing). Refused by name; the demo's base
    (init_model --output_std) trains."""
    from rwkv_peft.model import load_model
    from rwkv_peft.tools.init_model import main as init_main

    args = ["--n_layer", "1", "--n_embd", "64", "--vocab_size", "256", "--dtype", "fp32"]
    init_main([*args, "--out", str(tmp_path / "fresh.pth")])
    init_main([*args, "--output_std", "0.02", "--out", str(tmp_path / "demo.pth")])
    cfg = parse_peft_config("pissa", '{"r": 4, "alpha": 4}')
    with pytest.raises(ValueError, match=r"pissa: module blocks\.0\.att\.output: its weight is all zeros"):
        apply_peft(load_model(tmp_path / "fresh.pth", op="torch"), "pissa", cfg)
    model = load_model(tmp_path / "demo.pth", op="torch")
    apply_peft(model, "pissa", cfg)
    tokens = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    model(tokens).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


SWITCHED = [("miss", miss_cfg("balance")), ("miss", MissConfig(r=32, mode="bat_row")), ("lora", LoraConfig(r=4)),
            ("pissa", LoraConfig(r=4, alpha=8, pissa=True)), ("dora", DoraConfig(r=4)), ("state", StateConfig())]


@pytest.mark.parametrize("method,cfg", SWITCHED, ids=["miss", "bat_row", "lora", "pissa", "dora", "state"])
def test_adapter_disabled_gives_the_base_output(method, cfg):
    """With a trained (random, non-zero) adapter the model differs from its base; inside adapter_disabled it
    computes the base's logits, and after it the adapted ones again."""
    base, model = perturbed_model(), perturbed_model()
    apply_peft(model, method, cfg)
    g, idx = torch.Generator().manual_seed(5), tokens(t=8)
    trained = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, step in zip(trained, [torch.randn(p.shape, generator=g) * 0.05 for p in trained], strict=True):
            p.add_(step)
        want, adapted = base(idx), model(idx)
        assert (adapted - want).abs().max() > 1e-2
        with adapter_disabled(model):
            torch.testing.assert_close(model(idx), want, rtol=0, atol=2e-5 if method == "pissa" else 1e-6)
        torch.testing.assert_close(model(idx), adapted, rtol=0, atol=0)


def test_adapter_disabled_refuses_what_has_no_switch():
    model = small_model()
    with pytest.raises(ValueError, match="no adapter"):
        adapter_disabled(model).__enter__()
    apply_peft(model, "full")
    with pytest.raises(ValueError, match="^--peft full: full fine-tuning .* no adapter to switch off"):
        adapter_disabled(model).__enter__()
    model = small_model()
    apply_peft(model, "miss", miss_cfg("balance", train_parts=("ln",)))
    with pytest.raises(ValueError, match="ln.* trained in place"):
        adapter_disabled(model).__enter__()
