"""JIT builds of the WKV kernels with ninja, and one ctypes wrapper.

The sources live in the project's top-level ``cuda/`` folder. The package reaches them as
``rwkv_peft/ops/csrc``: in a checkout a symlink to ``../../cuda``, in an sdist or wheel a folder of the
files themselves (setuptools copies through the link), so an installed package builds them from any
working directory.

``load_kernel(family, device, head_size)`` builds (first time) and opens ``csrc/<family>_<device>``
and returns a ``Kernel`` whose ``forward`` / ``backward`` take the C functions' integer arguments
and tensors (None = a null pointer): every family and device is called the same way. The C side
exports ``<family>_<device>_{chunk,forward,backward}``; CUDA libraries also ``_head_size`` and
``_error_string``, return a cudaError_t code and take the current stream as a last argument.

The build folder is ``$RWKV_PEFT_CACHE`` (default ``$XDG_CACHE_HOME/rwkv_peft/ops`` or
``~/.cache/rwkv_peft/ops``) / ``<name>-<hash>``, where the hash covers the sources and their
folder, the flags, torch, python and the CPU, so a changed source or a different machine never picks up
a stale binary, and an unchanged one is only loaded (ninja finds nothing to do).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
FAMILIES = ("wkv7", "wkv6")
DEVICES = ("cpu", "cuda")
CPU_FLAGS = ("-O3", "-fopenmp", "-march=native", "-ffp-contract=fast")
CUDA_FLAGS = ("-O3", "--use_fast_math", "-Xptxas=-O3", "--extra-device-vectorization")
# (leading integers, pointer arguments of forward, of backward); CUDA: the stream included
_ARGS = {("wkv7", "cpu"): (5, 11, 17), ("wkv6", "cpu"): (5, 9, 14), ("wkv7", "cuda"): (4, 12, 19),
         ("wkv6", "cuda"): (4, 10, 16)}


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
        h.update((CSRC / src).read_bytes())
    # the source folder too: ninja rebuilds when build.ninja names other paths, so two checkouts
    # sharing one folder would rebuild each other's library (and race doing it)
    extra = (flags, str(CSRC), torch.__version__, sys.version, platform.machine(), _cpu_signature())
    h.update(repr(extra).encode())
    path = cache_root() / f"{name}-{h.hexdigest()[:16]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sources(family: str, device: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(compiled sources, included headers) of one kernel; headers are hashed too, so an edit rebuilds."""
    if device == "cpu":
        return (f"{family}_cpu.cpp",), ()
    return (f"{family}_cuda.cu",), (f"{family}_cuda_kernels.cuh", "wkv_cuda_common.cuh")


def _build(name: str, srcs: tuple[str, ...], headers: tuple[str, ...], cflags: tuple[str, ...],
           cuda_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Build a plain shared library (no Python module: faster to compile) and open it."""
    from torch.utils.cpp_extension import load

    missing = [s for s in srcs + headers if not (CSRC / s).is_file()]
    if missing:
        raise FileNotFoundError(f"kernel sources missing in {CSRC}: {', '.join(missing)}")
    path = load(
        name=name,
        sources=[str(CSRC / s) for s in srcs],
        extra_cflags=list(cflags),
        extra_cuda_cflags=list(cuda_flags),
        extra_ldflags=["-fopenmp"] if "-fopenmp" in cflags else [],
        build_directory=str(_build_dir(name, srcs + headers, cflags + cuda_flags)),
        is_python_module=False,
        verbose=os.environ.get("RWKV_PEFT_VERBOSE_BUILD") == "1",
    )
    return ctypes.CDLL(str(path))


def _pointer(a: object) -> object:
    """Tensors (and None) as C pointers; integers pass as they are."""
    if a is None:
        return ctypes.c_void_p(0)
    return ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else a


@dataclass(frozen=True)
class Kernel:
    """One built WKV library: ``forward(*ints, *tensors)`` / ``backward(...)`` as its C functions take them."""

    lib: ctypes.CDLL
    family: str
    device: str

    def _fn(self, what: str):
        return getattr(self.lib, f"{self.family}_{self.device}_{what}")

    def chunk(self) -> int:
        """Time steps between the state checkpoints forward saves for backward."""
        return int(self._fn("chunk")())

    def forward(self, *args: object) -> None:
        self._call("forward", args)

    def backward(self, *args: object) -> None:
        self._call("backward", args)

    def _call(self, what: str, args: tuple[object, ...]) -> None:
        ptrs = [_pointer(a) for a in args]
        if self.device == "cpu":
            self._fn(what)(*ptrs)
            return
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with torch.cuda.device(device):
            code = self._fn(what)(*ptrs, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
        if code != 0:
            msg = self._fn("error_string")(code).decode()
            raise RuntimeError(f"{self.family} cuda: {what} kernel launch failed: {msg}")


@functools.cache
def load_library(name: str) -> ctypes.CDLL:
    """Build (first time) and open ``csrc/<name>.cpp``, a plain C library for the CPU (e.g. the decode steps)."""
    return _build(f"rwkv_peft_{name}", (f"{name}.cpp",), (), CPU_FLAGS)


@functools.cache
def load_kernel(family: str, device: str, head_size: int = 64) -> Kernel:
    """Build (first time) and open the ``family`` kernel for ``device``; CUDA kernels are built per head size.

    The CPU kernels take the head size at run time (one build serves all).
    """
    if family not in FAMILIES or device not in DEVICES:
        raise ValueError(f"load_kernel: family must be one of {FAMILIES} and device one of {DEVICES}, "
                         f"got {family!r}, {device!r}")
    srcs, headers = sources(family, device)
    if device == "cpu":
        lib, int_t = _build(f"rwkv_peft_{family}_cpu", srcs, headers, CPU_FLAGS), ctypes.c_int64
    else:
        if head_size % 16 or not 16 <= head_size <= 256:
            raise ValueError(f"{family} cuda: head size must be a multiple of 16 in [16, 256], got {head_size}")
        lib = _build(f"rwkv_peft_{family}_cuda_n{head_size}", srcs, headers, (),
                     CUDA_FLAGS + (f"-DWKV_N={head_size}",))
        int_t = ctypes.c_int
    kernel = Kernel(lib, family, device)
    n_int, n_fwd, n_bwd = _ARGS[family, device]
    ret = None if device == "cpu" else ctypes.c_int
    for what, n in (("forward", n_fwd), ("backward", n_bwd)):
        fn = kernel._fn(what)
        fn.argtypes, fn.restype = [int_t] * n_int + [ctypes.c_void_p] * n, ret
    kernel._fn("chunk").restype = int_t
    if device == "cuda":
        kernel._fn("error_string").argtypes, kernel._fn("error_string").restype = [ctypes.c_int], ctypes.c_char_p
        kernel._fn("head_size").restype = ctypes.c_int
        if kernel._fn("head_size")() != head_size:
            raise RuntimeError(f"{family} cuda: library built for head size {kernel._fn('head_size')()}, "
                               f"wanted {head_size}")
    return kernel
