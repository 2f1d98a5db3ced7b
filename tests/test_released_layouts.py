"""Released RWKV-7/6/5 layouts (tests/released_layouts.py, written from the published key lists):
loaded with parity to the `rwkv` runtime, trained with MiSS, merged, unmerged and saved with
exactly their own key set, file order, shapes and dtypes.

Tolerances: fp32 on both sides 1e-4 (measured ~1e-5: the runtime's kernels and op order). A bf16
merged file holds W + dW rounded once to bf16 (2^-9 relative per weight), which moves these
unit-scale logits by up to a few 1e-2; BF16_LOGITS allows that and is still far below the
adapter's own effect, which each test checks first.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_load_errors, lm_steps
from released_layouts import LAYOUTS, X070_0B1, key_shapes, write_checkpoint

from rwkv_peft.merge import adapted_model, merge_adapter, unmerge_adapter
from rwkv_peft.model import load_model, save_model
from rwkv_peft.peft import adapter_config, apply_peft, parse_peft_config, trainable_state_dict
from rwkv_peft.runtime import load_runtime, runtime_logits
from rwkv_peft.tools.init_model import main as init_model_main

TOL = 1e-4
BF16_LOGITS = 0.1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CASES = [(name, dt) for name in LAYOUTS for dt in ("fp32", "bf16")]
FP16_CASES = [("x070_released", "fp16"), ("x060_world", "fp16"), ("x052_h_n_1", "fp16")]  # loading and saving


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    d = tmp_path_factory.mktemp("released")
    out = {}
    for name, dt in CASES + FP16_CASES:
        out[name, dt] = d / f"{name}_{dt}.pth"
        write_checkpoint(LAYOUTS[name], out[name, dt], DTYPES[dt])
    return out


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True, mmap=True)


def stored(sd: Path | dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Keys in file order with shapes and dtypes: what 'the same layout' means."""
    return [(k, tuple(v.shape), v.dtype) for k, v in (load(sd) if isinstance(sd, Path) else sd).items()]


def tokens(vocab: int, n: int = 24, seed: int = 3) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def runtime_file(path: Path, version: str, dt: str, tmp_path: Path) -> Path:
    """The file the runtime is given for parity: ``path`` itself, except for bf16/fp16 x060/x052.

    The runtime's v5/v6 loader layer-norms the embedding in the stored dtype, rounding it to 16
    bits (its x070 loader converts first). There it gets the same values upcast to fp32 (exact), so
    both sides compute in fp32 on identical weights.
    """
    if version == "x070" or dt == "fp32":
        return path
    up = tmp_path / f"{path.stem}_fp32.pth"
    torch.save({k: v.float() for k, v in load(path).items()}, up)
    return up


@torch.no_grad()
def logits(model: torch.nn.Module, toks: list[int]) -> torch.Tensor:
    return model(torch.tensor([toks]))[0]


@pytest.mark.parametrize("name, dt", CASES + FP16_CASES)
def test_loads_with_runtime_parity(name: str, dt: str, files: dict, tmp_path: Path) -> None:
    version, _, dims, layer0_v = LAYOUTS[name]
    path = files[name, dt]
    model = load_model(path, op="torch")
    cfg = model.cfg
    assert (model.version, cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.vocab_size, cfg.dim_ffn) == (
        version, dims["L"], dims["C"], dims["N"], dims["V"], dims["F"])
    if version == "x070":
        assert (cfg.d_decay, cfg.d_aaa, cfg.d_mv, cfg.d_gate) == (dims["W"], dims["A"], dims["M"], dims["G"])
    names = {n for n, _ in model.named_parameters()}
    assert names == set(key_shapes(LAYOUTS[name]))  # no dead tensors: layer-0 v* only when the file has them
    assert ("blocks.0.att.v1" in names) == layer0_v

    toks = tokens(dims["V"])
    ours = logits(model, toks)
    runtime = load_runtime(runtime_file(path, version, dt, tmp_path), version)
    seq, rnn = runtime_logits(runtime, toks, "seq"), runtime_logits(runtime, toks, "rnn")
    print(f"{name} {dt}: max |logit diff| vs rwkv runtime: seq {(ours - seq).abs().max():.2e}, "
          f"rnn {(ours - rnn).abs().max():.2e}")
    assert ours.abs().max() > 1.0  # a real signal, not near-zero logits
    torch.testing.assert_close(ours, seq, atol=TOL, rtol=0)
    torch.testing.assert_close(ours, rnn, atol=TOL, rtol=0)


