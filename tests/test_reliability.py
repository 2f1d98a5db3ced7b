"""Nothing lost, nothing silently wrong: kills, corrupt files, full and read-only disks, shared directories.

Kills are aimed, not timed: RWKV_PEFT_PAUSE_BEFORE_RENAME=GLOB[#N] makes a subprocess stop just before
the N-th rename of a file matching GLOB and say so on stderr; the test then sends SIGKILL (or SIGTERM).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import perturbed_model, tiny_run_files, train_flags

from rwkv_peft import files
from rwkv_peft.model import read_state_dict, save_model
from rwkv_peft.train import main
from rwkv_peft.train.loggers import read_log, truncate_log

VOCAB, CTX = 256, 16
ROOT = Path(__file__).resolve().parents[1]
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """A tiny fp32 x070 base and a learnable binidx token stream."""
    return tiny_run_files(tmp_path_factory.mktemp("rel"), 3000, VOCAB)


def flags(data: dict, out: Path, **kw) -> list[str]:
    return train_flags(data, out, CTX, **{"epoch_steps": 2, **kw})


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run every killed-and-resumed run must equal."""
    out = tmp_path_factory.mktemp("reference")
    main(flags(data, out))
    return out


def leftovers(d: Path) -> list[str]:
    """Temps and locks: what a finished (or cleaned-up) run must not leave behind."""
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def sub_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def run_until_paused(cmd: list[str], target: str, timeout: float = 240) -> subprocess.Popen:
    """Start ``cmd`` with the pause hook aimed at ``target`` and return once it waits before that rename."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=sub_env(**{files.PAUSE_ENV: target}), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline, seen = time.time() + timeout, []
    while time.time() < deadline:
        line = p.stderr.readline()
        if not line and p.poll() is not None:
            break
        seen.append(line)
        if line.startswith("paused before rename:"):
            return p
    p.kill()
    raise AssertionError(f"never paused before {target}:\n{''.join(seen)[-3000:]}")


def kill(p: subprocess.Popen, sig: int = signal.SIGKILL) -> int:
    p.send_signal(sig)
    rc = p.wait(timeout=60)
    p.stderr.close()
    return rc


def adapter_equal(a: Path, b: Path) -> bool:
    x, y = read_state_dict(a), read_state_dict(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def one_line_error(e: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


# ----------------------------------------------------------------------------- kills during training


def test_killed_training_resumes_to_the_uninterrupted_result(data, reference, tmp_path, capfd):
    """SIGKILL after the last trainer_state.pt, before rwkv-final.pth's rename (a kill there once lost
    rwkv-final.pth for good): --resume 1 ends with every output, equal to the uninterrupted run's."""
    out = tmp_path / "run"
    p = run_until_paused([sys.executable, "-m", "rwkv_peft.train", *flags(data, out)], "rwkv-final.pth")
    assert kill(p) == -signal.SIGKILL
    left = leftovers(out)
    assert files.LOCK_NAME in left and any(".tmp" in n for n in left)  # what a kill leaves
    with open(out / "train_log.jsonl", "a") as f:  # and a record torn by the kill
        f.write('{"step": 9, "lo')
    main(flags(data, out, resume=1))
    err = capfd.readouterr().err
    assert "taking over the lock" in err and "removed 1 temp file" in err and "torn last line" in err
    assert leftovers(out) == []
    assert adapter_equal(out / "rwkv-final.pth", reference / "rwkv-final.pth")
    assert [r["loss"] for r in read_log(out / "train_log.jsonl")] == \
        [r["loss"] for r in read_log(reference / "train_log.jsonl")]
    assert (out / "loss.png").stat().st_size > 1000 and (out / "adapter_config.json").is_file()


