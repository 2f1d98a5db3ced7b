"""WKV-6 / WKV-5 kernels vs the pure-PyTorch reference: values, every gradient, bad input.

The CUDA source is compiled by tests/test_ops_wkv7.py's nvcc check (it builds every csrc/*.cu);
its device code also runs here on CPU threads; running it on a GPU is scripts/gpu_check.sh's
job, and the last test's when CUDA is present.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_cpu_op_matches_torch, emulated_cuda_kernel, perturbed, pointers

from rwkv_peft.ops import wkv5, wkv6

RTOL = 1e-4  # fp32 on both sides; measured ~3e-7 relative to each tensor's max


pytestmark = pytest.mark.usefixtures("one_thread")


def make_inputs(B: int, T: int, H: int, N: int, seed: int, dtype: torch.dtype = torch.float32,
                const_decay: bool = False) -> list[torch.Tensor]:
    """r, w, k, v, u, s0 with decays spread over (0, 1) and a non-zero start state."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g).to(dtype) for _ in range(3))
    w = (torch.randn(*((H, N) if const_decay else (B, T, H, N)), generator=g) - 1).to(dtype)
    u = torch.randn(H, N, generator=g) * 0.5
    s0 = torch.randn(B, H, N, N, generator=g) * 0.3
    return [r, w, k, v, u, s0]


def run(fn, xs: list[torch.Tensor], seed: int = 9) -> list[torch.Tensor]:
    """y, final state and the gradients of every input under a random loss on both outputs."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    y, sT = fn(*xs[:5], state=xs[5])
    g = torch.Generator().manual_seed(seed)
    loss = (y.float() * torch.randn(y.shape, generator=g)).sum() + (sT * torch.randn(sT.shape, generator=g)).sum()
    return [y.detach(), sT.detach(), *torch.autograd.grad(loss, xs)]


def assert_close_all(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for name, a, b in zip(("y", "sT", "dr", "dw", "dk", "dv", "du", "ds0"), got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b.float(), rtol=RTOL, atol=RTOL * b.float().abs().max().item(),
                                   msg=name)


@pytest.mark.parametrize(("B", "T", "H", "N"), [(2, 37, 2, 16), (1, 16, 1, 64), (1, 1, 3, 32)])
def test_cpu_kernel_matches_reference(B: int, T: int, H: int, N: int) -> None:
    """T around the kernel's 16-step chunks (ragged, exact, single step)."""
    xs = make_inputs(B, T, H, N, seed=T)
    assert_close_all(run(lambda *a, state: wkv6(*a, state=state, op="cpu"), xs),
                     run(lambda *a, state: wkv6(*a, state=state, op="torch"), xs))


def test_cpu_kernel_wkv5_constant_decay() -> None:
    xs = make_inputs(2, 21, 2, 16, seed=1, const_decay=True)
    assert_close_all(run(lambda *a, state: wkv5(*a, state=state, op="cpu"), xs),
                     run(lambda *a, state: wkv5(*a, state=state, op="torch"), xs))


def test_cpu_kernel_bf16_inputs_computed_in_fp32() -> None:
    """bf16 in, bf16 out (and bf16 grads), fp32 state; the reference sees the same bf16 values."""
    xs = make_inputs(1, 19, 2, 16, seed=2, dtype=torch.bfloat16)
    got = run(lambda *a, state: wkv6(*a, state=state, op="cpu"), xs)
    want = run(lambda *a, state: wkv6(*a, state=state, op="torch"), xs)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    for a, b in zip(got, want, strict=True):  # both round once to bf16 at the end
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2 * b.float().abs().max().item())
    # the kernel reads bf16 itself and rounds as torch does: exactly the fp32 kernel on the rounded values
    gy = torch.randn(got[0].shape, generator=torch.Generator().manual_seed(3)).bfloat16()
    outs = {}
    for dtype in (torch.bfloat16, torch.float32):
        ins = [x.to(dtype if i < 4 else x.dtype).detach().requires_grad_() for i, x in enumerate(xs)]
        y, sT = wkv6(*ins[:5], state=ins[5], op="cpu")
        outs[dtype] = [y.detach(), sT.detach(), *torch.autograd.grad((y * gy.to(dtype)).sum() + sT.sum(), ins)]
    for name, a, b in zip(("y", "sT", "dr", "dw", "dk", "dv", "du", "ds0"), *outs.values(), strict=True):
        assert torch.equal(a, b.to(a.dtype)), name


