"""JIT builds of the kernels in cuda/ with ninja, cached per user so a new process only loads.

The build folder is ``$RWKV_PEFT_CACHE`` (default ``$XDG_CACHE_HOME/rwkv_peft/ops`` or
``~/.cache/rwkv_peft/ops``) / ``<name>-<hash>``, where the hash covers the sources, the
flags, torch, python and the CPU, so a changed source or a different machine never picks up
a stale binary, and an unchanged one is only loaded (ninja finds nothing to do).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

CUDA_DIR = Path(__file__).resolve().parents[2] / "cuda"
CPU_SOURCES = ("wkv7_cpu.cpp",)
CUDA_SOURCES = ("wkv7_cuda.cu",)
CUDA_HEADERS = ("wkv7_cuda_kernels.cuh",)  # hashed too: a changed kernel must rebuild
CPU_FLAGS = ("-O3", "-fopenmp", "-march=native", "-ffp-contract=fast")
CUDA_FLAGS = ("-O3", "--use_fast_math", "-Xptxas=-O3", "--extra-device-vectorization")


def cache_root() -> Path:
    """Per-user folder that holds every build."""
    if os.environ.get("RWKV_PEFT_CACHE"):
        return Path(os.environ["RWKV_PEFT_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "rwkv_peft" / "ops"


def _cpu_signature() -> str:
    """The CPU's model and feature flags: -march=native binaries must not cross machines."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _build_dir(name: str, sources: tuple[str, ...], flags: tuple[str, ...]) -> Path:
    h = hashlib.sha256()
    for src in sources:
        h.update((CUDA_DIR / src).read_bytes())
    extra = (flags, torch.__version__, sys.version, platform.machine(), _cpu_signature())
    h.update(repr(extra).encode())
    path = cache_root() / f"{name}-{h.hexdigest()[:16]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load(name: str, sources: tuple[str, ...], cflags: tuple[str, ...],
          cuda_flags: tuple[str, ...] = (), headers: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build a plain shared library (no Python module: faster to compile) and open it."""
    from torch.utils.cpp_extension import load

    missing = [s for s in sources + headers if not (CUDA_DIR / s).is_file()]
    if missing:
        raise FileNotFoundError(f"kernel sources missing in {CUDA_DIR}: {', '.join(missing)}")
    path = load(
        name=name,
        sources=[str(CUDA_DIR / s) for s in sources],
        extra_cflags=list(cflags),
        extra_cuda_cflags=list(cuda_flags),
        extra_ldflags=["-fopenmp"] if "-fopenmp" in cflags else [],
        build_directory=str(_build_dir(name, sources + headers, cflags + cuda_flags)),
        is_python_module=False,
        verbose=os.environ.get("RWKV_PEFT_VERBOSE_BUILD") == "1",
    )
    return ctypes.CDLL(str(path))


@functools.cache
def load_cpu() -> ctypes.CDLL:
    """Build (first time) and import the CPU WKV-7 kernel."""
    return _load("rwkv_peft_wkv7_cpu", CPU_SOURCES, CPU_FLAGS)


@functools.cache
def load_cuda(head_size: int = 64) -> ctypes.CDLL:
    """Build (first time) and import the CUDA WKV-7 kernel for one head size."""
    if head_size % 16 or not 16 <= head_size <= 256:
        raise ValueError(f"wkv7 cuda: head size must be a multiple of 16 in [16, 256], got {head_size}")
    define = f"-DWKV_N={head_size}"
    return _load(f"rwkv_peft_wkv7_cuda_n{head_size}", CUDA_SOURCES, (), CUDA_FLAGS + (define,),
                 headers=CUDA_HEADERS)