def test_second_run_on_a_busy_proj_dir_is_refused(data, tmp_path):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom rwkv_peft.files import dir_lock\n"
                               "with dir_lock(sys.argv[1]):\n print('locked', flush=True)\n time.sleep(600)",
                               str(out)], cwd=ROOT, env=sub_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as e:
            main(flags(data, out))
        one_line_error(e, "--proj_dir", "another run is using it", f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert sorted(p.name for p in out.iterdir()) == [files.LOCK_NAME]  # the refused run wrote nothing


def test_signals_remove_live_temps_but_an_ignored_sigterm_stays_ignored(tmp_path):
    """SIGTERM during a write: the temp is gone and the process dies by the signal, the target untouched;
    a process that ignores SIGTERM keeps ignoring it (the cleanup handler is not installed over SIG_IGN)."""
    code = ("import os, signal, sys\nfrom pathlib import Path\nfrom rwkv_peft import files\n"
            "if sys.argv[2] == 'ignore':\n signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "with files.atomic_path(Path(sys.argv[1])) as tmp:\n tmp.write_text('new')\n"
            " os.kill(os.getpid(), signal.SIGTERM)\nprint('survived', flush=True)\n")
    target = tmp_path / "out.txt"
    target.write_text("old")
    r = subprocess.run([sys.executable, "-c", code, str(target), "handle"], cwd=ROOT, env=sub_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGTERM and target.read_text() == "old" and leftovers(tmp_path) == []
    r = subprocess.run([sys.executable, "-c", code, str(target), "ignore"], cwd=ROOT, env=sub_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "survived" in r.stdout and target.read_text() == "new"


# ----------------------------------------------------------------------------- bad inputs, one line each


def flip(src: str | Path, dst: Path, where: float = 0.5, n: int = 64) -> Path:
    b = bytearray(Path(src).read_bytes())
    i = int(len(b) * where)
    b[i:i + n] = bytes(x ^ 0xFF for x in b[i:i + n])
    dst.write_bytes(bytes(b))
    return dst


def test_bit_rot_in_the_base_is_named_before_training(data, tmp_path):
    bad = flip(data["base"], tmp_path / "rotten.pth")
    with pytest.raises(SystemExit) as e:
        main(flags(data, tmp_path / "out", load_model=bad))
    one_line_error(e, str(bad), "CRC-32 mismatch")
    assert not (tmp_path / "out").exists()


def test_nan_base_is_named_before_training(data, tmp_path):
    sd = read_state_dict(data["base"], mmap=False)
    sd["blocks.0.ffn.value.weight"][3, 5] = float("inf")
    save_model(sd, tmp_path / "nan.pth")
    with pytest.raises(SystemExit) as e:
        main(flags(data, tmp_path / "out", load_model=tmp_path / "nan.pth"))
    one_line_error(e, "nan.pth", "blocks.0.ffn.value.weight", "NaN/inf")
    assert not (tmp_path / "out").exists()


class _Evil:
    def __reduce__(self):
        return os.system, ("touch pwned",)


@pytest.mark.parametrize("damage", ["truncated", "pickle", "not_a_state"])
def test_damaged_trainer_state_is_one_line_and_runs_nothing(data, reference, tmp_path, damage, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    state = out / "trainer_state.pt"
    if damage == "truncated":
        state.write_bytes((reference / "trainer_state.pt").read_bytes()[:5000])
    elif damage == "pickle":
        torch.save({"epoch": 0, "payload": _Evil()}, state)
    else:
        torch.save({"epoch": torch.zeros(1)}, state)
    needle = {"truncated": "truncated or corrupt", "pickle": "refused to load", "not_a_state": "not a trainer state"}
    if damage == "pickle":  # a fresh process, as users run it: its error path tears down a group DeepSpeed never set up
        r = subprocess.run([sys.executable, "-m", "rwkv_peft.train", *flags(data, out, resume=1)], cwd=tmp_path,
                           env=sub_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and str(state) in last and needle[damage] in last, last
    else:
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit) as e:
            main(flags(data, out, resume=1))
        one_line_error(e, str(state), needle[damage])
    assert not (tmp_path / "pwned").exists()
    assert leftovers(out) == []


def test_diverging_lr_fails_and_keeps_the_last_good_checkpoint(data, tmp_path):
    """lr 1e6 after a sane epoch: non-zero exit naming the cause, no rwkv-final.pth, rwkv-0.pth kept."""
    out = tmp_path / "out"
    main(flags(data, out, epoch_count=1))
    good = (out / "rwkv-0.pth").read_bytes()
    with pytest.raises(SystemExit) as e:
        main(flags(data, out, epoch_count=3, epoch_begin=0, resume=1, lr_init=1e6, lr_final=1e6, max_bad_steps=2,
                   resume_changes="allow"))
    one_line_error(e, "diverged", "--lr_init", "rwkv-0.pth", "no rwkv-final.pth")
    assert not (out / "rwkv-final.pth").exists() and (out / "rwkv-0.pth").read_bytes() == good
    assert leftovers(out) == []


def test_run_whose_every_step_was_skipped_fails(data, tmp_path, monkeypatch):
    import rwkv_peft.train.objectives.lm as lm

    monkeypatch.setattr(lm, "masked_loss", lambda model, idx, *a: model(idx).sum() * float("nan"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(flags(data, out))
    one_line_error(e, "every one of the 4 steps had a NaN/inf loss", "check --data_file")
    assert not (out / "rwkv-final.pth").exists()


def test_strict_makes_a_bad_data_line_an_error(data, tmp_path, capfd):
    good = json.dumps({"text": "abc"})
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join([good, "{not json", *[good] * 20]) + "\n")
    base = tmp_path / "world.pth"  # the World tokenizer needs the full vocab
    save_model(perturbed_model(n_layer=1, n_embd=32, vocab=65536, head_size=32), base)
    kw = dict(load_model=base, data_file=jsonl, data_type="jsonl", magic_prime=0, ctx_len=4, micro_bsz=1,
              epoch_steps=1, epoch_count=1)
    with pytest.raises(SystemExit) as e:
        main(flags(data, tmp_path / "strict", strict=1, **kw))
    one_line_error(e, f"{jsonl}:2: not JSON")
    main(flags(data, tmp_path / "lenient", **kw))
    assert "skipped 1 lines: 1 not JSON (first at line 2)" in capfd.readouterr().err


def test_log_reader_drops_only_a_torn_last_line(tmp_path, capsys):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_log(log)] == [1, 2]
    assert f"{log}:3: dropped a torn last line" in capsys.readouterr().err
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=rf"{log}:2: not a log record"):
        read_log(log)
    truncate_log(log, -1)  # a fresh run does not even read it
    assert log.read_text() == ""


# ----------------------------------------------------------------------------- read-only and full disks


@contextlib.contextmanager
def mounted_tmpfs(where: Path, options: str):
    """A small tmpfs (root only; skipped elsewhere): a real full or read-only file system."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_read_only_proj_dir_is_one_line_before_loading(data, tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        with pytest.raises(SystemExit) as e:
            main(flags(data, ro / "out"))
        one_line_error(e, "--proj_dir", "read-only file system or no permission")


def test_full_disk_during_training_is_one_line_and_leaves_no_temp(data, tmp_path):
    with mounted_tmpfs(tmp_path / "full", "size=48k") as full:
        out = full / "out"
        with pytest.raises(SystemExit) as e:
            main(flags(data, out))
        one_line_error(e, str(out), "No space left on device")
        assert leftovers(out) == [] and not (out / "rwkv-final.pth").exists()


# ----------------------------------------------------------------------------- the scripts


def script_env(**kw: str) -> dict[str, str]:
    venv = Path(sys.executable).parent
    return sub_env(PATH=f"{venv}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=sys.prefix, ACCELERATOR="cpu",
                   OP="torch", CTX_LEN=str(CTX), MICRO_BSZ="2", EPOCH_STEPS="1", EPOCH_COUNT="1", VERIFY="0", **kw)


def test_readme_binidx_example_runs_and_a_failed_step_stops_the_script(data, tmp_path):
    """`DATA_FILE=prefix DATA_TYPE=binidx sh scripts/run_miss.sh` (the README's example; its bug was in the
    script's data check, so the merge is left out here) trains; a base the trainer refuses stops the script
    before the merge."""
    env = script_env(LOAD_MODEL=data["base"], DATA_FILE=data["data"], DATA_TYPE="binidx",
                     PROJ_DIR=str(tmp_path / "run"), MERGE="0")
    r = subprocess.run(["sh", "scripts/run_miss.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert read_state_dict(tmp_path / "run" / "rwkv-final.pth")
    sd = read_state_dict(data["base"], mmap=False)
    sd["emb.weight"][0, 0] = float("nan")
    save_model(sd, tmp_path / "nan.pth")
    env.update(LOAD_MODEL=str(tmp_path / "nan.pth"), PROJ_DIR=str(tmp_path / "nan"), OUTPUT=str(tmp_path / "m2.pth"),
               MERGE="1")
    r = subprocess.run(["sh", "scripts/run_miss.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "emb.weight holds NaN/inf" in r.stderr and "[merge]" not in r.stdout
    assert not (tmp_path / "m2.pth").exists()


# ----------------------------------------------------------------------------- the merge and init_model


@pytest.fixture(scope="module")
def adapter(data, tmp_path_factory) -> Path:
    """A MiSS adapter (non-zero shards) for the tiny base, with its adapter_config.json."""
    from rwkv_peft.model import load_model
    from rwkv_peft.peft.inject import adapter_config, apply_peft, parse_peft_config, trainable_state_dict

    model = load_model(data["base"], op="torch")
    cfg = parse_peft_config("miss", '{"r": 8}')
    apply_peft(model, "miss", cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    d = tmp_path_factory.mktemp("adapter")
    torch.save(trainable_state_dict(model), d / "rwkv-final.pth")
    (d / "adapter_config.json").write_text(json.dumps(adapter_config(model, "miss", cfg)))
    return d / "rwkv-final.pth"


def merge_args(base, adapter_path, out, *extra) -> list[str]:
    return ["--base_model", str(base), "--peft_checkpoint", str(adapter_path), "--output", str(out), "--quiet",
            *extra]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["KILL", "TERM", "INT"])
def test_merge_killed_before_its_rename_keeps_the_old_output(data, adapter, tmp_path, sig, capfd):
    """A kill leaves the old output intact (a hidden temp beside it, removed by the next merge to that
    output); SIGTERM and SIGINT remove the temp themselves."""
    from rwkv_peft.merge import main as merge_main

    out = tmp_path / "merged.pth"
    out.write_bytes(b"the previous output")
    p = run_until_paused([sys.executable, "merge/merge_miss.py", *merge_args(data["base"], adapter, out)],
                         "merged.pth")
    assert kill(p, sig) == -sig
    assert out.read_bytes() == b"the previous output"
    assert len(leftovers(tmp_path)) == (1 if sig == signal.SIGKILL else 0)
    merge_main(merge_args(data["base"], adapter, out))
    assert ("removed 1 temp file" in capfd.readouterr().err) == (sig == signal.SIGKILL)
    assert leftovers(tmp_path) == [] and read_state_dict(out)


def test_bit_rot_and_a_base_passed_as_adapter_are_refused_by_name(data, adapter, tmp_path):
    from rwkv_peft.merge import main as merge_main

    (tmp_path / "adapter_config.json").write_text((adapter.parent / "adapter_config.json").read_text())
    rotten = flip(adapter, tmp_path / "rwkv-final.pth")
    out = tmp_path / "out" / "merged.pth"
    out.parent.mkdir()
    cases = [(data["base"], rotten, f"{rotten}: corrupt: CRC-32 mismatch"),
             (flip(data["base"], tmp_path / "base.pth"), adapter, f"{tmp_path / 'base.pth'}: corrupt"),
             (data["base"], data["base"], "holds no adapter tensors")]
    for base, ad, needle in cases:
        with pytest.raises(SystemExit) as e:
            merge_main(merge_args(base, ad, out))
        one_line_error(e, needle)
    assert list(out.parent.iterdir()) == []


def test_verify_over_tolerance_or_nan_exits_nonzero_and_writes_nothing(tmp_path, monkeypatch):
    import rwkv_peft.merge as merge_mod
    from rwkv_peft.model import load_model
    from rwkv_peft.peft.inject import adapter_config, apply_peft, parse_peft_config, trainable_state_dict

    base = tmp_path / "world.pth"  # the verify prompt is World-tokenized
    save_model(perturbed_model(n_layer=1, n_embd=32, vocab=65536, head_size=32), base)
    model = load_model(base, op="torch")
    apply_peft(model, "miss", cfg := parse_peft_config("miss", '{"r": 8}'))
    torch.save(trainable_state_dict(model), tmp_path / "rwkv-final.pth")
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapter_config(model, "miss", cfg)))
    out = tmp_path / "out" / "merged.pth"
    out.parent.mkdir()
    argv = merge_args(base, tmp_path / "rwkv-final.pth", out, "--verify", "--n_tokens", "1")
    merge_mod.main(argv)  # within the default tolerance
    out.unlink()
    with pytest.raises(SystemExit) as e:
        merge_mod.main([*argv, "--verify_tol", "1e-12"])
    one_line_error(e, str(out), "over the tolerance 1e-12", "not written")
    import rwkv_peft.runtime as runtime  # a runtime answering NaN: the difference is NaN, never "within"

    monkeypatch.setattr(runtime, "runtime_logits", lambda rt, tokens, mode: torch.full((len(tokens), 65536), torch.nan))
    with pytest.raises(SystemExit) as e:
        merge_mod.main(argv)
    one_line_error(e, "max |logit diff| nan")
    assert list(out.parent.iterdir()) == []


def test_missing_read_only_or_full_output_dirs_are_one_line(data, adapter, tmp_path):
    from rwkv_peft.merge import main as merge_main
    from rwkv_peft.tools.init_model import main as init_main

    init = ["--n_layer", "1", "--n_embd", "64", "--vocab_size", "4096", "--dtype", "fp32"]
    out = tmp_path / "missing" / "x.pth"
    with pytest.raises(SystemExit) as e:
        merge_main(merge_args(data["base"], adapter, out))
    one_line_error(e, f"--output {out}", "does not exist")
    with pytest.raises(SystemExit) as e:
        init_main([*init, "--out", str(out)])
    one_line_error(e, f"--out {out}", "does not exist")
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        with pytest.raises(SystemExit) as e:
            merge_main(merge_args(data["base"], adapter, ro / "m.pth"))
        one_line_error(e, "--output", "read-only file system or no permission")
        with pytest.raises(SystemExit) as e:
            init_main([*init, "--out", str(ro / "i.pth")])
        one_line_error(e, "--out", "read-only file system or no permission")
    with mounted_tmpfs(tmp_path / "full", "size=256k") as full:  # the base is ~420 KB, the init ~1.2 MB
        with pytest.raises(SystemExit) as e:
            merge_main(merge_args(data["base"], adapter, full / "m.pth"))
        one_line_error(e, f"--output {full / 'm.pth'}", "MiB free")
        with pytest.raises(SystemExit) as e:  # no estimate up front: the disk fills while torch writes
            init_main([*init, "--out", str(full / "i.pth")])
        one_line_error(e, str(full / "i.pth"), "No space left on device")
        assert list(full.iterdir()) == []
