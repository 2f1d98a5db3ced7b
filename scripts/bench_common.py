"""What the benchmark scripts share: their size and thread flags and a cached randomly initialised base.

Stdlib only at import (torch is imported when threads are set), so a script whose workers measure
their own peak memory can use it too.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_size_flags(p: argparse.ArgumentParser, n_layer: int, n_embd: int) -> None:
    """--n_layer / --n_embd of the model a benchmark builds."""
    p.add_argument("--n_layer", type=int, default=n_layer)
    p.add_argument("--n_embd", type=int, default=n_embd)


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def set_threads(threads: int) -> None:
    """--threads N: torch's intra-op threads (0 leaves torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def random_base(folder: str, n_layer: int, n_embd: int, *init_flags: str) -> Path:
    """A randomly initialised x070 model (World vocab size, fp32) in ``folder``, written by init_model once
    and reused by later runs."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    base = d / f"base_L{n_layer}_D{n_embd}.pth"
    if not base.is_file():
        subprocess.run([sys.executable, "-m", "rwkv_peft.tools.init_model", "--n_layer", str(n_layer), "--n_embd",
                        str(n_embd), "--vocab_size", "65536", "--dtype", "fp32", *init_flags, "--out", str(base)],
                       cwd=ROOT, check=True)
    return base
