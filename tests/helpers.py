"""Test helpers shared by several modules: tiny models perturbed away from their init, data files, tiny
training runs, op parity on a model, and the CUDA kernels' device code run on CPU threads."""

from __future__ import annotations

import ctypes
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwkv_peft.data import BinIdxWriter, largest_magic_prime
from rwkv_peft.model import RWKV7, VERSIONS, init_model, save_model
from rwkv_peft.ops.build import CSRC


def perturbed(version: str, n_layer: int = 2, n_embd: int = 128, vocab: int = 300, head_size: int = 64,
              seed: int = 0, op: str = "torch", **dims: int) -> nn.Module:
    """An fp32 model of ``version`` with every parameter moved off its init (so zeros don't hide bugs)."""
    cfg = VERSIONS[version].config(n_layer, n_embd, vocab, head_size, **dims)
    model = init_model(cfg, seed=seed, op=op)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() < 2 else 0.05))
    return model


def perturbed_model(
    n_layer: int = 2,
    n_embd: int = 128,
    vocab: int = 300,
    head_size: int = 64,
    seed: int = 0,
    op: str = "torch",
) -> RWKV7:
    """``perturbed`` for x070, the version most tests use."""
    return perturbed("x070", n_layer, n_embd, vocab, head_size, seed, op)


def write_jsonl(path: Path | str, rows: list) -> str:
    """One line per row: a dict as JSON (non-ASCII kept), a string as it is (for malformed lines)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def token_stream(prefix: Path | str, vocab: int, n: int) -> list[int]:
    """``n`` tokens of a learnable stream (a fixed random successor map, from token 1), written as PREFIX.bin/.idx."""
    succ = np.random.default_rng(0).permutation(vocab)
    ids = [1]
    while len(ids) < n:
        ids.append(int(succ[ids[-1]]))
    writer = BinIdxWriter(str(prefix))
    writer.add_document(np.asarray(ids, dtype=np.uint16))
    writer.close()
    return ids


def tiny_run_files(d: Path, n_tokens: int, vocab: int = 256) -> dict:
    """A tiny fp32 x070 base (1 layer, 64 wide) and a token stream in ``d``, as ``train_flags`` reads them."""
    save_model(perturbed_model(n_layer=1, n_embd=64, vocab=vocab, head_size=32, seed=3), d / "base.pth")
    token_stream(d / "data", vocab, n_tokens)
    return {"base": str(d / "base.pth"), "data": str(d / "data"), "n_tokens": n_tokens, "dir": str(d)}


def cli(flags: dict) -> list[str]:
    """Flags as command-line words: ``{"ctx_len": 16}`` -> ``["--ctx_len", "16"]``."""
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def train_flags(files: dict, out: Path, ctx: int = 16, **kw: object) -> list[str]:
    """The trainer's command line for a short CPU MiSS run on ``files`` (``tiny_run_files``); ``kw`` overrides."""
    flags = {"load_model": files["base"], "data_file": files["data"], "data_type": "binidx", "proj_dir": out,
             "peft": "miss", "miss_config": '{"r":8}', "ctx_len": ctx, "micro_bsz": 4, "epoch_steps": 4,
             "epoch_count": 2, "lr_init": 1e-2, "lr_final": 1e-3, "op": "torch", "progress": 0,
             "accelerator": "cpu", "precision": "fp32", "random_seed": 1,
             "magic_prime": largest_magic_prime(files["n_tokens"], ctx)}
    return cli({**flags, **kw})


def assert_cpu_op_matches_torch(model: torch.nn.Module, vocab: int, rtol: float) -> None:
    """The model's logits and every weight gradient are the same with the compiled CPU op and the reference."""
    idx = torch.randint(0, vocab, (2, 21), generator=torch.Generator().manual_seed(2))
    out = {}
    for op in ("torch", "cpu"):
        model.set_op(op)
        model.zero_grad()
        logits = model(idx)
        logits.float().logsumexp(-1).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        out[op] = [logits.detach(), *grads]  # x070: layer 0's v-mix is unused, so it has no grad
    assert len(out["cpu"]) == len(out["torch"]) > 20
    for got, want in zip(out["cpu"], out["torch"], strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())