def train_miss(path: Path, out: Path, mode: str, steps: int = 3, **extra) -> tuple[Path, torch.nn.Module]:
    """MiSS trained the trainer's way (fp32 model, apply_peft, AdamW on the LM loss, adapter + config)."""
    model = load_model(path, op="torch")
    cfg = parse_peft_config("miss", json.dumps({"r": 32, "mode": mode, **extra}))
    apply_peft(model, "miss", cfg)
    losses = lm_steps(model, steps)
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith(".miss"))
    assert steps == 1 or losses[-1] < losses[0], losses
    out.mkdir(parents=True)
    torch.save(trainable_state_dict(model), out / "rwkv-final.pth")
    (out / "adapter_config.json").write_text(json.dumps(adapter_config(model, "miss", cfg)))
    return out / "rwkv-final.pth", model.eval()


@pytest.mark.parametrize("mode", ["balance", "bat_col"])
@pytest.mark.parametrize("name, dt", CASES)
def test_miss_trains_merges_and_unmerges(name: str, dt: str, mode: str, files: dict, tmp_path: Path) -> None:
    version, _, dims, _ = LAYOUTS[name]
    base = files[name, dt]
    adapter, adapted = train_miss(base, tmp_path / "miss", mode)
    toks = tokens(dims["V"])
    want = logits(adapted, toks)

    merged = merge_adapter(base, adapter, tmp_path / "merged.pth")
    a, m = load(base), load(merged)
    assert stored(m) == stored(a)
    ours = logits(load_model(m, op="torch"), toks)
    effect = (ours - logits(load_model(a, op="torch"), toks)).abs().max()
    runtime = runtime_logits(load_runtime(runtime_file(merged, version, dt, tmp_path), version), toks, "seq")
    diff = (runtime - want).abs().max()
    print(f"{name} {dt} {mode}: adapter moves logits by {effect:.3f}; merged file in the runtime "
          f"vs adapted model {diff:.2e}")
    assert effect > 10 * BF16_LOGITS
    assert diff <= (TOL if dt == "fp32" else BF16_LOGITS)
    torch.testing.assert_close(runtime, ours, atol=TOL, rtol=0)  # the merged file itself: exact parity

    b = load(unmerge_adapter(merged, adapter, tmp_path / "back.pth"))
    assert stored(b) == stored(a)
    for k in a:  # fp32: summation order only; bf16: W + dW rounded once, then back to W: ~1 ulp of either
        scale = max(a[k].abs().max(), m[k].abs().max()).item()
        tol = 1e-5 if dt == "fp32" else 2.0**-7 * scale
        assert (b[k].float() - a[k].float()).abs().max() <= tol, k


