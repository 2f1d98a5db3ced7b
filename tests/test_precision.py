"""--precision: what auto picks on faked CPU flags, and bf16 mixed-precision training against fp32."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_run_files, train_flags

from rwkv_peft import precision
from rwkv_peft.precision import resolve_precision
from rwkv_peft.train import main

EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n"
OLD_XEON = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"


@pytest.mark.parametrize("text, want, fact", [(EPYC, "bf16", "avx512_bf16"), (SAPPHIRE, "bf16", "amx_bf16"),
                                              (OLD_XEON, "fp32", "neither avx512_bf16 nor amx_bf16")])
def test_auto_follows_the_cpu_flags(tmp_path, text, want, fact):
    info = tmp_path / "cpuinfo"
    info.write_text(text)
    got, why = resolve_precision("auto", "cpu", str(info))
    assert got == want and fact in why
    for given in ("fp32", "bf16"):  # an explicit choice is never second-guessed
        assert resolve_precision(given, "cpu", str(info)) == (given, "as given")
    assert resolve_precision("auto", "cpu", str(tmp_path / "missing"))[0] == "fp32"
    with pytest.raises(ValueError, match="--precision: expected one of auto"):
        resolve_precision("fp8", "cpu", str(info))


def _losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


def test_bf16_training_matches_fp32(tmp_path, monkeypatch, capsys):
    """20 steps on a tiny model: bf16 (chosen by auto on a CPU with avx512_bf16) follows the fp32 run
    within bf16 rounding, step by step, and saves fp32 adapter tensors (its fp32 master weights)."""
    files = tiny_run_files(tmp_path, 6000)
    runs = {}
    for name, prec in (("fp32", "fp32"), ("bf16", "auto")):
        info = tmp_path / f"cpuinfo_{name}"
        info.write_text(EPYC if name == "bf16" else OLD_XEON)
        monkeypatch.setattr(precision, "CPUINFO", str(info))
        out = tmp_path / name
        main(train_flags(files, out, 32, precision=prec, op="cpu", epoch_steps=10, micro_bsz=2,
                         accumulate_grad_batches=2, lr_init=2e-2, lr_final=2e-2))
        first = capsys.readouterr().out.splitlines()[0]
        assert first.startswith(f"precision: {name} (")
        assert json.loads((out / "train_config.json").read_text())["precision"] == name
        runs[name] = (_losses(out), torch.load(out / "rwkv-final.pth", weights_only=True))
    (l32, a32), (l16, a16) = runs["fp32"], runs["bf16"]
    assert len(l32) == len(l16) == 20
    assert l32[-1] < l32[0] - 0.3  # it trained
    gaps = [abs(x - y) / x for x, y in zip(l32, l16, strict=True)]  # measured: 2e-4 at first, 2% at step 20
    assert max(gaps) <= 0.03 and sum(gaps) / len(gaps) <= 0.005, list(zip(l32, l16, strict=True))
    assert a16.keys() == a32.keys()
    for k, v in a16.items():
        assert v.dtype == torch.float32, k
        assert not torch.equal(v, v.bfloat16().float()), k  # the master weights' low bits, not the bf16 copy
    # Adam moves weights with near-zero gradients by about +-lr whatever their sign: element by element the
    # runs differ, but the update's direction is the same (measured cosine 0.95)
    flat32, flat16 = (torch.cat([a[k].flatten() for k in sorted(a32)]) for a in (a32, a16))
    assert torch.nn.functional.cosine_similarity(flat32, flat16, dim=0) > 0.85
