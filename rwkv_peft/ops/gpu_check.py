"""GPU check of every CUDA WKV kernel (WKV-7, WKV-6 and WKV-5 on it): build, compare with the CPU kernel, time.

Run by scripts/gpu_check.sh on a machine with an NVIDIA GPU and nvcc (under 5 minutes).
Exits non-zero when a build fails or any value or gradient disagrees.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

from rwkv_peft.cli import ArgumentParser
from rwkv_peft.ops import wkv5, wkv6, wkv7
from rwkv_peft.ops.build import load_kernel

# CUDA uses --use_fast_math exp and another summation order: fp32 agrees to ~1e-5, we allow
# 2e-3. bf16 rounds y and every gradient to 8 bits of mantissa: 2e-2 of the largest value.
TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2}
# family -> (op, output names, (B, T, H, N) cases); WKV-5 runs on WKV-6's kernel
_WKV6_NAMES = ("y", "state", "dr", "dw", "dk", "dv", "du", "ds0")
_WKV6_CASES = [(1, 1, 1, 64), (2, 37, 3, 64), (1, 333, 4, 64)]
FAMILIES: dict[str, tuple[Callable, tuple[str, ...], list[tuple[int, int, int, int]]]] = {
    "wkv7": (wkv7, ("y", "state", "dr", "dw", "dk", "dv", "da", "db", "ds0"),
             [(1, 1, 1, 64), (2, 37, 3, 64), (2, 100, 2, 64), (1, 333, 4, 64)]),
    "wkv6": (wkv6, _WKV6_NAMES, _WKV6_CASES),
    "wkv5": (wkv5, _WKV6_NAMES, _WKV6_CASES),
}


def make_inputs(family: str, B: int, T: int, H: int, N: int, dtype: torch.dtype, device: str,
                seed: int = 0) -> list[torch.Tensor]:
    """Model-like inputs, decays from ~1 (w = -6) to ~0.07 (w = 1). WKV-7: a = -kk, b = kk * iclr with
    unit kk; WKV-6/5: an fp32 bonus u, and WKV-5's decay is (H, N), constant over batch and time."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = -6.0 + 7.0 * torch.rand(*((H, N) if family == "wkv5" else (B, T, H, N)), generator=g)
    if family == "wkv7":
        kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
        iclr = torch.rand(B, T, H, N, generator=g)
        return [x.to(device=device, dtype=dtype) for x in (r, w, k, v, -kk, kk * iclr)]
    u = torch.randn(H, N, generator=g) * 0.5
    return [x.to(device=device, dtype=dtype) for x in (r, w, k, v)] + [u.to(device)]


def fwd_bwd(fn: Callable, op: str, xs: list[torch.Tensor], s0: torch.Tensor, gy: torch.Tensor,
            gs: torch.Tensor) -> list[torch.Tensor]:
    """y, final state and the gradients of every input and s0 for the loss <y,gy> + <sT,gs>."""
    ins = [x.detach().clone().requires_grad_() for x in xs]
    st = s0.detach().clone().requires_grad_()
    y, sT = fn(*ins, state=st, op=op)
    ((y.float() * gy).sum() + (sT * gs).sum()).backward()
    return [t.detach().float().cpu() for t in (y, sT, *(x.grad for x in ins), st.grad)]


def compare(family: str, B: int, T: int, H: int, N: int, dtype: torch.dtype) -> bool:
    """CUDA (dtype) vs the CPU kernel (fp32 on the same rounded values); prints one line."""
    fn, names, _ = FAMILIES[family]
    xs = make_inputs(family, B, T, H, N, dtype, "cuda", seed=T)
    g = torch.Generator().manual_seed(1)
    s0, gs = (0.5 * torch.randn(B, H, N, N, generator=g) for _ in range(2))
    gy = torch.randn(B, T, H, N, generator=g)
    got = fwd_bwd(fn, "cuda", xs, s0.cuda(), gy.cuda(), gs.cuda())
    want = fwd_bwd(fn, "cpu", [x.float().cpu() for x in xs], s0, gy, gs)
    errs = {n: ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            for n, a, b in zip(names, got, want, strict=True)}
    ok = all(e <= TOL[dtype] for e in errs.values())
    worst = max(errs, key=errs.get)
    print(f"  {'ok  ' if ok else 'FAIL'} {family} B={B} T={T} H={H} N={N} {str(dtype)[6:]:8s} "
          f"worst {worst} rel {errs[worst]:.1e} (tol {TOL[dtype]:.0e})")
    if not ok:
        print("       " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()))
    return ok


def throughput(family: str, B: int, T: int, H: int, N: int, repeat: int) -> None:
    """Forward and forward+backward tokens/s of the CUDA kernel, bf16."""
    fn = FAMILIES[family][0]
    xs = [x.requires_grad_() for x in make_inputs(family, B, T, H, N, torch.bfloat16, "cuda")]
    s0 = torch.zeros(B, H, N, N, device="cuda", requires_grad=True)

    def step(backward: bool) -> None:
        y, sT = fn(*xs, state=s0, op="cuda")
        if backward:
            (y.float().sum() + sT.sum()).backward()

    for backward in (False, True):
        step(backward)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeat):
            step(backward)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / repeat
        what = "fwd+bwd" if backward else "fwd    "
        print(f"  {family} {what} B={B} T={T} H={H} N={N} bf16: {dt * 1e3:8.1f} ms  {B * T / dt:12,.0f} tokens/s")


def main() -> int:
    """Build, check, time every family; returns the exit status."""
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma list from {','.join(FAMILIES)}")
    args = p.parse_args()
    families = [f for f in args.families.split(",") if f]
    if not families or any(f not in FAMILIES for f in families):
        p.error(f"--families: expected a comma list from {','.join(FAMILIES)}, got {args.families!r}")
    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device visible to torch {torch.__version__} "
              "(CPU-only build or no GPU); set PYTHON to a CUDA-enabled interpreter")
        return 2
    print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    for kernel in sorted({"wkv6" if f == "wkv5" else f for f in families}):
        t0 = time.perf_counter()
        load_kernel(kernel, "cuda", 64)
        print(f"build: CUDA {kernel} kernel (N=64) ready in {time.perf_counter() - t0:.1f} s")
    print("compare with the CPU kernel (forward, final state, every input's gradient, initial state's):")
    ok = all([compare(f, *case, dt) for f in families for case in FAMILIES[f][2]
              for dt in (torch.float32, torch.bfloat16)])
    print("throughput:")
    for f in families:
        if f != "wkv5":  # WKV-6's kernel, only the decay differs
            throughput(f, 8, 4096, 32, 64, args.repeat)
    print("gpu_check: PASS" if ok else "gpu_check: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
