"""RWKV-6 (x060) and RWKV-5.2 (x052): parity with the official `rwkv` runtime, state, checkpoints, init."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import lm_steps, perturbed, token_stream, train_flags
from torch import nn

from rwkv_peft.model import (
    VERSIONS,
    build_model,
    config_from_state_dict,
    detect_version,
    load_model,
    read_state_dict,
    save_model,
)
from rwkv_peft.ops import wkv5, wkv6
from rwkv_peft.peft.state import set_time_state
from rwkv_peft.runtime import load_runtime, runtime_logits
from rwkv_peft.tools.init_model import main as init_model_main

TOL = 1e-4  # fp32 on both sides; measured differences are ~1e-6 over 64 tokens and 2 layers
VERSIONS_65 = ("x060", "x052")


pytestmark = pytest.mark.usefixtures("one_thread")


def tokens(n: int = 64, vocab: int = 300, seed: int = 3) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("version", VERSIONS_65)
def test_parity_with_official_runtime(tmp_path: Path, version: str) -> None:
    path = tmp_path / "base.pth"
    save_model(perturbed(version), path)
    toks = tokens()
    model = load_model(path, op="torch")
    assert model.version == version
    ours = model(torch.tensor([toks]))[0].detach()
    runtime = load_runtime(path, version=version)
    seq, rnn = runtime_logits(runtime, toks, "seq"), runtime_logits(runtime, toks, "rnn")
    print(f"{version} max-abs parity: seq {(ours - seq).abs().max():.3g}, rnn {(ours - rnn).abs().max():.3g}")
    assert ours.abs().max() > 1.0  # a real signal, not near-zero logits
    torch.testing.assert_close(ours, seq, atol=TOL, rtol=0)
    torch.testing.assert_close(ours, rnn, atol=TOL, rtol=0)


@pytest.mark.parametrize("version", VERSIONS_65)
def test_state_tuning_hook_matches_runtime(tmp_path: Path, version: str) -> None:
    """A learned ``att.time_state`` (H, N, N) [value, key] is the start state, as the runtime reads it."""
    model = perturbed(version, n_embd=64, head_size=32)  # 2 layers: the runtime sees v5.2 only from block 1 on
    toks = tokens(16)
    plain = model(torch.tensor([toks]))[0].detach()
    g = torch.Generator().manual_seed(5)
    set_time_state(model, [torch.randn(2, 32, 32, generator=g) * 0.3 for _ in model.blocks])
    path = tmp_path / "state.pth"
    save_model(model, path)
    ours = model(torch.tensor([toks]))[0].detach()
    seq = runtime_logits(load_runtime(path, version=version), toks, "seq")
    torch.testing.assert_close(ours, seq, atol=TOL, rtol=0)
    assert (plain - seq).abs().max() > 1e-3  # the state mattered


@pytest.mark.parametrize("version", VERSIONS_65)
def test_state_carries_across_calls(version: str) -> None:
    model = perturbed(version, n_embd=64, head_size=32)
    idx = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    full = model(idx)
    first, state = model.forward_state(idx[:, :13], None)
    assert [tuple(s.shape) for s in state[0]] == [(2, 64), (2, 2, 32, 32), (2, 64)]
    assert state[0][1].dtype == torch.float32
    second, _ = model.forward_state(idx[:, 13:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", VERSIONS_65)
def test_grad_checkpointing_gives_the_same_gradients(version: str) -> None:
    model = perturbed(version, n_embd=64, head_size=32).train()
    idx = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    grads = []
    for cp in (False, True):
        model.zero_grad()
        model.grad_cp = cp
        model(idx).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("version", VERSIONS_65)
def test_round_trip(tmp_path: Path, version: str) -> None:
    path, again = tmp_path / "a.safetensors", tmp_path / "b.pth"
    save_model(perturbed(version, n_embd=64, head_size=32), path, dtype=torch.bfloat16)
    model = load_model(path, dtype=None)
    save_model(model, again)
    a, b = read_state_dict(path), read_state_dict(again)
    assert sorted(a) == sorted(b)  # safetensors stores keys sorted
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("version", VERSIONS_65)
def test_architecture_read_from_tensors(version: str) -> None:
    """Non-default widths (dim_att != n_embd, odd ffn and LoRA widths) come back from the shapes alone."""
    extra = {"d_mix": 16, "d_decay": 48} if version == "x060" else {}
    cfg = VERSIONS[version].config(3, 96, 50, 16, dim_ffn=160, dim_att=64, **extra)
    sd = build_model(cfg, device="meta").state_dict()
    assert detect_version(sd) == version
    assert config_from_state_dict(sd) == cfg
    assert tuple(sd["blocks.0.att.time_faaaa"].shape) == (4, 16)
    assert tuple(sd["blocks.2.att.ln_x.weight"].shape) == (64,)


@pytest.mark.parametrize("version", VERSIONS_65)
def test_init_model_cli(tmp_path: Path, version: str, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "m.pth"
    init_model_main(["--version", version, "--n_layer", "3", "--n_embd", "64", "--head_size", "32",
                     "--vocab_size", "77", "--out", str(path)])
    assert f"RWKV {version} L3 D64" in capsys.readouterr().out
    model = load_model(path, dtype=None)
    cfg = model.cfg
    assert model.version == version
    assert (cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.vocab_size, cfg.dim_ffn) == (3, 64, 32, 77, 224)
    assert model.emb.weight.dtype == torch.bfloat16
    # real init, not plain random: zero output projections and per-layer ramps
    assert torch.count_nonzero(model.blocks[0].att.output.weight) == 0
    assert torch.count_nonzero(model.blocks[1].ffn.value.weight) == 0
    assert not torch.equal(model.blocks[0].att.time_decay, model.blocks[2].att.time_decay)
    assert not torch.equal(model.blocks[0].att.time_faaaa, model.blocks[2].att.time_faaaa)
    # and it trains from there: every weight matrix but the zero-initialised ones gets a gradient
    fp32 = load_model(path)
    fp32(torch.randint(0, 77, (1, 8))).logsumexp(-1).mean().backward()
    assert fp32.blocks[2].att.output.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("version", VERSIONS_65)
def test_peft_targets_and_train_parts(version: str) -> None:
    model = build_model(VERSIONS[version].config(2, 64, 50, 32), device="meta")
    for i, block in enumerate(model.blocks):
        for part, names in model.peft_targets.items():
            for name in names:
                assert isinstance(getattr(block, part).get_submodule(name), nn.Linear), f"blocks.{i}.{part}.{name}"
    parts = {n: model.train_part(n) for n, _ in model.named_parameters()}
    assert parts["emb.weight"] == "emb" and parts["head.weight"] == "head"
    assert parts["blocks.0.ln0.weight"] == parts["blocks.1.att.ln_x.bias"] == "ln"
    assert parts["blocks.1.att.time_decay"] == parts["blocks.0.att.time_faaaa"] == "time"
    assert parts["blocks.1.att.key.weight"] is None and parts["blocks.0.ffn.receptance.weight"] is None
    small = [n for n, p in model.named_parameters() if p.dim() < 2 or "time_" in n]
    assert all(parts[n] in ("ln", "time") for n in small), [n for n in small if parts[n] is None]


def test_wkv5_is_wkv6_with_a_constant_decay() -> None:
    g = torch.Generator().manual_seed(0)
    B, T, H, N = 2, 7, 2, 8
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w, u = torch.randn(H, N, generator=g), torch.randn(H, N, generator=g)
    s0 = torch.randn(B, H, N, N, generator=g)
    y5, s5 = wkv5(r, w, k, v, u, state=s0, op="torch")
    y6, s6 = wkv6(r, w.expand(B, T, H, N), k, v, u, state=s0, op="torch")
    torch.testing.assert_close(y5, y6)
    torch.testing.assert_close(s5, s6)
    # one step by hand: y = (S + u k v^T)^T r per head, in the state's [value, key] layout
    y1, s1 = wkv6(r[:, :1], w.expand(B, 1, H, N), k[:, :1], v[:, :1], u, state=s0, op="torch")
    kv = v[:, 0, :, :, None] * k[:, 0, :, None, :]
    torch.testing.assert_close(y1[:, 0], ((s0 + u[:, None, :] * kv) @ r[:, 0, :, :, None]).squeeze(-1))
    torch.testing.assert_close(s1, s0 * torch.exp(-torch.exp(w))[:, None, :] + kv)


def test_old_generations_refused() -> None:
    rwkv4 = {"emb.weight": torch.zeros(4, 4), "blocks.0.att.time_first": torch.zeros(4),
             "blocks.0.att.time_mix_k": torch.zeros(1, 1, 4)}
    with pytest.raises(ValueError, match="RWKV-4 / v5.0 / v5.1 checkpoint.*not supported"):
        load_model(rwkv4)


@pytest.mark.parametrize(("version", "key", "shape", "match"), [
    ("x060", "blocks.0.att.time_faaaa", (3, 32), r"bad\.pth: blocks\.0\.att\.time_faaaa is \(3, 32\)"),
    ("x052", "blocks.1.att.gate.weight", (64, 10), r"RWKV x052 checkpoint.*wrong shape: blocks\.1\.att\.gate\.weight"),
])
def test_bad_shape_names_the_key(tmp_path: Path, version: str, key: str, shape: tuple, match: str) -> None:
    """Inconsistent heads (x060) or a mis-shaped linear (x052): one error naming the file or the key."""
    sd = perturbed(version, n_embd=64, head_size=32).state_dict()
    sd[key] = torch.zeros(shape)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=match):
        load_model(tmp_path / "bad.pth")


@pytest.mark.parametrize("version", VERSIONS_65)
def test_miss_run_lowers_loss_and_merged_file_matches_in_runtime(tmp_path: Path, version: str) -> None:
    """MiSS on every x060/x052 target (gate and ffn.receptance included), trained, saved, merged, run."""
    import json

    from rwkv_peft.merge import merge_adapter
    from rwkv_peft.peft.inject import adapter_config, apply_peft, parse_peft_config, trainable_state_dict

    base = tmp_path / "base.pth"
    save_model(perturbed(version, n_embd=64, head_size=32), base)
    model = load_model(base, op="torch")
    cfg = parse_peft_config("miss", '{"r": 16, "mode": "balance", "parts": ["att", "ffn"]}')
    print(apply_peft(model, "miss", cfg))
    adapted = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert {"blocks.1.att.gate", "blocks.0.ffn.receptance"} <= adapted and len(adapted) == 2 * 8

    losses = lm_steps(model, 12, lr=3e-3, shape=(2, 25), seed=7, optim=torch.optim.Adam)
    print(f"{version} MiSS loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < losses[0] - 0.1

    out = tmp_path / "out"
    out.mkdir()
    torch.save(trainable_state_dict(model), out / "rwkv-final.pth")
    (out / "adapter_config.json").write_text(json.dumps(adapter_config(model, "miss", cfg)))
    merged = merge_adapter(base, out / "rwkv-final.pth", tmp_path / "merged.pth")
    toks = tokens(24)
    with torch.no_grad():
        ours = model.eval()(torch.tensor([toks]))[0]
    theirs = runtime_logits(load_runtime(merged, version=version), toks, "seq")
    print(f"{version} merged (runtime) vs adapted max-abs: {(ours - theirs).abs().max():.3g}")
    torch.testing.assert_close(theirs, ours, atol=TOL, rtol=0)
    with torch.no_grad():
        base_logits = load_model(base, op="torch")(torch.tensor([toks]))[0]
    assert (base_logits - ours).abs().max() > 1e-2  # the adapter changed the model


@pytest.mark.parametrize(("method", "spec"), [("miss", '{"r": 16, "mode": "bat_col"}'),
                                              ("lora", '{"r": 4, "alpha": 8}'),
                                              ("pissa", '{"r": 4, "alpha": 4}')])
def test_other_methods_merge_exactly_on_x060(tmp_path: Path, method: str, spec: str) -> None:
    """Bat, LoRA and PiSSA through the same version-agnostic code: merged checkpoint == adapted model."""
    import json

    from rwkv_peft.merge import merge_adapter
    from rwkv_peft.peft.inject import adapter_config, apply_peft, parse_peft_config, trainable_state_dict

    base = tmp_path / "base.pth"
    save_model(perturbed("x060", n_embd=64, head_size=32), base)
    model = load_model(base, op="torch")
    cfg = parse_peft_config(method, spec)
    apply_peft(model, method, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    out = tmp_path / "out"
    out.mkdir()
    torch.save(trainable_state_dict(model), out / "rwkv-final.pth")
    (out / "adapter_config.json").write_text(json.dumps(adapter_config(model, method, cfg)))
    merged = load_model(merge_adapter(base, out / "rwkv-final.pth", tmp_path / "merged.pth"), op="torch")
    idx = torch.tensor([tokens(16)])
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), model.eval()(idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("version", VERSIONS_65)
@pytest.mark.parametrize("op", ["torch", "cpu"])
def test_gradients_flow_through_carried_state(version: str, op: str) -> None:
    """Two chunks with the state carried (not detached) give the full sequence's gradients (infctx)."""
    model = perturbed(version, n_embd=64, head_size=32)
    model.set_op(op)
    idx = torch.randint(0, 300, (2, 21), generator=torch.Generator().manual_seed(2))
    model(idx).logsumexp(-1).sum().backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    first, state = model.forward_state(idx[:, :8], None)
    second, _ = model.forward_state(idx[:, 8:], state)
    (first.logsumexp(-1).sum() + second.logsumexp(-1).sum()).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("version", VERSIONS_65)
