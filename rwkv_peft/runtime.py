"""The official `rwkv` pip package as ground truth: load a .pth in its runtime and run it."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import io
import os
from pathlib import Path
from types import ModuleType

import torch

_MODULES: dict[bool, ModuleType] = {}


def runtime_module(v7: bool) -> ModuleType:
    """``rwkv.model`` imported privately with RWKV_V7_ON set (x070) or unset (x060/x052).

    The package reads the flag once at import, so each setting gets its own module object.
    """
    if v7 not in _MODULES:
        import rwkv

        src = Path(rwkv.__file__).with_name("model.py")
        spec = importlib.util.spec_from_file_location(f"_rwkv_runtime_v7_{int(v7)}", src)
        module = importlib.util.module_from_spec(spec)
        with _runtime_env(v7), contextlib.redirect_stdout(io.StringIO()):
            spec.loader.exec_module(module)
        _MODULES[v7] = module
    return _MODULES[v7]


@contextlib.contextmanager
def _runtime_env(v7: bool = False):
    """The package's flags, set only while it runs: its v5/v6 class also reads them when built and called."""
    saved = {k: os.environ.get(k) for k in ("RWKV_V7_ON", "RWKV_CUDA_ON", "RWKV_JIT_ON")}
    os.environ.update(RWKV_V7_ON="1" if v7 else "0", RWKV_CUDA_ON="0", RWKV_JIT_ON="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_runtime(path: str | os.PathLike, version: str = "x070", strategy: str = "cpu fp32"):
    """The runtime's model for ``path`` (a .pth file)."""
    path = Path(path)
    if path.suffix != ".pth":
        raise ValueError(f"{path}: the rwkv runtime loads .pth files only")
    module = runtime_module(version == "x070")
    gc.freeze()  # its loader calls gc.collect() per layer: skip re-scanning the caller's whole heap each time
    try:
        with _runtime_env(), contextlib.redirect_stdout(io.StringIO()):
            return module.RWKV(str(path.with_suffix("")), strategy)
    finally:
        gc.unfreeze()


@torch.no_grad()
def runtime_logits(model, tokens: list[int], mode: str = "seq") -> torch.Tensor:
    """Logits (T, V) for ``tokens`` from the runtime, as one sequence or token by token (rnn)."""
    with _runtime_env():
        if mode == "seq":
            out, _ = model.forward(list(tokens), None, full_output=True)
            return out.float().reshape(len(tokens), -1)
        state, outs = None, []
        for t in tokens:
            out, state = model.forward([t], state)
            outs.append(out.float().reshape(-1))
        return torch.stack(outs)


@torch.no_grad()
def runtime_generate(model, tokens: list[int], n: int) -> list[int]:
    """Greedy continuation of ``tokens`` by ``n`` tokens in the runtime's RNN mode."""
    new = []
    with _runtime_env():
        out, state = model.forward(list(tokens), None)
        for _ in range(n):
            t = int(out.float().reshape(-1).argmax())
            new.append(t)
            out, state = model.forward([t], state)
    return new
