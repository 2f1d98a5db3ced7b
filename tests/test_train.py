"""The trainer end to end on tiny models: learning, frozen base, resume, accumulation, grad_cp, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import interrupted_after_first_save, perturbed_model, tiny_run_files, train_flags

from rwkv_peft.model import load_model
from rwkv_peft.peft import apply_peft, parse_peft_config
from rwkv_peft.peft.folder import read_peft_folder
from rwkv_peft.train import lr_at, main, masked_loss, plots
from rwkv_peft.train.loggers import read_log

VOCAB, CTX = 256, 16
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """A tiny fp32 base and a learnable token stream (a fixed random successor map)."""
    return tiny_run_files(tmp_path_factory.mktemp("train"), 6000, VOCAB)


def adapter(out: Path, name: str = "rwkv-final.pth") -> dict[str, torch.Tensor]:
    return torch.load(out / name, weights_only=True)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_log(out / "train_log.jsonl")]


def test_lr_schedules():
    assert lr_at(0, 100, 1.0, 0.1, warmup=10) == pytest.approx(0.1)
    assert lr_at(10, 100, 1.0, 0.1, warmup=10) == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0, 0.1, warmup=10) == pytest.approx(0.1)
    assert lr_at(50, 100, 1.0, 0.1, schedule="wsd", decay_frac=0.2) == 1.0
    assert lr_at(99, 100, 1.0, 0.1, schedule="wsd", decay_frac=0.2) == pytest.approx(0.1)
    cos = [lr_at(s, 50, 1.0, 0.1) for s in range(50)]
    assert all(a >= b for a, b in zip(cos, cos[1:], strict=False))


def test_loss_curve_smoothing_is_centred():
    """loss.png's running mean goes through the data: on a straight falling line it is the line itself (a
    trailing mean would sit above it by half its window)."""
    line = [10.0 - 0.01 * i for i in range(300)]
    k, smooth = plots.moving_average(line)
    assert k == 51 and smooth == pytest.approx(line, abs=1e-9)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stage_learns_and_moves_only_the_adapter(files, tmp_path, stage):
    out = tmp_path / "out"
    summary = main(train_flags(files, out, strategy=f"deepspeed_stage_{stage}", train_parts="ln"))
    loss = losses(out)
    assert len(loss) == 8 and np.mean(loss[-2:]) < np.mean(loss[:2]) - 0.1
    base = load_model(files["base"]).state_dict()
    trained = {k: v for k, v in summary["model"].state_dict().items()}
    saved = adapter(out)
    assert saved.keys() == {k for k, v in summary["model"].named_parameters() if v.requires_grad}
    assert all(k.endswith(".miss") or summary["model"].train_part(k) == "ln" for k in saved)
    for k, v in base.items():
        if k in saved:
            assert not torch.equal(v, trained[k]), k  # train_parts moved
        else:
            assert torch.equal(v, trained[k]), k  # frozen: bit-identical
    for k, v in saved.items():
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0)
        assert v.abs().sum() > 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["method"] == "miss" and cfg["r"] == 8 and cfg["base"]["n_embd"] == 64
    assert (out / "loss.png").stat().st_size > 1000 and (out / "rwkv-0.pth").is_file()


def test_zero3_trains_the_head_through_the_chunked_loss(files, tmp_path):
    """ZeRO-3 shards the head weight; the chunked loss runs inside the head's call, where DeepSpeed
    gathers it for forward and backward: the trained head equals the plain path's (stage 1). ZeRO-3's
    process-wide F.linear replacement is undone when the run ends."""
    runs, linear = {}, torch.nn.functional.linear
    for name, kw in (("z3", {"strategy": "deepspeed_stage_3", "head_chunk": 5}), ("plain", {"head_chunk": 0})):
        main(train_flags(files, tmp_path / name, epoch_count=1, epoch_steps=2, train_parts="head", **kw))
        runs[name] = adapter(tmp_path / name)
        assert torch.nn.functional.linear is linear
    assert "head.weight" in runs["z3"] and runs["z3"].keys() == runs["plain"].keys()
    for k, v in runs["plain"].items():
        torch.testing.assert_close(runs["z3"][k], v, rtol=1e-4, atol=1e-6)


def test_resume_follows_the_uninterrupted_run(files, tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    main(train_flags(files, full, epoch_count=3))
    interrupted_after_first_save(monkeypatch, lambda: main(train_flags(files, cut, epoch_count=3)))
    assert len(losses(cut)) == 4
    main(train_flags(files, cut, epoch_count=3, resume=1))
    assert losses(cut) == losses(full)  # exactly: same samples, optimizer state and schedule
    a, b = adapter(full), adapter(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grad_accumulation_equals_a_bigger_micro_batch(files, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    main(train_flags(files, one, epoch_count=1, micro_bsz=4))
    main(train_flags(files, two, epoch_count=1, micro_bsz=2, accumulate_grad_batches=2))
    a, b = adapter(one), adapter(two)
    for k in a:  # fp32: the same sums in a different order
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(losses(one), losses(two), rtol=1e-5)


def test_grad_cp_gives_the_same_gradients():
    torch.manual_seed(0)
    model = perturbed_model(n_layer=2, n_embd=64, vocab=VOCAB, head_size=32)
    apply_peft(model, "miss", parse_peft_config("miss", '{"r":8}'))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".miss"):
                p.normal_(0, 0.02)
    idx = torch.randint(0, VOCAB, (2, CTX + 1))
    grads = []
    for cp in (False, True):
        model.zero_grad()
        model.grad_cp = cp
        model.train()
        masked_loss(model, idx[:, :-1], idx[:, 1:], torch.ones(2, CTX)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:  # recomputation repeats the same fp32 ops: equal up to rounding
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(files, tmp_path_factory) -> Path:
    """The reference for the multi-process runs: one process, micro batch 4 (their global batch)."""
    out = tmp_path_factory.mktemp("one")
    main(train_flags(files, out, epoch_count=1, epoch_steps=3, micro_bsz=4))
    # The world of one is torn down: nothing of its rendezvous is left for a torchrun child to inherit.
    assert not torch.distributed.is_initialized()
    assert not [k for k in os.environ if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") or k.startswith("MASTER_")]
    return out


def test_two_processes_equal_one_with_twice_the_micro_batch(files, one_process, tmp_path):
    one, two = one_process, tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "rwkv_peft.train",  # --standalone: torchrun binds its own free port (no race)
                        *train_flags(files, two, epoch_count=1, epoch_steps=3, micro_bsz=2)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = adapter(one), adapter(two)
    for k in a:  # fp32; the all-reduce sums in another order
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_two_nodes_equal_one_process_with_the_global_batch(files, one_process, tmp_path):
    """Two "nodes" on this machine (torchrun --nnodes 2, one process each, gloo over 127.0.0.1), launched
    as on a cluster: the same command on every node but for --node_rank."""
    one, two = one_process, tmp_path / "two"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                        "MASTER_PORT") and not k.startswith("TORCHELASTIC_")}
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(i),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               "-m", "rwkv_peft.train",
                               *train_flags(files, two, epoch_count=1, epoch_steps=3, micro_bsz=2, num_nodes=2)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (0, 1)]
    try:
        outs = [n.communicate(timeout=300)[0] for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-2000:] for o in outs)
    a, b = adapter(one), adapter(two)
    for k in a:  # fp32; the all-reduce sums in another order
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["data", "checkpoint", "n_embd", "strategy", "head_chunk", "data_type",
                                  "peft_folder"])
def test_bad_input_is_one_line_before_heavy_work(files, tmp_path, case):
    kw = {}
    if case == "data":
        kw["data_file"] = str(tmp_path / "missing")
    elif case == "checkpoint":
        bad = tmp_path / "notrwkv.pth"
        torch.save({"encoder.weight": torch.zeros(2, 2)}, bad)
        kw["load_model"] = str(bad)
    elif case == "n_embd":
        kw["n_embd"] = 128
    elif case == "strategy":
        kw["strategy"] = "deepspeed_stage_9"
    elif case == "data_type":
        kw["data_type"] = "csv"  # named as the flag at fault, not as a missing --data_file
    elif case == "peft_folder":  # peft has no bat_col
        kw.update(peft_folder="hf", miss_config='{"r":8,"mode":"bat_col"}')
    else:
        kw["head_chunk"] = -2
    with pytest.raises(SystemExit) as e:
        main(train_flags(files, tmp_path / "out", **kw))
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg
    assert {"data": "--data_file", "checkpoint": "not an RWKV", "n_embd": "--n_embd 128",
            "strategy": "--strategy", "head_chunk": "--head_chunk", "data_type": "--data_type",
            "peft_folder": "--peft_folder: MiSS mode bat_col"}[case] in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("peft,config", [("lora", '{"r":4,"alpha":8}'), ("pissa", '{"r":4,"alpha":8}'),
                                         ("dora", '{"r":4,"alpha":8}'), ("state", "")])
def test_baselines_train_through_deepspeed(files, tmp_path: Path, peft: str, config: str) -> None:
    """LoRA, PiSSA (its SVD factors must survive DeepSpeed's parameter broadcast), DoRA and state tuning
    train in the same loop; the saved adapter holds exactly the method's tensors."""
    out = tmp_path / peft
    flag = "peft_config" if peft == "state" else "lora_config"
    folder = {"peft_folder": "hf"} if peft == "dora" else {}  # and as a peft folder (tests/test_peft_folder.py)
    main(train_flags(files, out, peft=peft, **{flag: config}, epoch_count=1, epoch_steps=6, lr_init=3e-2, **folder))
    seen = losses(out)
    if peft == "state":  # a start state cannot store a successor table; it must still train
        assert all(np.isfinite(seen)) and adapter(out)["blocks.0.att.time_state"].abs().max() > 0
    else:
        assert sum(seen[-2:]) < sum(seen[:2])
    leaves = {k.rsplit(".", 1)[-1] for k in adapter(out)}
    want = {"lora": {"lora_A", "lora_B"}, "pissa": {"lora_A", "lora_B", "pissa_A0", "pissa_B0"},
            "dora": {"lora_A", "lora_B", "lora_magnitude_vector"}, "state": {"time_state"}}[peft]
    assert leaves == want
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["method"] == peft
    for name in ("rwkv-0", "rwkv-final") if folder else ():
        saved, (back, _) = adapter(out, f"{name}.pth"), read_peft_folder(out / f"{name}-peft")
        assert sorted(back) == sorted(saved) and all(torch.equal(back[k], v) for k, v in saved.items())


def test_messages_go_through_the_progress_bar(tmp_path, capsys):
    """With --progress 1, rank 0's notes (eval lines, skipped saves) are written above the bar."""
    from tqdm import tqdm

    from rwkv_peft.train import TrainConfig
    from rwkv_peft.train.recipe import Run

    run = Run(TrainConfig(), tmp_path, on_gpu=False, t_start=0.0)
    run.say("plain", 1)
    run.bar = tqdm(total=3, file=sys.stdout)
    run.say("above the bar", 2)
    run.bar.close()
    out = capsys.readouterr().out
    assert "plain 1\n" in out and "above the bar 2\n" in out
    Run(TrainConfig(), tmp_path, on_gpu=False, t_start=0.0, rank=1).say("not rank 0")
    assert "not rank 0" not in capsys.readouterr().out
