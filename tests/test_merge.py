"""Merging adapters into the base checkpoint: exact against the adapted model and the `rwkv` runtime.

Tolerances: fp32 merged vs adapted model 1e-5 (the adapted forward never forms W + dW, so the two
differ only by fp32 summation order); the runtime 1e-4 (its own kernels and op order); bf16 one
rounding of the fp32 result (2^-8 relative).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import perturbed_model

from rwkv_peft.merge import main, merge_adapter, merge_state_dict, unmerge_adapter, verify_merged
from rwkv_peft.model import load_model, save_model
from rwkv_peft.peft.inject import adapter_config, apply_peft, parse_peft_config, trainable_state_dict
from rwkv_peft.peft.miss import miss_delta
from rwkv_peft.runtime import load_runtime, runtime_logits

TOKENS = [3, 17, 250, 9, 42, 1, 77, 128]
CASES = {  # name: (method, config JSON); r=48 leaves a partial shard on the 128-wide inputs
    "balance": ("miss", '{"r": 48, "mode": "balance", "train_parts": ["ln"]}'),
    "mini": ("miss", '{"r": 16, "mode": "mini", "mini_r": 4}'),
    "bat_row": ("miss", '{"r": 16, "mode": "bat_row"}'),
    "bat_col": ("miss", '{"r": 32, "mode": "bat_col"}'),
    "lora": ("lora", '{"r": 8, "alpha": 16}'),
    "pissa": ("pissa", '{"r": 8, "alpha": 8}'),
}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([TOKENS]))[0]


@pytest.fixture(scope="module")
def base_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base") / "base.pth"
    save_model(perturbed_model(), path)
    return path


def _train(base_file: Path, out: Path, case: str, seed: int = 0) -> tuple[Path, torch.Tensor]:
    """An adapter as the trainer saves it (rwkv-final.pth + adapter_config.json) and the adapted logits."""
    method, text = CASES[case]
    model = load_model(base_file, op="torch")
    cfg = parse_peft_config(method, text)
    apply_peft(model, method, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(trainable_state_dict(model), out / "rwkv-final.pth")
    (out / "adapter_config.json").write_text(json.dumps(adapter_config(model, method, cfg)))
    return out / "rwkv-final.pth", _logits(model.eval())


@pytest.fixture(scope="module")
def trained(base_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.Tensor]]:
    return {case: _train(base_file, tmp_path_factory.mktemp(case), case) for case in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_merged_equals_adapted_and_runtime(case: str, base_file: Path, trained: dict, tmp_path: Path) -> None:
    adapter, adapted = trained[case]
    merged = merge_adapter(base_file, adapter, tmp_path / "merged.pth")
    base_sd = torch.load(base_file, weights_only=True)
    merged_sd = torch.load(merged, weights_only=True)
    assert list(merged_sd) == list(base_sd)
    assert all(merged_sd[k].dtype == v.dtype and merged_sd[k].shape == v.shape for k, v in base_sd.items())
    assert not torch.equal(merged_sd["blocks.1.ffn.value.weight"], base_sd["blocks.1.ffn.value.weight"])
    ours = _logits(load_model(merged, op="torch"))
    assert (ours - _logits(load_model(base_file, op="torch"))).abs().max() > 1e-3  # the adapter matters
    assert (ours - adapted).abs().max() <= 1e-5
    runtime = runtime_logits(load_runtime(merged), TOKENS, "seq")
    assert (runtime - adapted).abs().max() <= 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_unmerge_recovers_base(case: str, base_file: Path, trained: dict, tmp_path: Path) -> None:
    adapter, _ = trained[case]
    if case == "balance":  # it also replaced the ln tensors, which cannot be undone
        with pytest.raises(ValueError, match="cannot be recovered"):
            unmerge_adapter(base_file, adapter, tmp_path / "x.pth")
        assert list(tmp_path.iterdir()) == []
        sd = torch.load(adapter, weights_only=True)
        adapter = tmp_path / "a" / "rwkv-final.pth"
        adapter.parent.mkdir()
        torch.save({k: v for k, v in sd.items() if k.endswith(".miss")}, adapter)
        (adapter.parent / "adapter_config.json").write_text('{"method": "miss", "mode": "balance"}')
    merged = merge_adapter(base_file, adapter, tmp_path / "merged.pth")
    back = unmerge_adapter(merged, adapter, tmp_path / "back.safetensors")
    from safetensors.torch import load_file

    base_sd, back_sd = torch.load(base_file, weights_only=True), load_file(back)
    assert list(back_sd) == list(base_sd)
    assert max((back_sd[k] - v).abs().max().item() for k, v in base_sd.items()) <= 1e-5


def test_bf16_base_is_rounded_once(base_file: Path, trained: dict, tmp_path: Path) -> None:
    sd = torch.load(base_file, weights_only=True)
    save_model(sd, tmp_path / "bf16.pth", dtype=torch.bfloat16)
    for case in ("balance", "bat_col"):
        adapter, _ = trained[case]
        merged = torch.load(merge_adapter(tmp_path / "bf16.pth", adapter, tmp_path / f"{case}.pth"), weights_only=True)
        base16 = torch.load(tmp_path / "bf16.pth", weights_only=True)
        ad = torch.load(adapter, weights_only=True)
        for k, w in base16.items():
            assert merged[k].dtype == torch.bfloat16
            linear = k.removesuffix(".weight")
            if f"{linear}.miss" in ad:
                ref = w.double() + miss_delta(w.float(), ad[f"{linear}.miss"], case).double()
            elif k in ad:
                ref = ad[k].double()
            else:
                assert torch.equal(merged[k], w)
                continue
            err = (merged[k].double() - ref).abs()
            assert bool((err <= 2.0**-8 * ref.abs() + 1e-30).all()), k


@pytest.mark.parametrize("case", ["balance", "bat_col"])
def test_rwkv_peft_disha_adapter_merges_identically(case: str, base_file: Path, trained: dict, tmp_path: Path) -> None:
    adapter, _ = trained[case]
    ours = merge_adapter(base_file, adapter, tmp_path / "ours.pth")
    foreign = tmp_path / "foreign" / "rwkv-0.pth"  # no adapter_config.json: the tensor's rank says the mode
    foreign.parent.mkdir()
    sd = torch.load(adapter, weights_only=True)
    torch.save({k.replace(".miss", ".disha"): v for k, v in sd.items()}, foreign)
    theirs = merge_adapter(base_file, foreign, tmp_path / "theirs.pth")
    assert ours.read_bytes() == theirs.read_bytes()


def _bad(tmp_path: Path, base_file: Path, sd: dict, config: dict | None) -> Path:
    d = tmp_path / "adapter"
    d.mkdir(exist_ok=True)
    torch.save(sd, d / "rwkv-1.pth")
    if config is not None:
        (d / "adapter_config.json").write_text(json.dumps(config))
    return d / "rwkv-1.pth"


@pytest.mark.parametrize(
    "problem, match",
    [
        ("architecture", "another architecture"),
        ("no_base", "has no base tensor"),
        ("shape", "does not fit"),
        ("bat_r", "r must divide"),
        ("nan", "NaN/inf"),
        ("no_dir", "does not exist"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_no_file(
    problem: str, match: str, base_file: Path, trained: dict, tmp_path: Path
) -> None:
    sd = torch.load(trained["bat_col"][0], weights_only=True)
    config = json.loads((trained["bat_col"][0].parent / "adapter_config.json").read_text())
    output = tmp_path / "out" / "merged.pth"
    output.parent.mkdir()
    if problem == "architecture":
        config["base"]["n_embd"] = 256
    elif problem == "no_base":
        sd["blocks.7.att.key.miss"] = sd["blocks.0.att.key.miss"]
    elif problem == "shape":
        sd["blocks.0.ffn.key.miss"] = torch.zeros(16, 32, 32)  # ffn.key is 512x128: needs (128/32, 32, 32)
    elif problem == "bat_r":
        sd = {"blocks.0.att.key.miss": torch.zeros(2, 48, 48)}  # 48 does not divide 128
    elif problem == "nan":
        sd["blocks.1.ffn.value.miss"][0, 0, 0] = float("nan")
    elif problem == "no_dir":
        output = tmp_path / "missing" / "merged.pth"
    adapter = _bad(tmp_path, base_file, sd, config)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        merge_adapter(base_file, adapter, output)
    assert list(output.parent.iterdir()) == [] if output.parent.exists() else True
    with pytest.raises(SystemExit, match=match):  # the CLI says the same in one line
        main(["--base_model", str(base_file), "--peft_checkpoint", str(adapter), "--output", str(output), "--quiet"])


def test_streamed_file_is_what_torch_save_writes(base_file: Path, trained: dict, tmp_path: Path) -> None:
    adapter, _ = trained["bat_row"]
    ours = merge_adapter(base_file, adapter, tmp_path / "merged.pth")
    in_memory = merge_state_dict(torch.load(base_file, weights_only=True), torch.load(adapter, weights_only=True),
                                 json.loads((adapter.parent / "adapter_config.json").read_text()))
    with open(tmp_path / "saved.pth", "wb") as f:  # a file object: torch names the archive "archive" too
        torch.save(in_memory, f)
    assert ours.read_bytes() == (tmp_path / "saved.pth").read_bytes()


def test_verify_in_runtime_prints_diff_and_answer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = tmp_path / "base.pth"  # World vocab, so the demo prompt tokenizes
    save_model(perturbed_model(n_layer=1, n_embd=64, vocab=65536), base)
    adapter = _train_demo(base, tmp_path / "miss")
    merged = merge_adapter(base, adapter, tmp_path / "merged.pth")
    assert verify_merged(merged, base, adapter, n_tokens=4) <= 1e-4
    out = capsys.readouterr().out
    assert "max |logit diff|" in out and "User: " in out and "rwkv runtime, greedy:" in out


def _train_demo(base: Path, out: Path) -> Path:
    model = load_model(base, op="torch")
    cfg = parse_peft_config("miss", '{"r": 16, "mode": "balance"}')
    apply_peft(model, "miss", cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    out.mkdir()
    torch.save(trainable_state_dict(model), out / "rwkv-final.pth")
    (out / "adapter_config.json").write_text(json.dumps(adapter_config(model, "miss", cfg)))
    return out / "rwkv-final.pth"
