"""RWKV-7a DeepEmbed checkpoints (tests/released_layouts.py's ``x070a_*``, written from the `rwkv` runtime's
loader and the published key names, not from our model class): parity with the runtime run with
RWKV_DE_VERSION=1 (sequence, RNN, greedy generation), fine-tuning with the DeepEmbed tensors frozen or
trained, merges that keep the file's layout, state tuning, init_model --deepembed and the errors.

test_released_layouts.py runs the generic checks on the same layouts too (parity per shape and dtype,
MiSS balance / bat_col merge and unmerge, save_model and train_parts key sets).
"""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
import torch
from helpers import assert_load_errors, cli, lm_steps, load_pth, logits, stored, token_stream, tokens
from released_layouts import LAYOUTS, key_shapes, write_checkpoint

from rwkv_peft.data import largest_magic_prime
from rwkv_peft.decoder import Decoder
from rwkv_peft.merge import merge_adapter
from rwkv_peft.model import load_model
from rwkv_peft.peft import adapter_config, apply_peft, load_adapter, parse_peft_config, trainable_state_dict
from rwkv_peft.peft.state import read_state_file
from rwkv_peft.runtime import load_runtime, runtime_generate, runtime_initial_state, runtime_logits
from rwkv_peft.tools.init_model import main as init_model_main
from rwkv_peft.train import main as train_main

