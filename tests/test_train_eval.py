"""Evaluation while training on chat data: eval steps, step-0 == base, best adapter, TensorBoard, wandb offline."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import random
from pathlib import Path

import pytest
from helpers import cli, perturbed_model, write_jsonl

from rwkv_peft.data import get_tokenizer, load_documents
from rwkv_peft.decoder import generate
from rwkv_peft.model import load_model, save_model
from rwkv_peft.peft import apply_peft, load_adapter, parse_peft_config
from rwkv_peft.sampling import Sampling
from rwkv_peft.train import main
from rwkv_peft.train.heldout import prompt_of
from rwkv_peft.train.loggers import read_log
from rwkv_peft.train.loss import heldout_loss

VOCAB, CTX, STEPS, EVERY = 300, 72, 8, 3


def conversation(rng: random.Random) -> dict:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return {"messages": [{"role": "system", "content": "You add numbers."},
                         {"role": "user", "content": f"What is {a} plus {b}?"},
                         {"role": "assistant", "content": f"<think>{a}+{b}</think> {a + b}"},
                         {"role": "user", "content": "Thanks!"},
                         {"role": "assistant", "content": "You are welcome."}]}


def tiny_tokenizer(path: Path, texts: list[str]) -> str:
    """A 300-token byte-level BPE tokenizer.json (id 0 = the end token), so the model stays tiny."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|end|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("eval")
    rng = random.Random(0)
    train, held = [conversation(rng) for _ in range(64)], [conversation(rng) for _ in range(6)]
    for name, rows in (("train", train), ("eval", held)):
        write_jsonl(d / f"{name}.jsonl", rows)
    texts = ["\n\n".join(f"{m['role'].title()}: {m['content']}" for m in r["messages"]) for r in train]
    files = {"base": str(d / "base.pth"), "tokenizer": tiny_tokenizer(d / "tok.json", texts),
             "train": str(d / "train.jsonl"), "eval": str(d / "eval.jsonl"), "out": d / "out", "tb": d / "tb"}
    save_model(perturbed_model(n_layer=1, n_embd=64, vocab=VOCAB, head_size=32, seed=3), files["base"])
    flags = {"load_model": files["base"], "data_file": files["train"], "data_type": "chat", "dataload": "pad",
             "tokenizer": files["tokenizer"], "proj_dir": str(files["out"]), "peft": "miss",
             "miss_config": '{"r":8}', "ctx_len": CTX, "micro_bsz": 2, "epoch_steps": STEPS // 2, "epoch_count": 2,
             "lr_init": 2e-2, "lr_final": 2e-3, "op": "torch", "progress": 0, "accelerator": "cpu", "precision": "fp32",
             "random_seed": 1, "eval_data": files["eval"], "eval_every": EVERY, "eval_samples": 2,
             "eval_max_tokens": 8, "save_best": 1, "tensorboard": str(files["tb"])}
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}
    flags["wandb"] = "rwkv-peft-test" if importlib.util.find_spec("wandb") else ""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        for k, v in env.items():
            mp.setenv(k, v)
        summary = main(cli(flags))
    return {**files, "summary": summary, "stdout": out.getvalue(),
            "log": read_log(files["out"] / "train_log.jsonl")}


def eval_samples(run: dict) -> list[dict]:
    data = load_documents(run["eval"], "chat", CTX, VOCAB, tokenizer=run["tokenizer"])
    ds = data.sampler(CTX, VOCAB)
    return [ds.doc_sample(d) for d in range(len(data.docs))]


