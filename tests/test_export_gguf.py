"""GGUF written directly equals, tensor by tensor and in metadata, what llama.cpp's own converter
(``convert_hf_to_gguf.py``, from the llama-cpp-python sdist) makes from our HF export of the same model.

The converter is fetched once into ``~/.cache/rwkv_peft/llama_cpp`` with ``pip download --no-binary :all:``
(no build); without network the test is skipped, saying so. llama.cpp's runtime on the written file is in
``test_export_runtime.py`` (``sh scripts/check_runtimes.sh``).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import perturbed

from rwkv_peft.export.model import main
from rwkv_peft.model import save_model

LLAMA_CPP_PYTHON = "0.3.36"
VOCAB = 65536  # GGUF's rwkv tokenizer holds the whole World vocab


def cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rwkv_peft" / "llama_cpp"


def llama_cpp_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py (with its conversion/ and gguf-py/) as the sdist ships it."""
    cache = cache_dir()
    root = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
               f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(cache)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            pytest.skip(f"llama.cpp's converter: pip download llama-cpp-python=={LLAMA_CPP_PYTHON} timed out")
        if not sdist.is_file():
            why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"llama.cpp's converter: pip download llama-cpp-python=={LLAMA_CPP_PYTHON} failed ({why})")
    keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdist) as tf:
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        members = [m for m in tf.getmembers() if m.name.startswith(prefix)
                   and m.name[len(prefix):].startswith(keep)]
        tf.extractall(cache, members=members, filter="data")
    return script


def convert(folder: Path, out: Path, outtype: str) -> None:
    """Run llama.cpp's converter on an HF folder (its own gguf-py, as it does by default)."""
    proc = subprocess.run([sys.executable, str(llama_cpp_converter()), str(folder), "--outfile", str(out),
                           "--outtype", outtype], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]


def export(*args: str) -> str:
    """``python -m rwkv_peft.export ARGS`` in this process (its stdout returned)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(args)) == 0
    return out.getvalue()


def read_gguf(path: Path) -> tuple[dict, dict]:
    from gguf import GGUFReader

    r = GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), np.array(t.data)) for t in r.tensors}
    return kv, tensors


@pytest.mark.parametrize("version,dtype,outtype", [("x070", torch.float32, "q8_0"), ("x070", torch.bfloat16, "f16"),
                                                   ("x060", torch.float32, "bf16")])
def test_direct_gguf_equals_llama_cpp_converter(tmp_path, version, dtype, outtype):
    llama_cpp_converter()  # skip early when unavailable
    model = perturbed(version, n_layer=2, n_embd=64, vocab=VOCAB, head_size=32 if version == "x060" else 64)
    (tmp_path / "pth").mkdir()
    path = tmp_path / "pth" / "tiny-rwkv.pth"  # the GGUF's general.name comes from the model's file / folder name
    save_model(model, path, dtype=dtype)
    export("--model", str(path), "--format", "hf", "--output", str(tmp_path / "tiny-rwkv"))
    convert(tmp_path / "tiny-rwkv", tmp_path / "reference.gguf", outtype)
    source = tmp_path / "tiny-rwkv" if version == "x060" else path  # also from the HF folder (the import path)
    out = export("--model", str(source), "--format", "gguf", "--dtype", outtype, "--output",
                 str(tmp_path / "ours.gguf"))
    assert out.splitlines()[-1].startswith(f"check: {tmp_path / 'ours.gguf'} re-read:")
    ours_kv, ours = read_gguf(tmp_path / "ours.gguf")
    ref_kv, ref = read_gguf(tmp_path / "reference.gguf")
    assert ours_kv == ref_kv
    assert ours_kv["tokenizer.ggml.model"] == "rwkv" and ours_kv["general.architecture"] == f"rwkv{version[2]}"
    assert sorted(ours) == sorted(ref)
    for name, (qtype, shape, data) in ours.items():
        assert (qtype, shape) == ref[name][:2], name
        assert np.array_equal(data, ref[name][2]), name
    types = {q for q, _, _ in ours.values()}
    assert {"F32", outtype.upper()} <= types | {"F32"}


def test_vocab_too_small_for_gguf_is_one_error(tmp_path):
    save_model(perturbed("x070", n_layer=1, n_embd=64, vocab=300), tmp_path / "m.pth")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "m.pth"), "--format", "gguf", "--output", str(tmp_path / "m.gguf")])
    assert str(e.value) == (f"error: {tmp_path / 'm.pth'}: vocab size 300 cannot hold the World vocab's 65530 "
                            "tokens (GGUF tokenizer.ggml.model rwkv); export this model as hf or pth instead")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))