TOL = 1e-4  # fp32 on both sides (measured ~1e-5)
BF16_LOGITS = 0.1  # a bf16 merged file: W + dW rounded once to bf16 (see test_released_layouts.py)
NAMES = ["x070a_deepembed", "x070a_n32_s0_f"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DE_LEAVES = ("ffn.s_emb.weight", "ffn.s_emb_x.weight", "ffn.s0", "ffn.s1", "ffn.s2")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    d = tmp_path_factory.mktemp("deepembed")
    out = {}
    for name in NAMES:
        for dt, dtype in DTYPES.items():
            out[name, dt] = d / f"{name}_{dt}.pth"
            write_checkpoint(LAYOUTS[name], out[name, dt], dtype)
    return out


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """The generate module's decoding loop (prompt read at once, then one token per step), argmax."""
    dec = Decoder(model)
    dec.feed(prompt)
    return [t for (t,) in islice(dec.steps(lambda lg: lg.argmax(-1).tolist()), n)]


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_runtime_parity_chunks_and_greedy(name: str, dt: str, files: dict) -> None:
    path = files[name, dt]
    dims = LAYOUTS[name][2]
    model = load_model(path, op="torch")
    assert model.cfg.deepembed == dims["D"] == 32
    toks = tokens(dims["V"])
    ours = logits(model, toks)
    runtime = load_runtime(path)
    seq, rnn = runtime_logits(runtime, toks, "seq"), runtime_logits(runtime, toks, "rnn")
    print(f"{name} {dt}: |ours - runtime (RWKV_DE_VERSION=1)| seq {(ours - seq).abs().max():.2e}, "
          f"rnn {(ours - rnn).abs().max():.2e}")
    torch.testing.assert_close(ours, seq, atol=TOL, rtol=0)
    torch.testing.assert_close(ours, rnn, atol=TOL, rtol=0)

    plain = load_model({k: v for k, v in load_pth(path).items() if not k.endswith(DE_LEAVES)}, op="torch")
    assert (logits(plain, toks) - ours).abs().max() > 0.5  # DeepEmbed is live in this file, not a no-op

    with torch.no_grad():  # infctx / a prompt read in pieces: the state carries over, ids stay aligned
        first, state = model.forward_state(torch.tensor([toks[:10]]), None)
        second, _ = model.forward_state(torch.tensor([toks[10:]]), state)
    torch.testing.assert_close(torch.cat([first[0], second[0]]), ours, atol=TOL, rtol=0)

    want = runtime_generate(runtime, toks[:8], 32)
    assert len(set(want)) > 3, want
    assert greedy(model, toks[:8], 32) == want


def train(model: torch.nn.Module, steps: int = 3, grad_cp: bool = False) -> list[float]:
    """A few AdamW steps on the LM loss (what the trainer does, without DeepSpeed)."""
    model.grad_cp = grad_cp
    model.train()
    return lm_steps(model, steps)


@pytest.mark.parametrize(
    "name, dt, method, config",
    [
        ("x070a_deepembed", "fp32", "miss", {"r": 32, "mode": "balance"}),
        ("x070a_n32_s0_f", "bf16", "miss", {"r": 32, "mode": "balance"}),
        ("x070a_deepembed", "bf16", "lora", {"r": 8, "alpha": 16}),
        ("x070a_n32_s0_f", "fp32", "lora", {"r": 8, "alpha": 16, "train_parts": ["deepembed"]}),
        ("x070a_deepembed", "fp32", "miss", {"r": 32, "mode": "balance", "train_parts": ["deepembed", "time"]}),
    ],
)
def test_adapters_train_merge_and_run_in_the_runtime(
    name: str, dt: str, method: str, config: dict, files: dict, tmp_path: Path
) -> None:
    base = files[name, dt]
    model = load_model(base, op="torch")
    cfg = parse_peft_config(method, json.dumps(config))
    torch.manual_seed(0)  # LoRA's A: the same start whatever ran before
    apply_peft(model, method, cfg)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    de_keys = {k for k in load_pth(base) if k.endswith(DE_LEAVES)}
    asked = "deepembed" in config.get("train_parts", ())
    assert de_keys & trained == (de_keys if asked else set())  # frozen unless asked for
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if k in de_keys}
    losses = train(model, grad_cp=method == "lora")
    assert losses[-1] < losses[0], losses
    moved = {k for k, v in model.state_dict().items() if k in de_keys and not torch.equal(v, before[k])}
    assert moved == (de_keys if asked else set())

    out = tmp_path / "run"
    out.mkdir()
    torch.save(trainable_state_dict(model), out / "rwkv-final.pth")
    (out / "adapter_config.json").write_text(json.dumps(adapter_config(model, method, cfg)))
    merged = merge_adapter(base, out / "rwkv-final.pth", tmp_path / "merged.pth")
    assert stored(merged) == stored(base)  # keys, order, shapes, dtypes
    m, adapter = load_pth(merged), load_pth(out / "rwkv-final.pth")
    for k in de_keys & set(adapter):  # trained DeepEmbed tensors land in the merged file
        assert torch.equal(m[k], adapter[k].to(m[k].dtype)), k
    assert all(torch.equal(m[k], load_pth(base)[k]) for k in de_keys - set(adapter))  # frozen: byte for byte

    toks = tokens(LAYOUTS[name][2]["V"])
    want = logits(model.eval(), toks)
    theirs = runtime_logits(load_runtime(merged), toks, "seq")
    effect = (want - logits(load_model(base, op="torch"), toks)).abs().max()
    diff = (theirs - want).abs().max()
    print(f"{name} {dt} {method} {config.get('train_parts', [])}: adapter moves logits by {effect:.3f}; "
          f"merged file in the runtime vs adapted model {diff:.2e}")
    assert effect > 10 * BF16_LOGITS
    assert diff <= (TOL if dt == "fp32" else BF16_LOGITS)
    torch.testing.assert_close(logits(load_model(merged, op="torch"), toks), theirs, atol=TOL, rtol=0)


