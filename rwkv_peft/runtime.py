"""The official `rwkv` pip package as ground truth: load a .pth in its runtime and run it."""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import io
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

_MODULES: dict[tuple[bool, bool], ModuleType] = {}


def runtime_module(v7: bool, deepembed: bool = False) -> ModuleType:
    """``rwkv.model`` imported privately with RWKV_V7_ON set (x070) or unset (x060/x052), and
    RWKV_DE_VERSION=1 for RWKV-7a DeepEmbed files.

    The package reads these flags once at import, so each setting gets its own module object.
    """
    key = (v7, deepembed)
    if key not in _MODULES:
        import rwkv

        src = Path(rwkv.__file__).with_name("model.py")
        spec = importlib.util.spec_from_file_location(f"_rwkv_runtime_v7_{int(v7)}_de_{int(deepembed)}", src)
        module = importlib.util.module_from_spec(spec)
        with _runtime_env(v7, deepembed), contextlib.redirect_stdout(io.StringIO()):
            spec.loader.exec_module(module)
        _MODULES[key] = module
    return _MODULES[key]


@contextlib.contextmanager
def _runtime_env(v7: bool = False, deepembed: bool = False):
    """The package's flags, set only while it runs: its v5/v6 class also reads them when built and called,
    its x070 loader reads RWKV_DE_VERSION (folding DeepEmbed's embedding residual)."""
    saved = {k: os.environ.get(k) for k in ("RWKV_V7_ON", "RWKV_CUDA_ON", "RWKV_JIT_ON", "RWKV_DE_VERSION")}
    os.environ.update(RWKV_V7_ON="1" if v7 else "0", RWKV_CUDA_ON="0", RWKV_JIT_ON="1",
                      RWKV_DE_VERSION="1" if deepembed else "0")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_runtime(path: str | os.PathLike, version: str = "x070", strategy: str = "cpu fp32"):
    """The runtime's model for ``path`` (a .pth file); an x070 file with DeepEmbed tensors (RWKV-7a)
    is run with RWKV_DE_VERSION=1."""
    from rwkv_peft.model.checkpoint import read_specs

    path = Path(path)
    if path.suffix != ".pth":
        raise ValueError(f"{path}: the rwkv runtime loads .pth files only")
    keys = [k for k, _, _ in read_specs(path)] if version == "x070" else []
    if any(".qkv." in k for k in keys):
        raise ValueError(f"{path}: an RWKV-7b file (DeepEmbed attention, blocks.N.qkv.*): the rwkv runtime does "
                         "not run it (RWKV-LM's rwkv_v7b_demo.py does)")
    de = any(k.endswith(".ffn.s_emb.weight") for k in keys)
    module = runtime_module(version == "x070", de)
    gc.freeze()  # its loader calls gc.collect() per layer: skip re-scanning the caller's whole heap each time
    try:
        with _runtime_env(version == "x070", de), contextlib.redirect_stdout(io.StringIO()):
            return module.RWKV(str(path.with_suffix("")), strategy)
    finally:
        gc.unfreeze()


def runtime_initial_state(model, time_states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The runtime's recurrent state whose WKV part is a learnt start state, shifts zero.

    ``time_states`` are per-layer (H, N, N) tensors indexed [value, key], the layout of
    ``blocks.N.att.time_state`` in this package and in RWKV-PEFT's state files. The runtime's
    x070 class keeps its WKV state as [value, key] too; its v5/v6 class keeps [key, value] (and
    transposes a ``time_state`` it finds in a model file the same way).
    """
    if hasattr(model, "generate_zero_state"):  # x070
        state = model.generate_zero_state()
        for i, ts in enumerate(time_states):
            state[i * 3 + 1] = ts.to(device=state[i * 3 + 1].device, dtype=torch.float32).clone()
        return state
    state = []
    for i, ts in enumerate(time_states):
        dev, atype = model.strategy[i].device, model.strategy[i].atype
        zeros = torch.zeros(model.args.n_embd, dtype=atype, device=dev)
        state += [zeros, ts.transpose(1, 2).to(device=dev, dtype=torch.float32).contiguous(), zeros.clone()]
    return state


@torch.no_grad()
def runtime_logits(model, tokens: list[int], mode: str = "seq", state: list | None = None) -> torch.Tensor:
    """Logits (T, V) for ``tokens`` from the runtime, as one sequence or token by token (rnn),
    starting from ``state`` (e.g. ``runtime_initial_state``; None: zeros)."""
    state = None if state is None else [s.clone() for s in state]
    with _runtime_env():
        if mode == "seq":
            out, _ = model.forward(list(tokens), state, full_output=True)
            return out.float().reshape(len(tokens), -1)
        outs = []
        for t in tokens:
            out, state = model.forward([t], state)
            outs.append(out.float().reshape(-1))
        return torch.stack(outs)


@torch.no_grad()
def runtime_generate(model, tokens: list[int], n: int, state: list | None = None) -> list[int]:
    """Greedy continuation of ``tokens`` by ``n`` tokens in the runtime's RNN mode (from ``state``)."""
    new = []
    state = None if state is None else [s.clone() for s in state]
    with _runtime_env():
        out, state = model.forward(list(tokens), state)
        for _ in range(n):
            t = int(out.float().reshape(-1).argmax())
            new.append(t)
            out, state = model.forward([t], state)
    return new
