"""Merging adapters into the base checkpoint: exact against the adapted model and the `rwkv` runtime.

Tolerances: fp32 merged vs adapted model 1e-5 (the adapted forward never forms W + dW, so the two
differ only by fp32 summation order); the runtime 1e-4 (its own kernels and op order); bf16 one
rounding of the fp32 result (2^-8 relative).
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from pathlib import Path

import pytest
import torch
from helpers import perturbed_model

from rwkv_peft.merge import main, merge_adapter, merge_state_dict, plan_edits, unmerge_adapter, verify_merged
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
COPY_CASES = CASES | {"dora": ("dora", '{"r": 8, "alpha": 16}')}  # DoRA folds but cannot unmerge


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
    method, text = COPY_CASES[case]
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


def _save_base(sd: dict, path: Path, dtype: torch.dtype) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.to(dtype) for k, v in sd.items()}, path)
    else:
        save_model(sd, path, dtype=dtype)
    return path


@pytest.mark.parametrize("base_kind", ["fp32.pth", "bf16.pth", "bf16.safetensors"])
@pytest.mark.parametrize("case", list(COPY_CASES))
def test_byte_copied_merge_equals_decoded_merge(
    case: str, base_kind: str, base_file: Path, trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Untouched tensors go from the input file to the output as bytes; every tensor, merged and unmerged,
    .pth and .safetensors, equals the in-memory merge's (which decodes and re-encodes everything)."""
    from safetensors.torch import load_file

    from rwkv_peft.model.stream import _Copier

    copied = []
    for name in ("_copy_in_kernel", "_copy_through"):  # the two ways a span reaches the output
        original = getattr(_Copier, name)
        monkeypatch.setattr(_Copier, name,
                            lambda self, span, *a, f=original: (copied.append(span), f(self, span, *a))[1])

    def load(p: Path) -> dict:
        return load_file(p) if p.suffix == ".safetensors" else torch.load(p, weights_only=True)

    adapter = trained[case][0] if case in trained else _train(base_file, tmp_path / case, case)[0]
    cfg = json.loads((adapter.parent / "adapter_config.json").read_text())
    ad = torch.load(adapter, weights_only=True)
    dtype = torch.bfloat16 if base_kind.startswith("bf16") else torch.float32
    base = _save_base(torch.load(base_file, weights_only=True), tmp_path / f"base.{base_kind.split('.')[1]}", dtype)
    base_sd = load(base)
    untouched = set(base_sd) - set(plan_edits(base_sd, ad, cfg))
    want = merge_state_dict(base_sd, ad, cfg)
    assert all(torch.equal(base_sd[k], v) for k, v in load(base).items())  # folds in place only on their own copy
    folded = tmp_path / "folded" / "rwkv-final.pth"  # unmerge: without train_parts' replaced tensors
    folded.parent.mkdir()
    folded_sd = {k: v for k, v in ad.items() if k not in base_sd}
    torch.save(folded_sd, folded)
    (folded.parent / "adapter_config.json").write_text(json.dumps(cfg))
    for suffix in (".pth", ".safetensors"):
        copied.clear()
        merged = load(merge_adapter(base, adapter, tmp_path / f"merged{suffix}"))
        assert len(copied) == len(untouched) > 0 and {s.path for s in copied} == {base}
        assert sorted(merged) == sorted(want) and (suffix != ".pth" or list(merged) == list(want))  # .pth keeps order
        assert all(merged[k].dtype == v.dtype and torch.equal(merged[k], v) for k, v in want.items())
        if base_kind != "bf16.pth" or case == "dora":  # unmerge: every mode and output format once
            continue
        copied.clear()
        back = load(unmerge_adapter(tmp_path / f"merged{suffix}", folded, tmp_path / f"back{suffix}"))
        assert len(copied) == len(set(base_sd) - set(plan_edits(base_sd, folded_sd, cfg, unmerge=True)))
        want_back = merge_state_dict(merged, folded_sd, cfg, unmerge=True)
        assert sorted(back) == sorted(want_back)
        assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in want_back.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mapped_reads_write_the_same_bytes_and_a_truncated_base_is_one_line(
    dtype: torch.dtype, base_file: Path, trained: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Edited tensors read through a private mapping (MAP_MIN lowered: all of them) give the chunked
    reads' file byte for byte; a base cut short while the merge reads it is one error line, no file."""
    from rwkv_peft.model import stream

    base = _save_base(torch.load(base_file, weights_only=True), tmp_path / "base.pth", dtype)
    adapter, real = trained["balance"][0], stream.read_mapped
    used = []
    monkeypatch.setattr(stream, "read_mapped", lambda *a: used.append(real(*a)) or used[-1])
    written = {}
    for name, limit in (("chunked", 1 << 62), ("mapped", 0)):
        monkeypatch.setattr(stream, "MAP_MIN", limit)
        written[name] = merge_adapter(base, adapter, tmp_path / f"{name}.pth").read_bytes()
    assert used and all(used) and written["mapped"] == written["chunked"]

    lock, cut = threading.Lock(), []

    def cut_then_read(span, *a):  # the file shrinks under the merge before its first read of a matrix
        with lock:
            if not cut and span.nbytes > 2 * mmap.PAGESIZE:  # pages wholly past the cut: SIGBUS, not zeros
                cut.append(os.truncate(span.path, span.offset + 16))
        return real(span, *a)

    monkeypatch.setattr(stream, "read_mapped", cut_then_read)
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["--base_model", str(base), "--peft_checkpoint", str(adapter), "--output",
              str(tmp_path / "out" / "merged.pth"), "--quiet"])
    assert f"{base}: truncated" in str(e.value) and "\n" not in str(e.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_result_that_overflows_the_stored_dtype_is_refused(base_file: Path, trained: dict, tmp_path: Path) -> None:
    """Finite in fp32 but not in an fp16 base (max 65504): caught by the check after the cast, no file."""
    base = _save_base(torch.load(base_file, weights_only=True), tmp_path / "fp16.pth", torch.float16)
    adapter, _ = trained["mini"]
    big = tmp_path / "big" / "rwkv-final.pth"
    big.parent.mkdir()
    torch.save({k: v * 1e7 for k, v in torch.load(adapter, weights_only=True).items()}, big)
    (big.parent / "adapter_config.json").write_text((adapter.parent / "adapter_config.json").read_text())
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="would contain NaN/inf after merging .*check the adapter's values"):
        merge_adapter(base, big, tmp_path / "out" / "merged.pth")
    assert list((tmp_path / "out").iterdir()) == []
    merge_adapter(base, adapter, tmp_path / "out" / "merged.pth")  # the same base with a sane adapter: fine


