"""GPU check of the CUDA WKV-6 / WKV-5 kernel: build, compare with the CPU kernel, measure speed.

Run by scripts/gpu_check.sh after the WKV-7 check (under 2 minutes). Exits non-zero when the
build fails or any value or gradient disagrees.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from rwkv_peft.ops import wkv5, wkv6

# CUDA uses --use_fast_math exp and another summation order: fp32 agrees to ~1e-5, we allow
# 2e-3. bf16 rounds y and every gradient to 8 bits of mantissa: 2e-2 of the largest value.
TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2}
NAMES = ("y", "state", "dr", "dw", "dk", "dv", "du", "ds0")


def make_inputs(B: int, T: int, H: int, N: int, dtype: torch.dtype, device: str, const_decay: bool,
                seed: int = 0) -> list[torch.Tensor]:
    """r, w, k, v (dtype) and the fp32 bonus u; decays from ~1 (w = -6) to ~0.07 (w = 1)."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = -6.0 + 7.0 * torch.rand(*((H, N) if const_decay else (B, T, H, N)), generator=g)
    u = torch.randn(H, N, generator=g) * 0.5
    return [x.to(device=device, dtype=dtype) for x in (r, w, k, v)] + [u.to(device)]


def fwd_bwd(fn, op: str, xs: list[torch.Tensor], s0: torch.Tensor, gy: torch.Tensor,
            gs: torch.Tensor) -> list[torch.Tensor]:
    """y, final state and the gradients of r, w, k, v, u and s0 for the loss <y,gy> + <sT,gs>."""
    ins = [x.detach().clone().requires_grad_() for x in xs]
    st = s0.detach().clone().requires_grad_()
    y, sT = fn(*ins, state=st, op=op)
    ((y.float() * gy).sum() + (sT * gs).sum()).backward()
    return [t.detach().float().cpu() for t in (y, sT, *(x.grad for x in ins), st.grad)]


def compare(fn, B: int, T: int, H: int, N: int, dtype: torch.dtype) -> bool:
    """CUDA (dtype) vs the CPU kernel (fp32 on the same rounded values); prints one line."""
    xs = make_inputs(B, T, H, N, dtype, "cuda", fn is wkv5, seed=T)
    g = torch.Generator().manual_seed(1)
    s0, gs = (0.5 * torch.randn(B, H, N, N, generator=g) for _ in range(2))
    gy = torch.randn(B, T, H, N, generator=g)
    got = fwd_bwd(fn, "cuda", xs, s0.cuda(), gy.cuda(), gs.cuda())
    want = fwd_bwd(fn, "cpu", [x.float().cpu() for x in xs], s0, gy, gs)
    errs = {n: ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            for n, a, b in zip(NAMES, got, want, strict=True)}
    ok = all(e <= TOL[dtype] for e in errs.values())
    worst = max(errs, key=errs.get)
    print(f"  {'ok  ' if ok else 'FAIL'} {fn.__name__} B={B} T={T} H={H} N={N} {str(dtype)[6:]:8s} "
          f"worst {worst} rel {errs[worst]:.1e} (tol {TOL[dtype]:.0e})")
    if not ok:
        print("       " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()))
    return ok


def throughput(B: int, T: int, H: int, N: int, repeat: int) -> None:
    """Forward and forward+backward tokens/s of the CUDA WKV-6 kernel, bf16."""
    r, w, k, v, u = make_inputs(B, T, H, N, torch.bfloat16, "cuda", False)
    xs = [x.requires_grad_() for x in (r, w, k, v, u)]
    s0 = torch.zeros(B, H, N, N, device="cuda", requires_grad=True)

    def step(backward: bool) -> None:
        y, sT = wkv6(*xs, state=s0, op="cuda")
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
        print(f"  wkv6 {what} B={B} T={T} H={H} N={N} bf16: {dt * 1e3:8.1f} ms  {B * T / dt:12,.0f} tokens/s")


def main() -> int:
    """Build, check, time; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu_check_wkv6: no CUDA device visible to torch {torch.__version__}")
        return 2
    from rwkv_peft.ops.wkv6_cuda import cuda_lib

    t0 = time.perf_counter()
    cuda_lib(64)
    print(f"build: CUDA WKV-6 kernel (N=64) ready in {time.perf_counter() - t0:.1f} s")
    print("compare with the CPU kernel (forward, final state, grads of r w k v u s0):")
    cases = [(1, 1, 1, 64), (2, 37, 3, 64), (1, 333, 4, 64)]
    ok = all([compare(fn, *c, dt) for fn in (wkv6, wkv5) for c in cases
              for dt in (torch.float32, torch.bfloat16)])
    print("throughput:")
    throughput(8, 4096, 32, 64, args.repeat)
    print("gpu_check_wkv6: PASS" if ok else "gpu_check_wkv6: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
