"""Test helpers shared by several modules: the CUDA kernels' device code, run on CPU threads."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import torch

from rwkv_peft.ops.build import CSRC

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