def test_eval_at_the_right_steps_and_step0_equals_the_base(run):
    evals = [r for r in run["log"] if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6, 8]  # step 0, every 3 steps, and the last step
    assert [r["step"] for r in run["log"] if "loss" in r] == list(range(1, STEPS + 1))
    base = heldout_loss(load_model(run["base"]), eval_samples(run), batch_size=2)
    assert evals[0]["eval_loss"] == pytest.approx(base, rel=1e-6)  # MiSS starts at zero: the base's loss
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5  # it learns
    for r in evals:
        assert len(r["eval_samples"]) == 2
        for s in r["eval_samples"]:
            assert s["prompt"].endswith("Thanks!\n\nAssistant:") and s["reference"] == " You are welcome."
            assert isinstance(s["output"], str) and "\n\nUser:" not in s["output"]
    # step 0's generations are rwkv_peft.generate's samples from the base, seeded by --random_seed + step
    data = load_documents(run["eval"], "chat", CTX, VOCAB, tokenizer=run["tokenizer"])
    ds, tok = data.sampler(CTX, VOCAB), get_tokenizer(run["tokenizer"])
    for d, s in enumerate(evals[0]["eval_samples"]):
        ids = data.docs[d]
        cut, _ = prompt_of(ids, ds.doc_flags(d))
        want = generate(load_model(run["base"]), tok, ids[:cut].tolist(), 8, Sampling(seed=1), ("\n\nUser:",))
        assert s["output"] == want.text and tok.decode(ids[:cut].tolist()) == s["prompt"]
    assert "eval step 3: held-out loss" in run["stdout"] and "sample 1:" in run["stdout"]
    assert (run["out"] / "eval.png").stat().st_size > 1000


def test_summary_names_the_best_step_and_save_best_keeps_it(run):
    evals = [r for r in run["log"] if "eval_loss" in r]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert run["summary"]["best_step"] == best["step"]
    assert f"best held-out loss {best['eval_loss']:.4f} at step {best['step']}" in run["stdout"]
    model = load_model(run["base"])
    apply_peft(model, "miss", parse_peft_config("miss", '{"r":8}'))
    load_adapter(model, run["out"] / "rwkv-best.pth")
    assert heldout_loss(model, eval_samples(run), batch_size=2) == pytest.approx(best["eval_loss"], rel=1e-6)


def test_tensorboard_event_file_holds_the_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(run["tb"].glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(files[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tok_s", "train/grad_norm", "eval/loss"} <= tags
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
                     ("eval/loss", "eval_loss")):
        logged = {r["step"]: r[key] for r in run["log"] if key in r}
        events = {e.step: e.value for e in acc.Scalars(tag)}
        assert events.keys() == logged.keys(), tag
        assert all(events[s] == pytest.approx(v, rel=1e-6) for s, v in logged.items()), tag  # float32 in the file
    assert all(v > 0 for v in (e.value for e in acc.Scalars("train/grad_norm")))
    assert "eval/samples/text_summary" in acc.Tags()["tensors"]


def test_wandb_offline_run_holds_the_eval_samples(run):
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb not installed")
    runs = list((run["out"] / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    tables = sorted(runs[0].glob("files/media/table/eval_samples_*.table.json"),
                    key=lambda p: int(p.name.split("_")[2]))
    evals = [r for r in run["log"] if "eval_loss" in r]
    assert [int(p.name.split("_")[2]) for p in tables] == [r["step"] for r in evals]
    for p, r in zip(tables, evals, strict=True):
        table = json.loads(p.read_text())
        assert table["columns"] == ["prompt", "output", "reference"]
        assert table["data"] == [[s["prompt"], s["output"], s["reference"]] for s in r["eval_samples"]]


def test_eval_flags_fail_in_one_line(run, tmp_path):
    base = ["--load_model", run["base"], "--data_file", run["train"], "--data_type", "chat",
            "--proj_dir", str(tmp_path), "--tokenizer", run["tokenizer"]]
    for extra, msg in ((["--eval_every", "3"], "--eval_every: needs --eval_data FILE"),
                       (["--eval_data", run["eval"]], "--eval_data: set --eval_every N"),
                       (["--eval_data", "nope.jsonl", "--eval_every", "2"], "--eval_data nope.jsonl: nope.jsonl.bin"),
                       (["--save_best", "2"], "--save_best: expected 0 or 1")):
        with pytest.raises(SystemExit, match=msg):
            main(base + extra)
    assert not os.listdir(tmp_path)