def test_trainer_learns_and_its_merged_adapter_runs_in_runtime(tmp_path: Path, version: str) -> None:
    """The DeepSpeed trainer on an x060/x052 base (MiSS), then merge_adapter, then the `rwkv` runtime."""
    import numpy as np

    from rwkv_peft.merge import adapted_model, merge_adapter
    from rwkv_peft.train import main

    base = tmp_path / "base.pth"
    # 2 layers: the runtime recognises v5.2 only from a time_decay key after an ln_x key (block 1's)
    save_model(perturbed(version, n_layer=2, n_embd=64, vocab=256, head_size=32, seed=3), base)
    ids = token_stream(tmp_path / "data", 256, 3000)
    out = tmp_path / "out"
    main(train_flags({"base": base, "data": tmp_path / "data", "n_tokens": len(ids)}, out, op="cpu"))
    loss = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()
            if '"loss"' in line]
    print(f"{version} trainer loss {loss[0]:.3f} -> {loss[-1]:.3f}")
    assert np.mean(loss[-2:]) < np.mean(loss[:2]) - 0.1
    assert json.loads((out / "adapter_config.json").read_text())["base"]["version"] == version

    merged = merge_adapter(base, out / "rwkv-final.pth", tmp_path / "merged.pth")
    toks = ids[:20]
    with torch.no_grad():
        ours = adapted_model(base, out / "rwkv-final.pth")(torch.tensor([toks]))[0]
    theirs = runtime_logits(load_runtime(merged, version=version), toks, "rnn")
    torch.testing.assert_close(theirs, ours, atol=TOL, rtol=0)