def test_the_merge_log_names_each_edit_once_in_the_files_order(base_file: Path, trained: dict, tmp_path: Path) -> None:
    """Folds run on worker threads and may finish out of order; the log is written from the writer's side."""
    adapter, _ = trained["bat_row"]
    lines: list[str] = []
    merge_adapter(base_file, adapter, tmp_path / "merged.pth", log=lines.append)
    logged = [line.rsplit(" -> ", 1)[1] for line in lines]
    base, ad = torch.load(base_file, weights_only=True), torch.load(adapter, weights_only=True)
    assert len(logged) == len(set(logged)) == len(plan_edits(base, ad, {"mode": "bat_row"})) > 1
    assert logged == [k for k in base if k in logged]


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


@pytest.mark.parametrize("key", ["emb.weight", "blocks.1.att.key.weight"])  # copied as bytes / read and merged
def test_bit_rot_in_the_base_fails_the_merge_and_leaves_no_file(key: str, base_file: Path, trained: dict,
                                                                tmp_path: Path) -> None:
    """No CRC pass before the stream: every record's CRC is checked as it is copied or read."""
    from rwkv_peft.model.stream import tensor_spans

    span = tensor_spans(base_file)[key]
    raw = bytearray(base_file.read_bytes())
    raw[span.offset + span.nbytes // 2] ^= 0x10
    (tmp_path / "rotten.pth").write_bytes(raw)
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["--base_model", str(tmp_path / "rotten.pth"), "--peft_checkpoint", str(trained["balance"][0]),
              "--output", str(tmp_path / "out" / "merged.pth"), "--quiet"])
    assert "rotten.pth" in str(e.value) and "CRC-32 mismatch" in str(e.value) and "\n" not in str(e.value)
    assert list((tmp_path / "out").iterdir()) == []