@pytest.mark.parametrize("peft, config", [("state", {}), ("lora", {"r": 8, "train_parts": ["deepembed"]})])
def test_trainer_state_tuning_and_train_parts(peft: str, config: dict, files: dict, tmp_path: Path) -> None:
    """The trainer (DeepSpeed, CPU) on a DeepEmbed base: a state file the runtime starts from, and a
    LoRA run whose adapter carries the DeepEmbed tensors in the base's stored shapes."""
    base = files["x070a_n32_s0_f", "fp32"]
    n = len(token_stream(tmp_path / "data", LAYOUTS["x070a_n32_s0_f"][2]["V"], 3000))
    flags = {"load_model": base, "data_file": tmp_path / "data", "data_type": "binidx", "proj_dir": tmp_path / "out",
             "peft": peft, "ctx_len": 16, "micro_bsz": 2, "epoch_steps": 3, "epoch_count": 1, "lr_init": 0.05,
             "lr_final": 0.05, "op": "torch", "progress": 0, "accelerator": "cpu",
             "magic_prime": largest_magic_prime(n, 16)}
    if config:
        flags["lora_config"] = json.dumps(config)
    train_main(cli(flags))
    adapter = tmp_path / "out" / "rwkv-final.pth"
    toks = tokens(LAYOUTS["x070a_n32_s0_f"][2]["V"])
    runtime = load_runtime(base)
    if peft == "state":
        model = load_model(base, op="torch")
        states = read_state_file(adapter, model)
        apply_peft(model, "state")
        load_adapter(model, str(adapter))
        ours = logits(model, toks)
        theirs = runtime_logits(runtime, toks, "seq", runtime_initial_state(runtime, states))
        print(f"state tuning: runtime from the state file vs adapted model {(ours - theirs).abs().max():.2e}")
        torch.testing.assert_close(theirs, ours, atol=TOL, rtol=0)
        assert (runtime_logits(runtime, toks, "seq") - ours).abs().max() > 100 * TOL  # the state matters
        return
    saved, layout = load_pth(adapter), {k: s for k, s, _ in stored(base)}
    de = {k for k in saved if k.endswith(DE_LEAVES)}
    assert de == {k for k in layout if k.endswith(DE_LEAVES)}
    assert all(tuple(saved[k].shape) == layout[k] for k in de)  # s0 stored (F): saved (F)
    merged = merge_adapter(base, adapter, tmp_path / "merged.pth")
    assert stored(merged) == stored(base)
    assert any(not torch.equal(load_pth(merged)[k], load_pth(base)[k]) for k in de)


def test_init_model_deepembed_runs_in_the_runtime(tmp_path: Path) -> None:
    path = tmp_path / "init.pth"
    init_model_main(["--deepembed", "--n_layer", "2", "--n_embd", "128", "--vocab_size", "300", "--dtype", "fp32",
                     "--output_std", "0.02", "--out", str(path)])
    _, block, dims, _ = LAYOUTS["x070a_deepembed"]
    # RWKV-LM's widths for n_embd 128 (init_model's, not the fixture's)
    want = key_shapes(("x070", block, {**dims, "W": 32, "A": 32, "M": 32, "G": 64}, False))
    assert {k: s for k, s, _ in stored(path)} == {k: s for k, s in want.items()}
    toks = tokens(300)
    ours = logits(load_model(path, op="torch"), toks)
    torch.testing.assert_close(ours, runtime_logits(load_runtime(path), toks, "rnn"), atol=TOL, rtol=0)
    with pytest.raises(SystemExit):
        init_model_main(["--version", "x060", "--deepembed", "--n_layer", "1", "--n_embd", "64",
                         "--out", str(tmp_path / "bad.pth")])


def test_bad_deepembed_files_are_one_error(files: dict, tmp_path: Path) -> None:
    sd = dict(load_pth(files["x070a_deepembed", "fp32"]))
    cases = {
        "no_s1.pth": ({k: v for k, v in sd.items() if k != "blocks.1.ffn.s1"},
                      r"no_s1\.pth.*missing: blocks\.1\.ffn\.s1"),
        "wide.pth": ({**sd, "blocks.1.ffn.s_emb.weight": torch.zeros(300, 900)},
                     r"wide\.pth.*wrong shape: blocks\.1\.ffn\.s_emb\.weight \(300, 900\) \(expected \(300, 1024\)\)"),
        "odd.pth": ({k: v for k, v in sd.items() if not k.endswith(".ffn.s1")}
                    | {"blocks.0.ffn.s_emb.weight": torch.zeros(300, 1000)},
                    r"odd\.pth: blocks\.0\.ffn\.s_emb\.weight has width 1000, expected D\*D"),
        "only_s2.pth": ({k: v for k, v in sd.items() if not k.endswith(("ffn.s1", "s_emb.weight"))},
                        r"only_s2\.pth: blocks\.0\.ffn\.s2 without blocks\.N\.ffn\.s1"),
    }
    assert_load_errors(cases, tmp_path)
