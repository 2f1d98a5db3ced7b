"""Forward+backward time of the compiled CPU WKV-7 kernel vs the pure-PyTorch reference.

Both run in this one process on the same inputs (default B=2, T=512, H=4, N=64, fp32);
prints the median times, the speed-up (goal: >= 30x) and the kernel's GFLOP/s.

    python scripts/bench_wkv.py [--B 2 --T 512 --H 4 --N 64 --repeat 5 --threads 0]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from rwkv_peft.ops import wkv7
from rwkv_peft.ops.wkv7_torch import wkv7_torch


def make_inputs(B: int, T: int, H: int, N: int) -> list[torch.Tensor]:
    """Random inputs shaped like the model's: a = -kk, b = kk * iclr with unit-norm kk."""
    g = torch.Generator().manual_seed(0)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = -0.6 - 0.5 * torch.rand(B, T, H, N, generator=g)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    iclr = torch.rand(B, T, H, N, generator=g)
    return [r, w, k, v, -kk, kk * iclr]


def time_fwd_bwd(fn, xs: list[torch.Tensor], repeat: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of one forward + backward (all gradients).

    CPU time is printed too because on a shared machine wall time mostly measures the
    neighbours; all threads' CPU time counts, so it is fair to multi-threaded runs.
    """
    times, cpu_times = [], []
    for _ in range(repeat + 1):
        ins = [x.clone().requires_grad_() for x in xs]
        B, _, H, N = xs[0].shape
        s0 = torch.zeros(B, H, N, N, requires_grad=True)
        t0, c0 = time.perf_counter(), time.process_time()
        y, sT = fn(*ins, s0)
        (y.sum() + sT.sum()).backward()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return statistics.median(times[1:]), statistics.median(cpu_times[1:])


def flops(B: int, T: int, H: int, N: int) -> float:
    """Useful flops of one forward + backward: ~8 N^2 per step forward, ~20 N^2 backward."""
    return (8 + 20) * B * T * H * N * N


def main() -> None:
    """Parse the shape, time both ops side by side, print the comparison."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("B", 2), ("T", 512), ("H", 4), ("N", 64), ("repeat", 5)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    xs = make_inputs(args.B, args.T, args.H, args.N)
    t_ref, c_ref = time_fwd_bwd(wkv7_torch, xs, max(1, args.repeat // 2))
    t_cpu, c_cpu = time_fwd_bwd(functools.partial(wkv7, op="cpu"), xs, args.repeat)
    gflops = flops(args.B, args.T, args.H, args.N) / t_cpu / 1e9
    print(f"WKV-7 fwd+bwd B={args.B} T={args.T} H={args.H} N={args.N} fp32, "
          f"{torch.get_num_threads()} threads            wall        cpu time")
    print(f"  torch reference : {t_ref * 1e3:12.1f} ms {c_ref * 1e3:12.1f} ms")
    print(f"  cpu kernel      : {t_cpu * 1e3:12.1f} ms {c_cpu * 1e3:12.1f} ms   "
          f"{gflops:.1f} GFLOP/s (wall)")
    print(f"  speed-up        : {t_ref / t_cpu:12.1f}x  {c_ref / c_cpu:12.1f}x    (goal >= 30x)")


if __name__ == "__main__":
    main()
