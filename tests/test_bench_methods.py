"""The method benchmark: eval helpers against direct computations, parameter matching against apply_peft,
and one end-to-end run of scripts/bench_methods.py at a tiny size on self-made data (no ../shared needed)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import perturbed_model, write_jsonl

from rwkv_peft.peft import apply_peft, parse_peft_config
from rwkv_peft.scoring import exact_match, extract_answer, greedy_generate
from rwkv_peft.train.loss import heldout_loss, heldout_sums

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_methods.py"


def load_script():
    """The script as a module (registered first: its dataclass needs sys.modules)."""
    if "bench_methods" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_methods", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_methods"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["bench_methods"]


def test_extract_answer_and_exact_match():
    assert extract_answer("so 3 + 4 = 7.\n#### 7") == "7"
    assert extract_answer("#### 1,250") == "1250"
    assert extract_answer("####-3") == "-3"
    assert extract_answer("#### 2.50") == "2.5"
    assert extract_answer("#### 4.0") == "4"
    assert extract_answer("the answer is 7") is None
    refs = ["a\n#### 7", "b\n#### 1,000", "c\n#### 3"]
    assert exact_match(["#### 7", "x #### 1000 y", "no answer"], refs) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="predictions"):
        exact_match(["#### 7"], refs)
    with pytest.raises(ValueError, match="reference without"):
        exact_match(["#### 7"], ["seven"])


def test_heldout_loss_is_pooled_masked_cross_entropy():
    model = perturbed_model(n_layer=1, n_embd=64, vocab=50).eval()
    g = torch.Generator().manual_seed(0)
    samples = []
    for n in (5, 9, 3):  # masks of different lengths, padding after them
        ids = torch.randint(1, 50, (13,), generator=g)
        mask = torch.zeros(12)
        mask[1:n] = 1
        samples.append({"input_ids": ids[:-1], "targets": ids[1:], "mask": mask})
    per_sample = []
    for s in samples:
        with torch.no_grad():
            ce = F.cross_entropy(model(s["input_ids"][None])[0], s["targets"], reduction="none")
        per_sample.append((float((ce * s["mask"]).sum()), float(s["mask"].sum())))
    total, count = (sum(x) for x in zip(*per_sample, strict=True))
    # fp32 logits over 12 tokens: agreement to ~1e-6 relative (batched with padding cut vs one by one)
    assert heldout_loss(model, samples, batch_size=2) == pytest.approx(total / count, rel=1e-5)
    sums, counts = heldout_sums(model, samples, batch_size=2)
    assert counts == [c for _, c in per_sample]
    assert sums == pytest.approx([x for x, _ in per_sample], rel=1e-5)


def test_greedy_generate_matches_full_sequence_argmax():
    model = perturbed_model(n_layer=2, n_embd=64, vocab=40, seed=3).eval()
    prompts = [[5, 9, 2], [7], [1, 2, 3, 4, 5, 6]]
    got = greedy_generate(model, prompts, max_new_tokens=6, stop_token=-1)
    for p, g in zip(prompts, got, strict=True):
        seq = list(p)
        for _ in range(6):  # the slow, obviously right way: rerun the whole sequence each token
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert g == seq[len(p):]
    stop = got[0][2]
    cut = greedy_generate(model, prompts[:1], max_new_tokens=6, stop_token=stop)[0]
    assert cut == got[0][: got[0].index(stop)]


def test_method_specs_match_apply_peft_counts():
    bench = load_script()
    model = perturbed_model(n_layer=2, n_embd=128, vocab=60)
    sd = model.state_dict()
    s = bench.PRESETS["tiny"]
    s = type(s)(**{**s.__dict__, "miss_r": 16, "mini_r": 8})
    specs = bench.method_specs(bench.target_shapes(sd, 2), s, sum(v.numel() for v in sd.values()))
    by_name = {sp["name"]: sp for sp in specs}
    assert by_name["lora"]["config"]["r"] == 8  # r*(in+out) summed == MiSS r*out summed at n_embd 128
    assert by_name["lora"]["params_expected"] == by_name["miss_balance"]["params_expected"]
    for sp in specs:
        m = perturbed_model(n_layer=2, n_embd=128, vocab=60)
        apply_peft(m, sp["peft"], parse_peft_config(sp["peft"], json.dumps(sp["config"])))
        assert sum(p.numel() for p in m.parameters() if p.requires_grad) == sp["params_expected"], sp["name"]
    with pytest.raises(ValueError, match="--miss_r"):
        bench.method_specs([(128, 96)], type(s)(**{**s.__dict__, "miss_r": 64}), 1)


def test_split_sft_is_a_seeded_partition(tmp_path):
    bench = load_script()
    src = tmp_path / "sft.jsonl"
    write_jsonl(src, [{"question": f"q{i}", "answer": f"a\n#### {i}"} for i in range(30)])
    train, held, held_rows = bench.split_sft(src, 5, 0, 7, tmp_path)
    tr = [json.loads(x)["question"] for x in train.read_text().splitlines()]
    he = [json.loads(x)["question"] for x in held.read_text().splitlines()]
    assert len(he) == 5 and len(tr) == 25 and not set(tr) & set(he) and [r["question"] for r in held_rows] == he
    again = bench.split_sft(src, 5, 0, 7, tmp_path / ".")[1].read_text()
    assert again == held.read_text()
    other = bench.split_sft(src, 5, 0, 8, tmp_path / ".")[1].read_text()
    assert other != again
    with pytest.raises(FileNotFoundError, match="--sft"):
        bench.split_sft(tmp_path / "missing.jsonl", 5, 0, 0, tmp_path)


def test_t_test_matches_closed_forms():
    bench = load_script()
    t, p = bench.t_test_p(np.array([1.0, 2.0, 3.0]))  # df 2: p = 1 - |t| / sqrt(2 + t^2)
    assert t == pytest.approx(2 / (1 / np.sqrt(3))) and p == pytest.approx(1 - t / np.sqrt(2 + t * t), rel=1e-9)
    t, p = bench.t_test_p(np.array([0.5, -0.1]))  # df 1 (Cauchy): p = 1 - 2 atan(|t|) / pi
    assert p == pytest.approx(1 - 2 * np.arctan(abs(t)) / np.pi, rel=1e-9)
    assert bench.t_test_p(np.array([0.2, 0.2, 0.2]))[1] < 1e-12 and bench.t_test_p(np.zeros(3))[1] == 1.0


def test_compare_verdicts():
    bench = load_script()
    rng = np.random.default_rng(0)
    ref = rng.normal(50, 5, (3, 40))  # seeds x held-out samples: summed answer-token losses

    def method(sums):
        return {"final_sums_by_seed": sums.tolist(), "first_sums_by_seed": sums.tolist()}

    better = bench.compare(method(ref - 1 + rng.normal(0, 0.1, ref.shape)), method(ref), "final", 400.0)
    assert better["verdict"] == "supported" and better["diff"] == pytest.approx(-40 / 400, rel=0.05)
    worse = bench.compare(method(ref + 1 + rng.normal(0, 0.1, ref.shape)), method(ref), "first", 400.0)
    assert worse["verdict"] == "contradicted"
    noise = bench.compare(method(ref + rng.normal(0, 3, ref.shape)), method(ref), "final", 400.0)
    assert noise["verdict"] == "inconclusive"
    rows = bench.claims_table({"miss_balance": method(ref), "lora": method(ref + 1)}, 400.0)
    assert rows[0]["verdict"] == "supported" and rows[2]["verdict"].startswith("not run (pissa")


def test_lr_grid_grows_until_the_best_is_interior(monkeypatch):
    bench = load_script()
    s = bench.PRESETS["tiny"]
    s = type(s)(**{**s.__dict__, "lrs": (1e-4, 3e-4), "max_grid": 8})
    ran = []

    def fake(a, s, data, base, base_hash, sp, lr, seed, out):  # training loss lowest at lr 1e-2
        ran.append(lr)
        return {"train_loss_tail": (np.log10(lr) + 2) ** 2, "lr": lr, "seed": seed, "diverged": False}

    monkeypatch.setattr(bench, "fine_tune", fake)
    sp = {"name": "miss_balance", "peft": "miss"}
    t = bench.tune_lr(None, s, {}, None, "", sp, None)
    assert t["lr"] == pytest.approx(8.1e-3) and t["status"] == "interior"
    assert t["grid"] == pytest.approx([1e-4, 3e-4, 9e-4, 2.7e-3, 8.1e-3, 2.43e-2]) and len(ran) == len(set(ran))
    capped = bench.tune_lr(None, type(s)(**{**s.__dict__, "max_grid": 3}), {}, None, "", sp, None)
    assert capped["lr"] == pytest.approx(9e-4) and "upper edge" in capped["status"]


def _tiny_data(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    words = "the king and queen shall speak of love war night day sword crown heart my lord good".split()
    paras = [" ".join(rng.choice(words, 40)).capitalize() + "." for _ in range(60)]
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(paras))
    sft = tmp_path / "sft.jsonl"
    with open(sft, "w") as f:
        for _ in range(60):
            a, b = (int(x) for x in rng.integers(1, 50, 2))
            rec = {"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}.\n#### {a + b}"}
            f.write(json.dumps(rec) + "\n")
    return text, sft


def test_bench_methods_end_to_end_tiny(tmp_path):
    """Every stage at a tiny size, three methods, two seeds; a second start reuses every finished run."""
    pytest.importorskip("rwkv_peft.train.__main__", reason="the trainer has not landed")
    text, sft = _tiny_data(tmp_path)
    out = tmp_path / "out"
    # an in-process trainer test earlier in the session leaves its world-of-one rendezvous in os.environ
    dist_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in dist_vars}, "PYTHONPATH": str(ROOT)}
    names = ["miss_balance", "lora", "miss_mini"]
    cmd = [sys.executable, str(SCRIPT), "--text", str(text), "--sft", str(sft), "--preset", "tiny", "--out", str(out),
           "--cache", str(tmp_path / "cache"), "--methods", ",".join(names)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["methods"]] == [n for n in load_script().METHODS if n in names]
    assert res["seeds"] == 2
    for r in res["methods"]:
        assert r["trainable_params"] > 0 and np.isfinite(r["final_mean"]) and r["final_std"] >= 0
        assert r["curve_steps"] == ["2", "4"] and len(r["final_by_seed"]) == 2 and len(r["data_hash_by_seed"]) == 2
        assert r["lr"] in r["grid"] and len(r["grid"]) >= 2 and set(r["train_loss_by_lr"]) >= {"0.001", "0.003"}
        assert r["data_hash_by_seed"][0] != r["data_hash_by_seed"][1]  # seeds change the data order
        assert res["timing"][r["name"]]["step_ms"] > 0
    assert [r["data_hash_by_seed"] for r in res["methods"]].count(res["methods"][0]["data_hash_by_seed"]) == 3
    verdicts = {c["claim"].split(" (")[0]: c["verdict"] for c in res["claims"]}
    assert verdicts["MiSS beats LoRA at equal parameters"] in ("supported", "contradicted", "inconclusive")
    assert verdicts["MiSS beats PiSSA at equal parameters"].startswith("not run")
    assert len(res["identical"]["base_sha256"]) == 64 and list((tmp_path / "cache").glob("*/base.pth"))
    table = (out / "table.md").read_text()
    assert table.startswith("| method |") and "| MiSS beats LoRA at equal parameters |" in table
    for png in ("heldout_loss_vs_step.png", "final_loss_vs_params.png", "claims.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "base: cached" in again.stdout and "failed" not in again.stdout
    run_lines = re.findall(r"^  \S+ lr \S+ seed \d+: .*$", again.stdout, re.M)
    assert run_lines and all(line.endswith("(finished before)") for line in run_lines), run_lines
    res2 = json.loads((out / "results.json").read_text())
    assert [r["final_by_seed"] for r in res2["methods"]] == [r["final_by_seed"] for r in res["methods"]]
