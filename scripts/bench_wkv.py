"""Forward+backward time of a compiled CPU WKV kernel vs the pure-PyTorch reference, and a small model's step.

Both ops run in this one process on the same inputs (default B=2, T=512, H=4, N=64, fp32):
prints the median wall and CPU times, the kernel's speed-up (WKV-7 goal: >= 30x) and, for
WKV-7, its GFLOP/s; then one training step of a 2-layer model of the family's generation
(x070 for wkv7, x060 for wkv6, which x052 shares) with op=cpu vs op=torch.

    python scripts/bench_wkv.py [--family wkv7|wkv6] [--B 2 --T 512 --H 4 --N 64 --repeat 5 --threads 0]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from rwkv_peft.cli import ArgumentParser
from rwkv_peft.model import VERSIONS, init_model
from rwkv_peft.ops import wkv6, wkv7

# family -> (entry point, model generation, useful flops of one fwd+bwd step per N^2, if counted)
FAMILIES = {"wkv7": (wkv7, "x070", 8 + 20), "wkv6": (wkv6, "x060", None)}  # WKV-7: ~8 N^2 fwd, ~20 bwd


def make_inputs(family: str, B: int, T: int, H: int, N: int) -> list[torch.Tensor]:
    """Random inputs shaped like the model's. WKV-7: a = -kk, b = kk * iclr with unit-norm kk;
    WKV-6: decays from ~1 to ~0.7 and a bonus u (H, N)."""
    g = torch.Generator().manual_seed(0)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    if family == "wkv6":
        w = -6.0 + 5.0 * torch.rand(B, T, H, N, generator=g)
        return [r, w, k, v, torch.randn(H, N, generator=g) * 0.5]
    w = -0.6 - 0.5 * torch.rand(B, T, H, N, generator=g)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    iclr = torch.rand(B, T, H, N, generator=g)
    return [r, w, k, v, -kk, kk * iclr]


def median_times(step: Callable[[], None], repeat: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of ``step()`` after one warm-up call.

    CPU time is printed too because on a shared machine wall time mostly measures the
    neighbours; all threads' CPU time counts, so it is fair to multi-threaded runs.
    """
    step()
    times, cpu_times = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return statistics.median(times), statistics.median(cpu_times)


def kernel_step(fn: Callable, xs: list[torch.Tensor], op: str) -> Callable[[], None]:
    """One forward + backward of ``fn`` with ``op`` (gradients of every input and of the initial state)."""
    B, _, H, N = xs[0].shape

    def step() -> None:
        ins = [x.clone().requires_grad_() for x in xs]
        s0 = torch.zeros(B, H, N, N, requires_grad=True)
        y, sT = fn(*ins, state=s0, op=op)
        (y.sum() + sT.sum()).backward()

    return step


def model_step(model: torch.nn.Module, idx: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad()
        model(idx).logsumexp(-1).mean().backward()

    return step


def report(title: str, ref: tuple[float, float], cpu: tuple[float, float], extra: str = "") -> None:
    """Wall and CPU times of the reference and the kernel, and the speed-up by each."""
    print(title)
    print(f"{'':13}{'wall':>15}{'cpu time':>16}")
    print(f"  op=torch : {ref[0] * 1e3:12.1f} ms {ref[1] * 1e3:12.1f} ms")
    print(f"  op=cpu   : {cpu[0] * 1e3:12.1f} ms {cpu[1] * 1e3:12.1f} ms   {extra}".rstrip())
    print(f"  speed-up : {ref[0] / cpu[0]:12.1f}x  {ref[1] / cpu[1]:12.1f}x")


def main() -> None:
    """Parse the shape, time both ops side by side on the kernel and on a model, print the comparisons."""
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=tuple(FAMILIES), default="wkv7")
    for name, default in (("B", 2), ("T", 512), ("H", 4), ("N", 64), ("repeat", 5)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    fn, version, flops = FAMILIES[a.family]
    B, T, H, N = a.B, a.T, a.H, a.N
    xs = make_inputs(a.family, B, T, H, N)
    ref = median_times(kernel_step(fn, xs, "torch"), max(1, a.repeat // 2))
    cpu = median_times(kernel_step(fn, xs, "cpu"), a.repeat)
    gflops = f"{flops * B * T * H * N * N / cpu[0] / 1e9:.1f} GFLOP/s (wall)" if flops else ""
    goal = "   (goal >= 30x)" if a.family == "wkv7" else ""
    name = a.family.upper().replace("WKV", "WKV-")
    report(f"{name} fwd+bwd B={B} T={T} H={H} N={N} fp32, {torch.get_num_threads()} threads{goal}", ref, cpu, gflops)

    model = init_model(VERSIONS[version].config(2, H * N, 1000, N), seed=0)
    step = model_step(model, torch.randint(0, 1000, (B, T), generator=torch.Generator().manual_seed(1)))
    times = {}
    for op in ("torch", "cpu"):
        model.set_op(op)
        times[op] = median_times(step, max(1, a.repeat // 2))
    report(f"{version} model L2 D{H * N} fwd+bwd on B={B} T={T}", times["torch"], times["cpu"])


if __name__ == "__main__":
    main()
