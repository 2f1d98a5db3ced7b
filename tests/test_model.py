"""RWKV-7 model: parity with the official `rwkv` runtime, checkpoint round trips, bad input."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import perturbed_model

from rwkv_peft.model import load_model, read_state_dict, save_model
from rwkv_peft.runtime import load_runtime, runtime_logits

TOL = 1e-4  # fp32 everywhere; both sides accumulate ~1e-6 rounding over 64 steps and 2 layers


def test_parity_with_official_runtime(tmp_path: Path) -> None:
    model = perturbed_model(n_layer=2, n_embd=128, vocab=300)
    path = tmp_path / "base.pth"
    save_model(model, path)
    tokens = torch.randint(0, 300, (64,), generator=torch.Generator().manual_seed(3)).tolist()
    ours = load_model(path, op="torch")(torch.tensor([tokens]))[0].detach()
    runtime = load_runtime(path)
    seq = runtime_logits(runtime, tokens, "seq")
    rnn = runtime_logits(runtime, tokens, "rnn")
    print(f"max-abs parity: seq {(ours - seq).abs().max():.3g}, rnn {(ours - rnn).abs().max():.3g}")
    assert ours.abs().max() > 1.0  # a real signal, not near-zero logits
    torch.testing.assert_close(ours, seq, atol=TOL, rtol=0)
    torch.testing.assert_close(ours, rnn, atol=TOL, rtol=0)


def test_state_carries_across_calls() -> None:
    model = perturbed_model()
    idx = torch.randint(0, 300, (2, 20))
    full = model(idx)
    first, state = model.forward_state(idx[:, :13], None)
    second, _ = model.forward_state(idx[:, 13:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip(tmp_path: Path, dtype: torch.dtype, suffix: str) -> None:
    path, again = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
    save_model(perturbed_model(), path, dtype=dtype)
    save_model(load_model(path, dtype=None), again)
    a, b = read_state_dict(path), read_state_dict(again)
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype, k
        assert torch.equal(a[k], b[k]), k


def test_architecture_read_from_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "m.pth"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "rwkv_peft.tools.init_model",
            "--n_layer",
            "3",
            "--n_embd",
            "64",
            "--head_size",
            "32",
            "--vocab_size",
            "77",
            "--out",
            str(path),
        ],
        check=True,
        capture_output=True,
    )
    model = load_model(path, dtype=None)
    cfg = model.cfg
    assert (cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.vocab_size, cfg.dim_ffn) == (
        3,
        64,
        32,
        77,
        256,
    )
    assert model.emb.weight.dtype == torch.bfloat16
    # real init, not plain random: zero output projections and a per-layer decay ramp
    assert torch.count_nonzero(model.blocks[0].att.output.weight) == 0
    assert not torch.equal(model.blocks[0].att.x_r, model.blocks[2].att.x_r)


def _broken(tmp_path: Path, edit) -> Path:
    sd = perturbed_model().state_dict()
    edit(sd)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    return path


def test_missing_key(tmp_path: Path) -> None:
    path = _broken(tmp_path, lambda sd: sd.pop("blocks.1.att.key.weight"))
    with pytest.raises(ValueError, match=r"bad\.pth.*missing: blocks\.1\.att\.key\.weight"):
        load_model(path)


def test_extra_key(tmp_path: Path) -> None:
    path = _broken(tmp_path, lambda sd: sd.__setitem__("blocks.0.att.extra", torch.zeros(3)))
    with pytest.raises(ValueError, match=r"unexpected: blocks\.0\.att\.extra"):
        load_model(path)


def test_wrong_shape(tmp_path: Path) -> None:
    path = _broken(
        tmp_path, lambda sd: sd.__setitem__("blocks.1.ffn.value.weight", torch.zeros(128, 100))
    )
    with pytest.raises(
        ValueError, match=r"wrong shape: blocks\.1\.ffn\.value\.weight \(128, 100\)"
    ):
        load_model(path)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "t.pth"
    save_model(perturbed_model(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"t\.pth: not a readable \.pth checkpoint"):
        load_model(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_model(tmp_path / "nope.pth")


def test_not_rwkv(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"layer.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="other.pth: not an RWKV"):
        load_model(path)


def test_older_versions_recognised_and_rejected() -> None:
    with pytest.raises(ValueError, match="RWKV-4 / v5.0 / v5.1 checkpoint.*not supported"):
        load_model({"emb.weight": torch.zeros(4, 4), "blocks.0.att.time_first": torch.zeros(4)})


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_malicious_pickle_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.target = str(marker)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"emb.weight": payload}, f)
    zipped = tmp_path / "evil_zip.pth"
    torch.save({"emb.weight": payload}, zipped)
    for p in (path, zipped):
        with pytest.raises(ValueError, match="refused to load"):
            load_model(p)
    assert not marker.exists()