def test_extreme_decays_stay_finite() -> None:
    """w = +-20: decay underflows to 0 or rounds to 1; values and dw must stay finite and match."""
    xs = make_inputs(1, 20, 1, 16, seed=3)
    xs[1] = torch.where(torch.rand(xs[1].shape, generator=torch.Generator().manual_seed(4)) < 0.5, -20.0, 20.0)
    got = run(lambda *a, state: wkv6(*a, state=state, op="cpu"), xs)
    assert all(torch.isfinite(t).all() for t in got)
    assert_close_all(got, run(lambda *a, state: wkv6(*a, state=state, op="torch"), xs))


def test_no_state_and_no_grad() -> None:
    r, w, k, v, u, _ = make_inputs(2, 5, 1, 16, seed=5)
    with torch.no_grad():
        y, sT = wkv6(r, w, k, v, u, op="cpu")
    y_ref, s_ref = wkv6(r, w, k, v, u, op="torch")
    torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=1e-5)
    torch.testing.assert_close(sT, s_ref, rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("op", ["cpu", "torch"])
def test_bad_input_is_one_clear_error(op: str) -> None:
    r, w, k, v, u, s0 = make_inputs(1, 4, 2, 16, seed=6)
    with pytest.raises(ValueError, match=r"u must be \(H,N\) = \(2, 16\)"):
        wkv6(r, w, k, v, u[:1], op=op)
    with pytest.raises(ValueError, match=r"state must be float32 \(B,H,N,N\)"):
        wkv6(r, w, k, v, u, state=s0[..., :8], op=op)
    with pytest.raises(ValueError, match="k must be a non-empty 4-D"):
        wkv6(r, w, k[0], v, u, op=op)


@pytest.mark.parametrize("version", ["x060", "x052"])
def test_model_logits_and_grads_same_with_cpu_and_torch_op(version: str) -> None:
    """x060 and x052 models: same logits and weight gradients with the compiled op and the reference."""
    assert_cpu_op_matches_torch(perturbed(version, 2, 32, 50, 16), 50, RTOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("version", ["wkv6", "wkv5"])
def test_cuda_kernel_matches_reference(version: str) -> None:
    xs = make_inputs(2, 37, 2, 64, seed=7, const_decay=version == "wkv5")
    fn = wkv6 if version == "wkv6" else wkv5
    got = run(lambda *a, state: fn(*(x.cuda() for x in a), state=state.cuda(), op="cuda"), xs)
    assert_close_all([t.cpu() for t in got], run(lambda *a, state: fn(*a, state=state, op="torch"), xs))


EMULATED_ENTRY_POINTS = r"""
extern "C" void emu_forward(int B, int T, int H, const float* r, const float* w, const float* k,
                            const float* v, const float* u, const float* s0, float* y, float* sT,
                            float* ckpt) {
  launch(B, H, [&] { wkv6_forward_kernel<float>(T, H, r, w, k, v, u, s0, y, sT, ckpt); });
}
extern "C" void emu_backward(int B, int T, int H, const float* r, const float* w, const float* k,
                             const float* v, const float* u, const float* dy, const float* dsT,
                             const float* ckpt, float* hist, float* dr, float* dw, float* dk,
                             float* dv, float* du, float* ds0) {
  launch(B, H, [&] {
    wkv6_backward_kernel<float>(T, H, r, w, k, v, u, dy, dsT, ckpt, hist, dr, dw, dk, dv, du, ds0);
  });
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH")
def test_cuda_kernels_emulated_on_cpu_match_reference(tmp_path: Path) -> None:
    """The CUDA device code (indexing, barriers, chunk replay, state in/out, du) is exact."""
    N = 16
    lib = emulated_cuda_kernel("wkv6", EMULATED_ENTRY_POINTS, N, tmp_path)
    for B, T, H in ((2, 37, 2), (1, 16, 1), (1, 1, 1)):  # partial chunk, exact chunk, one step
        r, w, k, v, u, s0 = make_inputs(B, T, H, N, seed=T)
        g = torch.Generator().manual_seed(9)  # the same loss weights as run()
        gy, gs = torch.randn(B, T, H, N, generator=g), torch.randn(B, H, N, N, generator=g)
        y, sT = torch.empty_like(r), torch.empty_like(s0)
        ckpt = torch.empty(B, H, -(-T // 16), N, N)
        lib.emu_forward(B, T, H, *pointers(r, w, k, v, u, s0, y, sT, ckpt))
        grads = [torch.empty_like(x) for x in (r, w, k, v)]
        du, ds0, hist = torch.empty(B, H, N), torch.empty_like(s0), torch.empty(B * H * 16 * N * N)
        lib.emu_backward(B, T, H, *pointers(r, w, k, v, u, gy, gs, ckpt, hist, *grads, du, ds0))
        assert_close_all([y, sT, *grads, du.sum(0), ds0],
                         run(lambda *a, state: wkv6(*a, state=state, op="torch"), [r, w, k, v, u, s0]))
