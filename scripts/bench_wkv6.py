"""Forward+backward time of the compiled CPU WKV-6 kernel vs the pure-PyTorch reference, and x060 model steps.

Both run in this one process on the same inputs (default B=2, T=512, H=4, N=64, fp32); prints
median times and the speed-up of the kernel, then one training step of a small x060 model
with op=cpu vs op=torch.

    python scripts/bench_wkv6.py [--B 2 --T 512 --H 4 --N 64 --repeat 5 --threads 0]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from rwkv_peft.model import RWKV6Config, init_model
from rwkv_peft.ops import wkv6
from rwkv_peft.ops.wkv6_torch import wkv6_torch


def median_time(step, repeat: int) -> float:
    """Median seconds of ``step()`` after one warm-up call."""
    step()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_step(fn, xs: list[torch.Tensor]):
    """One forward + backward (gradients of r, w, k, v, u and the initial state)."""

    def step() -> None:
        ins = [x.clone().requires_grad_() for x in xs]
        y, sT = fn(*ins)
        (y.sum() + sT.sum()).backward()

    return step


def main() -> None:
    """Parse the shape, time both ops side by side, print the comparison."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("B", 2), ("T", 512), ("H", 4), ("N", 64), ("repeat", 5)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    B, T, H, N = a.B, a.T, a.H, a.N
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = -6.0 + 5.0 * torch.rand(B, T, H, N, generator=g)
    u = torch.randn(H, N, generator=g) * 0.5
    s0 = torch.zeros(B, H, N, N)
    xs = [r, w, k, v, u, s0]
    t_ref = median_time(kernel_step(wkv6_torch, xs), max(1, a.repeat // 2))
    t_cpu = median_time(kernel_step(functools.partial(wkv6, op="cpu"), xs), a.repeat)
    print(f"WKV-6 fwd+bwd B={B} T={T} H={H} N={N} fp32, {torch.get_num_threads()} threads:")
    print(f"  torch reference {t_ref * 1e3:9.1f} ms")
    print(f"  cpu kernel      {t_cpu * 1e3:9.1f} ms   speed-up x{t_ref / t_cpu:.1f}")

    model = init_model(RWKV6Config(n_layer=2, n_embd=H * N, vocab_size=1000, head_size=N), seed=0)
    idx = torch.randint(0, 1000, (B, T), generator=g)

    def train_step() -> None:
        model.zero_grad()
        model(idx).logsumexp(-1).mean().backward()

    times = {}
    for op in ("torch", "cpu"):
        model.set_op(op)
        times[op] = median_time(train_step, max(1, a.repeat // 2))
    print(f"x060 model L2 D{H * N} fwd+bwd on B={B} T={T}:")
    print(f"  op=torch {times['torch'] * 1e3:9.1f} ms")
    print(f"  op=cpu   {times['cpu'] * 1e3:9.1f} ms   speed-up x{times['torch'] / times['cpu']:.1f}")


if __name__ == "__main__":
    main()
