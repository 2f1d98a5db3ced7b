"""Preference tuning in the trainer: the free reference (adapter switched off) is the base, step 0 of DPO
is ln 2, a synthetic preference is learnt by every objective and survives the merge, full fine-tuning
scores its reference once, and two processes equal one."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli, perturbed_model

from rwkv_peft.data import get_tokenizer
from rwkv_peft.data.preference import load_pairs
from rwkv_peft.merge import merge_adapter
from rwkv_peft.model import save_model
from rwkv_peft.peft import adapter_disabled, apply_peft, parse_peft_config
from rwkv_peft.runtime import load_runtime, runtime_logits
from rwkv_peft.train import main
from rwkv_peft.train.config import TrainConfig
from rwkv_peft.train.loggers import read_log
from rwkv_peft.train.logps import logp_loss, sequence_logps
from rwkv_peft.train.objectives import Context, get_objective, objective_options

ROOT = Path(__file__).resolve().parents[1]
GOOD = ["please", "thanks", "kindly", "gladly", "welcome", "sure"]
BAD = ["no", "go away", "whatever", "never", "stop", "ugh"]
WORDS = "apple river stone cloud green table music north paper light ocean garden".split()


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """A prompt of three random words; chosen: a courteous word, rejected: a curt one."""
    rng = random.Random(seed)
    return [{"prompt": "User: " + " ".join(rng.sample(WORDS, 3)) + "\n\nAssistant:",
             "chosen": " " + rng.choice(GOOD), "rejected": " " + rng.choice(BAD)} for _ in range(n)]


@pytest.fixture(scope="module")
def run_files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("pref_train")
    save_model(perturbed_model(n_layer=1, n_embd=64, vocab=65536, head_size=32, seed=3), d / "base.pth")
    for name, n, seed in (("train", 96, 0), ("eval", 12, 1)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in synthetic_pairs(n, seed)))
    return {"base": str(d / "base.pth"), "train": str(d / "train.jsonl"), "eval": str(d / "eval.jsonl"), "dir": d}


def flags(f: dict, out: Path, objective: str = "dpo", **kw) -> list[str]:
    base = {"load_model": f["base"], "data_file": f["train"], "data_type": "preference", "objective": objective,
            "proj_dir": out, "peft": "miss", "miss_config": '{"r":8}', "ctx_len": 16, "micro_bsz": 4,
            "epoch_steps": 12, "epoch_count": 1, "lr_init": 3e-2, "lr_final": 3e-3, "op": "torch", "progress": 0,
            "accelerator": "cpu", "precision": "fp32", "random_seed": 1}
    return cli({**base, **kw})


def log(out: Path) -> list[dict]:
    return read_log(out / "train_log.jsonl")


# --- the reference is the base ---------------------------------------------------------------------

PEFTS = [("miss", '{"r":8}'), ("lora", '{"r":4,"alpha":8}'), ("dora", '{"r":4,"alpha":8}'), ("state", "")]


@pytest.mark.parametrize("method,config", PEFTS)
def test_adapter_disabled_logps_equal_the_base(method: str, config: str):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 300, (4, 13), generator=g)
    base = perturbed_model(vocab=300, seed=2)
    with torch.no_grad():
        want = sequence_logps(base(ids[:, :-1], loss=logp_loss(ids[:, 1:]))[1], torch.ones(4, 12))
    apply_peft(base, method, parse_peft_config(method, config))
    with torch.no_grad():
        for p in base.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        adapted = sequence_logps(base(ids[:, :-1], loss=logp_loss(ids[:, 1:]))[1], torch.ones(4, 12))
        with adapter_disabled(base) as off:
            got = sequence_logps(off(ids[:, :-1], loss=logp_loss(ids[:, 1:]))[1], torch.ones(4, 12))
    assert (adapted - want).abs().max() > 1e-2  # the adapter matters
    assert (got - want).abs().max() <= 1e-6


def test_adapter_disabled_on_a_quantized_base_is_that_base():
    """--quant: the reference is the quantized base, i.e. the same model with its adapter at zero."""
    pytest.importorskip("bitsandbytes.functional", reason="--quant needs bitsandbytes")
    from rwkv_peft.quant import quantize_base

    ids = torch.randint(1, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    model = perturbed_model(vocab=300, seed=2)
    apply_peft(model, "miss", parse_peft_config("miss", '{"r":8}'))
    quantize_base(model, "nf4")
    adapter = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        base = model(ids, loss=logp_loss(ids))[1]
        for p in adapter:
            p.normal_(0, 0.1)
        with adapter_disabled(model) as off:
            got = off(ids, loss=logp_loss(ids))[1]
        assert (model(ids, loss=logp_loss(ids))[1] - base).abs().max() > 1e-2
    assert torch.equal(got, base)


def objective_for(model, name: str, **options) -> object:
    cfg = TrainConfig(objective=name, data_type="preference")
    ctx = Context(model, model, cfg, objective_options(name, options))
    return get_objective(name).build(ctx)


def test_dpo_step0_is_ln2_with_ties_at_one_half(run_files):
    from rwkv_peft.data.preference import read_preference
    from rwkv_peft.data.types import DataOptions, collate

    model = perturbed_model(n_layer=1, n_embd=64, vocab=65536, head_size=32, seed=3)
    apply_peft(model, "miss", parse_peft_config("miss", '{"r":8}'))
    items = read_preference(run_files["eval"], DataOptions(16, 65536))
    batch = collate([items[i] for i in range(6)])
    loss, metrics = objective_for(model, "dpo").loss(batch)
    assert loss.item() == torch.tensor(math.log(2)).item()  # exactly: policy and reference are the same numbers
    assert metrics["rewards/accuracies"] == 0.5 and metrics["rewards/margins"] == 0.0  # ties count one half
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "miss" in n)


# --- learning the synthetic preference, and the merge ------------------------------------------------

@pytest.fixture(scope="module")
def trained(run_files, tmp_path_factory) -> dict:
    out = {}
    for objective in ("dpo", "orpo", "simpo"):
        d = tmp_path_factory.mktemp(objective)
        extra = {"strategy": "deepspeed_stage_3"} if objective == "dpo" else {}
        main(flags(run_files, d, objective, eval_data=run_files["eval"], eval_every=6, tensorboard=d / "tb", **extra))
        out[objective] = d
    return out


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo"])
def test_held_out_reward_accuracy_rises(trained, objective: str, capsys):
    evals = [r for r in log(trained[objective]) if "eval_rewards/accuracies" in r]
    curve = [(r["step"], r["eval_rewards/accuracies"]) for r in evals]
    with capsys.disabled():
        print(f"\n{objective} held-out reward accuracy by step: {curve}")
    assert [s for s, _ in curve] == [0, 6, 12]
    if objective == "dpo":
        assert curve[0][1] == 0.5 and evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    else:
        assert curve[0][1] <= 0.75  # reference-free: the base's own preference, by chance
    assert curve[-1][1] >= 0.9
    train = [r for r in log(trained[objective]) if "rewards/margins" in r]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert all(math.isfinite(r[key]) for r in train)
    assert (trained[objective] / "tb").is_dir() and any((trained[objective] / "tb").iterdir())


def test_merged_dpo_model_prefers_the_chosen_in_the_runtime(run_files, trained, tmp_path):
    """The adapter folded into the base: the `rwkv` runtime gives the chosen completions more log-prob,
    relative to the base, than the rejected ones (DPO's reward) on held-out pairs."""
    merged = merge_adapter(run_files["base"], trained["dpo"] / "rwkv-final.pth", tmp_path / "merged.pth")
    pairs, _ = load_pairs(run_files["eval"], 65536, 16)
    scores = {}
    for name, path in (("merged", merged), ("base", run_files["base"])):
        rt = load_runtime(path)
        rows = []
        for pair in pairs:
            lp = []
            for ids, flags_ in (pair[:2], pair[2:]):
                out = torch.log_softmax(runtime_logits(rt, ids[:-1].tolist()), -1)
                tok = out.gather(1, torch.as_tensor(ids[1:], dtype=torch.long)[:, None]).squeeze(1)
                lp.append(float((tok * torch.as_tensor(flags_[1:], dtype=torch.float32)).sum()))
            rows.append(lp)
        scores[name] = torch.tensor(rows)
    reward = (scores["merged"] - scores["base"])
    assert (reward[:, 0] > reward[:, 1]).float().mean() >= 0.9
    tok = get_tokenizer("world")
    assert tok.decode(pairs[0][0][-2:-1].tolist()).strip() in GOOD


# --- full fine-tuning: reference scored once, kept beside the data ------------------------------------

def test_full_finetuning_scores_the_reference_once(run_files, tmp_path, capfd):
    data = tmp_path / "data"
    data.mkdir()
    train = data / "train.jsonl"
    train.write_text(Path(run_files["train"]).read_text())
    kw = dict(peft="full", data_file=train, epoch_steps=2, lr_init=1e-3, lr_final=1e-3)
    main(flags(run_files, tmp_path / "a", **kw))
    cache = sorted(data.glob("train.jsonl.ref-*.pt"))
    assert len(cache) == 1 and "scoring 96 pairs" in capfd.readouterr().err
    assert log(tmp_path / "a")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    main(flags(run_files, tmp_path / "b", **kw))
    assert "scoring" not in capfd.readouterr().err
    assert [r["loss"] for r in log(tmp_path / "a")] == [r["loss"] for r in log(tmp_path / "b")]
    saved = torch.load(cache[0], weights_only=True)
    assert saved["logps"].shape == (96, 2)


def test_two_processes_equal_one(run_files, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    main(flags(run_files, one, epoch_steps=2, micro_bsz=4))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "rwkv_peft.train", *flags(run_files, two, epoch_steps=2, micro_bsz=2, devices=2)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(one / "rwkv-final.pth", weights_only=True)
    b = torch.load(two / "rwkv-final.pth", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    la, lb = log(one), log(two)
    for key in ("loss", "rewards/accuracies", "rewards/margins"):
        assert [x[key] for x in la] == pytest.approx([x[key] for x in lb], rel=1e-5, abs=1e-6)
