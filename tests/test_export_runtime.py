"""GGUF exports in llama.cpp itself (llama-cpp-python): its logits equal the `rwkv` runtime's, for RWKV-7 and
RWKV-6, in one pass and continuing from its recurrent state. Marked ``runtime`` (needs llama-cpp-python,
which compiles llama.cpp): ``sh scripts/check_runtimes.sh`` installs it and runs these."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from helpers import perturbed

from rwkv_peft.export.model import main as export
from rwkv_peft.model import save_model
from rwkv_peft.runtime import load_runtime, runtime_logits

pytestmark = pytest.mark.runtime
TOKENS = [33, 2001, 510, 4090, 11, 65000, 7, 300, 12345, 261, 0, 42, 19999, 5]
# F32: the bound. F16 / Q8_0: weights rounded to 11 / ~8 significant bits (and llama.cpp's Q8_0 dot
# products round the activations to 8 bits too), relative to the largest logit.
TOLERANCE = {"f32": 1e-4, "f16": 5e-3, "q8_0": 3e-2}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("rt")
    out = {}
    for version in ("x070", "x060"):
        path = d / f"{version}.pth"
        save_model(perturbed(version, n_layer=2, n_embd=128, vocab=65536), path)
        out[version] = (path, runtime_logits(load_runtime(path, version), TOKENS))
    return out


def llama_logits(path, tokens: list[int], split: int | None = None) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, n_batch=64, n_threads=2, verbose=False)
    if split is None:
        llm.eval(tokens)
    else:  # the second part continues from the recurrent state the first left
        llm.eval(tokens[:split])
        llm.eval(tokens[split:])
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


@pytest.mark.parametrize("version", ["x070", "x060"])
@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_llama_cpp_runs_the_gguf_with_runtime_logits(tmp_path, models, version, dtype):
    path, want = models[version]
    with contextlib.redirect_stdout(io.StringIO()):
        assert export(["--model", str(path), "--format", "gguf", "--dtype", dtype, "--output",
                       str(tmp_path / "m.gguf")]) == 0
    want = want.numpy()
    scale = 1.0 if dtype == "f32" else float(np.abs(want).max())
    for split in (None, 5):
        got = llama_logits(tmp_path / "m.gguf", TOKENS, split)
        diff = float(np.abs(got - want).max())
        print(f"\n{version} {dtype} {'one pass' if split is None else 'in two parts'}: max |logit diff| {diff:.3g} "
              f"(max |logit| {np.abs(want).max():.3g})")
        assert diff <= TOLERANCE[dtype] * scale