@pytest.mark.parametrize("name, dt", CASES + FP16_CASES)
def test_saved_and_train_parts_keep_the_key_set(name: str, dt: str, files: dict, tmp_path: Path) -> None:
    base = files[name, dt]
    a = load(base)
    save_model(load_model(a, dtype=None), tmp_path / "kept.pth")  # stored dtypes kept
    save_model(load_model(a), tmp_path / "fp32.pth")  # loaded in fp32: written back in the file's dtypes
    for again in (load(tmp_path / "kept.pth"), load(tmp_path / "fp32.pth")):
        assert stored(again) == stored(a) and all(torch.equal(a[k], again[k]) for k in a)

    model = load_model(a, op="torch")
    parts = sorted({model.train_part(k) for k in a} - {None})  # emb, head, ln, time (+ deepembed: RWKV-7a)
    apply_peft(model, "miss", parse_peft_config("miss", json.dumps({"r": 32, "train_parts": parts})))
    sd = trainable_state_dict(model)
    plain = {k: tuple(v.shape) for k, v in sd.items() if not k.endswith(".miss")}
    want = {k: s for k, s, _ in stored(a) if model.train_part(k) is not None}
    assert plain == want  # every key of the chosen groups, in the base's shapes, and nothing else
    assert not {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"} & set(sd)  # unused: never trained
    with pytest.raises(ValueError, match="differ from the checkpoint"):
        save_model(model, tmp_path / "adapted.pth")  # adapter tensors are not base keys


@pytest.mark.parametrize("name", ["x070_layer0_v", "x052_h_n_1"])
def test_train_parts_adapter_merges_and_verifies(name: str, files: dict, tmp_path: Path) -> None:
    """train_parts tensors go out in the base's stored shapes; merge and --verify's adapted model agree."""
    base = files[name, "fp32"]
    adapter, adapted = train_miss(base, tmp_path / "miss", "balance", train_parts=["time", "ln"])
    layout = {k: s for k, s, _ in stored(base)}
    saved = load(adapter)
    assert all(layout[k] == tuple(v.shape) for k, v in saved.items() if not k.endswith(".miss"))
    parts = {k for k in layout if adapted.train_part(k) in ("time", "ln")}
    assert {k for k in saved if not k.endswith(".miss")} == parts
    merged = merge_adapter(base, adapter, tmp_path / "merged.pth")
    assert stored(merged) == stored(base)
    toks = tokens(LAYOUTS[name][2]["V"])
    want = logits(adapted, toks)
    torch.testing.assert_close(logits(adapted_model(base, adapter), toks), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(load_model(merged, op="torch"), toks), want, atol=1e-5, rtol=0)


def test_unknown_layout_is_one_error_naming_the_file_and_problem(files: dict, tmp_path: Path) -> None:
    sd = torch.load(files["x070_released", "fp32"], weights_only=True)
    cases = {
        "half_v.pth": ({**sd, "blocks.0.att.v0": sd["blocks.1.att.v0"]}, r"half_v\.pth.*missing: blocks\.0\.att\.v1"),
        "ragged.pth": ({**sd, "blocks.1.att.w1": torch.zeros(128, 48)},
                       r"ragged\.pth.*wrong shape: blocks\.1\.att\.w1 \(128, 48\) \(expected \(128, 32\)\)"),
        "extra.pth": ({**sd, "blocks.0.ffn.receptance.weight": torch.zeros(128, 128)},
                      r"extra\.pth.*unexpected: blocks\.0\.ffn\.receptance\.weight"),
    }
    assert_load_errors(cases, tmp_path)


def test_init_model_writes_the_released_x070_layout(tmp_path: Path) -> None:
    """init_model's key list, order aside, and shapes equal the published ones for its n_embd."""
    path = tmp_path / "init.pth"
    init_model_main(["--n_layer", "2", "--n_embd", "768", "--vocab_size", "64", "--out", str(path)])
    _, block, dims, layer0_v = X070_0B1
    want = key_shapes(("x070", block, {**dims, "L": 2, "V": 64}, layer0_v))
    got = {k: s for k, s, _ in stored(path)}
    assert got == want
    assert {d for _, _, d in stored(path)} == {torch.bfloat16}


def test_released_0b1_shape(tmp_path: Path) -> None:
    """The released 0.1B x070 shape in bf16: load, key-set round trip, one MiSS step, merge."""
    base = tmp_path / "0b1.pth"
    write_checkpoint(X070_0B1, base, torch.bfloat16)
    layout = stored(base)
    model = load_model(base, dtype=None)
    assert (model.cfg.d_decay, model.cfg.d_aaa, model.cfg.d_mv, model.cfg.d_gate) == (64, 64, 32, 128)
    save_model(model, tmp_path / "again.pth")
    assert stored(tmp_path / "again.pth") == layout
    del model
    adapter, _ = train_miss(base, tmp_path / "miss", "balance", steps=1)
    assert stored(merge_adapter(base, adapter, tmp_path / "merged.pth")) == layout
