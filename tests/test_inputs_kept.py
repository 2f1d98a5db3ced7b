"""No tool writes over one of its own inputs, and every command line fails in one ``error: ...`` line.

An output that is an input (the same path, or the same file through a symlink or a hard link) is refused
before any work by ``files.check_not_input``, which make_binidx, the merges and the trainer share.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import tiny_run_files, token_stream, train_flags
from test_reliability import ROOT, mounted_tmpfs, one_line_error

from rwkv_peft import files
from rwkv_peft.data import make_binidx as make_binidx_mod
from rwkv_peft.data import writers
from rwkv_peft.train import main as train_main
from rwkv_peft.train.loggers import read_log

DOCS = "".join(json.dumps({"text": f"document {i}: caf\u00e9 \u4e2d\u6587"}) + "\n" for i in range(20))


def jsonl(path: Path, text: str = DOCS) -> Path:
    path.write_text(text)
    return path


def no_tokenizing(monkeypatch) -> None:
    """Any tokenizer load fails the test: the refusals must come before it."""
    def refuse(name):
        raise AssertionError(f"tokenizer {name} loaded before the checks")
    monkeypatch.setattr(writers, "get_tokenizer", refuse)


@pytest.mark.parametrize("chat", [False, True])
def test_make_binidx_refuses_to_write_over_its_input_which_survives(tmp_path, chat, monkeypatch):
    """The adversarial case: `--input data/x.bin --output data/x` once replaced the jsonl by the tokens
    (with --chat, PREFIX.mask.bin is an output too)."""
    no_tokenizing(monkeypatch)
    src = jsonl(tmp_path / ("x.mask.bin" if chat else "x.bin"))
    before = src.read_bytes()
    with pytest.raises(SystemExit) as e:
        make_binidx_mod.main(["--input", str(src), "--output", str(tmp_path / "x"), "--quiet"]
                             + (["--chat"] if chat else []))
    one_line_error(e, f"--output {tmp_path / 'x'}", f"--input {src}", "must not replace an input")
    assert src.read_bytes() == before and sorted(os.listdir(tmp_path)) == [src.name]


@pytest.mark.parametrize("link", ["symlink", "hard link", "symlinked dir", "folder holding"])
def test_same_file_check_sees_through_links(tmp_path, link):
    src = jsonl(tmp_path / "in.jsonl")
    if link == "folder holding":  # a folder output (export's) replaces the folder with all in it
        out = tmp_path
    elif link == "symlink":
        out = tmp_path / "out.bin"
        out.symlink_to(src)
    elif link == "hard link":
        out = tmp_path / "out.bin"
        os.link(src, out)
    else:
        (tmp_path / "alias").symlink_to(tmp_path)
        out = tmp_path / "alias" / "in.jsonl"
    with pytest.raises(ValueError, match="must not replace an input") as e:
        files.check_not_input({out: "--output X"}, {src: "--input Y"})
    assert ("hard link" in str(e.value)) == (link == "hard link") and "--output X" in str(e.value)
    assert ("folder holding" in str(e.value)) == (link == "folder holding")
    (tmp_path / "sub").mkdir(exist_ok=True)
    for fine in (tmp_path / "other.bin", tmp_path / "sub"):  # a new file, a folder beside the input
        files.check_not_input({fine: "--output X"}, {src: "--input Y"})


def test_make_binidx_hard_linked_idx_and_merge_symlinked_output_are_refused(tmp_path, monkeypatch):
    """Through the tools: a hard link at PREFIX.idx, a merge --output symlinked to its base."""
    from rwkv_peft.merge import main as merge_main

    no_tokenizing(monkeypatch)
    src = jsonl(tmp_path / "in.jsonl")
    os.link(src, tmp_path / "pre.idx")
    with pytest.raises(SystemExit) as e:
        make_binidx_mod.main(["--input", str(src), "--output", str(tmp_path / "pre"), "--quiet"])
    one_line_error(e, "(writes", "pre.idx) is a hard link to the input --input")
    base, adapter = tmp_path / "base.pth", tmp_path / "adapter.pth"
    base.write_bytes(b"never read"), adapter.write_bytes(b"never read")
    (tmp_path / "merged.pth").symlink_to(base)
    with pytest.raises(SystemExit) as e:
        merge_main(["--base_model", str(base), "--peft_checkpoint", str(adapter), "--output",
                    str(tmp_path / "merged.pth")])
    one_line_error(e, "--output", "resolves through a symlink to the input --base_model")
    assert base.read_bytes() == b"never read"


def test_trainer_refuses_a_proj_dir_output_that_is_its_base(tmp_path):
    data = tiny_run_files(tmp_path, 600)
    out = tmp_path / "run"
    out.mkdir()
    os.link(data["base"], out / "rwkv-final.pth")  # e.g. a base copied in by hard link, then trained "in place"
    with pytest.raises(SystemExit) as e:
        train_main(train_flags(data, out))
    one_line_error(e, f"--proj_dir {out}", "rwkv-final.pth", "hard link to the input --load_model")
    assert sorted(os.listdir(out)) == ["rwkv-final.pth"]


def test_make_binidx_read_only_or_full_output_is_named_before_tokenizing(tmp_path, monkeypatch):
    """The adversarial case: a read-only output directory once failed after tokenising everything,
    naming a hidden temp file; the free space is estimated up front too."""
    src = jsonl(tmp_path / "in.jsonl", DOCS * 800)  # ~700 KB: ~350 KB of uint16 tokens expected
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        no_tokenizing(monkeypatch)
        with pytest.raises(SystemExit) as e:
            make_binidx_mod.main(["--input", str(src), "--output", str(ro / "x"), "--quiet"])
        one_line_error(e, f"--output {ro / 'x'}", "read-only file system or no permission")
    monkeypatch.undo()
    with mounted_tmpfs(tmp_path / "full", "size=64k") as full:
        with pytest.raises(SystemExit) as e:
            make_binidx_mod.main(["--input", str(src), "--output", str(full / "x"), "--quiet"])
        one_line_error(e, f"--output {full / 'x'}", "MiB free")
        assert os.listdir(full) == []


@pytest.mark.parametrize("module", ["rwkv_peft.data.make_binidx", "rwkv_peft.train", "rwkv_peft.merge",
                                    "rwkv_peft.tools.init_model", "rwkv_peft.generate", "merge/merge_state.py"])
def test_argparse_errors_are_one_error_line(module, capsys):
    if module.endswith(".py"):  # a script beside the package
        spec = importlib.util.spec_from_file_location("script", ROOT / module)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(module)
    with pytest.raises(SystemExit) as e:
        mod.main(["--no_such_flag", "1"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "", (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0], err


# ----------------------------------------------------------------------------- resume with other settings


def test_resume_refuses_changed_settings_unless_allowed(tmp_path, capfd):
    """The adversarial case: a resume with another ctx_len and data file once went on silently. A moved
    copy of the same data is no change; --resume_changes allow goes on and logs what changed."""
    data = tiny_run_files(tmp_path, 1200)
    out = tmp_path / "run"
    train_main(train_flags(data, out, epoch_steps=2, epoch_count=1))
    for ext in (".bin", ".idx"):  # the same tokens under another name
        shutil.copy(data["data"] + ext, tmp_path / f"moved{ext}")
    moved = {**data, "data": str(tmp_path / "moved")}
    train_main(train_flags(moved, out, epoch_steps=2, epoch_count=1, resume=1))
    assert "resume_changes" not in read_log(out / "train_log.jsonl")[-1]

    token_stream(tmp_path / "other", 256, 1500)
    other = {**data, "data": str(tmp_path / "other"), "n_tokens": 1500}
    changed = train_flags(other, out, 32, epoch_steps=2, epoch_count=1, resume=1)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir())
    with pytest.raises(SystemExit) as e:
        train_main(changed)
    msg = one_line_error(e, "--resume 1", "ctx_len 16 -> 32", f"data_file {data['data']} (", "--resume_changes allow")
    assert f"-> {other['data']} (" in msg and "lr_init" not in msg
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.iterdir()) == before  # nothing written

    capfd.readouterr()
    summary = train_main([*changed, "--resume_changes", "allow"])
    logged = [r for r in read_log(out / "train_log.jsonl") if "resume_changes" in r]
    assert len(logged) == 1 and logged[0]["step"] == 2 and summary["resume_changes"] == logged[0]["resume_changes"]
    assert any(c.startswith("ctx_len 16 -> 32") for c in summary["resume_changes"])
    assert "changed: resumed with other settings" in capfd.readouterr().out