# Runs a CUDA kernel header's device code on the CPU: each block's N threads become std::threads
# sharing the static "__shared__" arrays, with a std::barrier for __syncthreads. bf16 is stood in
# by fp32 (its conversions are the only part not exercised). ``launch(B, H, fn)`` runs ``fn`` as
# every block of a (H, B) grid.
_SHIM = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <thread>
#include <vector>
using std::min;
struct Dim3 { int x, y, z; };
thread_local Dim3 threadIdx;
Dim3 blockIdx;
std::barrier<>* block_barrier;
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __restrict__ __restrict
#define __shared__ static
inline float __expf(float x) { return std::exp(x); }
struct __nv_bfloat16 { float v; };
inline float __bfloat162float(__nv_bfloat16 x) { return x.v; }
inline __nv_bfloat16 __float2bfloat16(float x) { return {x}; }
#include "FAMILY_cuda_kernels.cuh"
using namespace FAMILY;

template <typename Fn>
void launch(int B, int H, Fn fn) {
  for (int bb = 0; bb < B; ++bb)
    for (int hh = 0; hh < H; ++hh) {
      blockIdx = {hh, bb, 0};
      std::barrier<> bar(N);
      block_barrier = &bar;
      std::vector<std::thread> threads;
      for (int i = 0; i < N; ++i) threads.emplace_back([&, i] { threadIdx = {i, 0, 0}; fn(); });
      for (auto& t : threads) t.join();
    }
}
"""


def emulated_cuda_kernel(family: str, entry_points: str, head_size: int, tmp_path: Path) -> ctypes.CDLL:
    """Compile ``csrc/<family>_cuda_kernels.cuh`` for the CPU with g++ plus ``entry_points`` (extern "C"
    functions calling ``launch``), for head size ``head_size``; the opened library."""
    src, lib = tmp_path / f"{family}_emu.cpp", tmp_path / f"{family}_emu.so"
    src.write_text(_SHIM.replace("FAMILY", family) + entry_points)
    cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", f"-DWKV_N={head_size}", f"-I{CSRC}", str(src),
           "-o", str(lib), "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ctypes.CDLL(str(lib))


def pointers(*ts: torch.Tensor) -> list[ctypes.c_void_p]:
    return [ctypes.c_void_p(t.data_ptr()) for t in ts]


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True, mmap=True)


def stored(path: Path) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(key, shape, dtype) of every tensor a checkpoint file holds, in its order."""
    return [(k, tuple(v.shape), v.dtype) for k, v in load_pth(path).items()]


def tokens(vocab: int, n: int = 24, seed: int = 3) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def logits(model: nn.Module, toks: list[int]) -> torch.Tensor:
    return model(torch.tensor([toks]))[0]


def lm_steps(model: nn.Module, steps: int, lr: float = 2e-2, shape: tuple[int, int] = (2, 17), seed: int = 0,
             optim: type[torch.optim.Optimizer] = torch.optim.AdamW) -> list[float]:
    """Optimizer steps on the LM loss of one fixed random batch (the trainer's step without DeepSpeed)."""
    opt = optim([p for p in model.parameters() if p.requires_grad], lr=lr)
    idx = torch.randint(0, model.cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def interrupted_after_first_save(monkeypatch: pytest.MonkeyPatch, run: Callable[[], object]) -> None:
    """``run`` killed (KeyboardInterrupt) right after its first checkpoint is saved, as a killed run is."""
    from rwkv_peft.train import plots

    real_plot = plots.plot_loss

    def killed_after_first_save(*a, **k):
        real_plot(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_loss", killed_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(plots, "plot_loss", real_plot)


def assert_load_errors(cases: dict[str, tuple[dict, str]], folder: Path) -> None:
    """Each bad state dict, saved under its file name, makes load_model raise one ValueError line matching
    its pattern."""
    from rwkv_peft.model import load_model

    for fname, (bad, match) in cases.items():
        torch.save(bad, folder / fname)
        with pytest.raises(ValueError, match=match) as e:
            load_model(folder / fname)
        assert "\n" not in str(e.value)
