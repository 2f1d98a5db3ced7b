"""WKV-7 kernels vs the pure-PyTorch reference: values, all gradients, bad input, nvcc build."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from helpers import assert_cpu_op_matches_torch, emulated_cuda_kernel, perturbed, pointers

from rwkv_peft.ops import wkv7
from rwkv_peft.ops.build import CSRC

# fp32 throughout; both sides sum the same products in a different order, so relative
# differences sit near 1e-6 -- 1e-4 leaves room for long sequences without hiding a bug.
RTOL = 1e-4


def make_inputs(B: int, T: int, H: int, N: int, seed: int, w_lo: float = -8.0,
                w_hi: float = 3.0) -> list[torch.Tensor]:
    """Model-like inputs: a = -kk, b = kk * iclr with unit kk; w spans near-1 to ~0 decay."""
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = w_lo + (w_hi - w_lo) * torch.rand(B, T, H, N, generator=g)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    iclr = torch.rand(B, T, H, N, generator=g)
    return [r, w, k, v, -kk, kk * iclr]


def run(op: str, xs: list[torch.Tensor], s0: torch.Tensor | None, gy: torch.Tensor,
        gs: torch.Tensor | None) -> list[torch.Tensor]:
    """y, final state and the gradients of the six inputs (and s0) for loss <y,gy> + <sT,gs>."""
    ins = [x.clone().requires_grad_() for x in xs]
    st = None if s0 is None else s0.clone().requires_grad_()
    y, sT = wkv7(*ins, state=st, op=op)
    loss = (y * gy).sum() + (0 if gs is None else (sT * gs).sum())
    loss.backward()
    out = [y.detach(), sT.detach(), *(x.grad for x in ins)]
    return out + ([] if st is None else [st.grad])


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    names = ["y", "state", "dr", "dw", "dk", "dv", "da", "db", "ds0"]
    for name, a, b in zip(names, got, want, strict=False):
        assert torch.isfinite(a).all(), name
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        assert err <= RTOL, f"{name}: rel err {err:.2e}"


@pytest.mark.parametrize(
    "B,T,H,N,w_range",
    [
        (1, 1, 1, 16, (-8.0, 3.0)),  # a single step
        (2, 37, 3, 16, (-8.0, 3.0)),  # T not a multiple of the chunk (16), B > 1, H > 1
        (2, 48, 2, 32, (-9.0, -6.0)),  # decay within 1e-4 of 1: long memory
        (1, 21, 2, 64, (2.0, 4.0)),  # decay ~ exp(-50): state forgotten each step
    ],
)
def test_cpu_matches_reference_with_state(B, T, H, N, w_range) -> None:
    xs = make_inputs(B, T, H, N, seed=T, w_lo=w_range[0], w_hi=w_range[1])
    g = torch.Generator().manual_seed(1)
    s0 = 0.5 * torch.randn(B, H, N, N, generator=g)
    gy = torch.randn(B, T, H, N, generator=g)
    gs = torch.randn(B, H, N, N, generator=g)
    assert_close(run("cpu", xs, s0, gy, gs), run("torch", xs, s0, gy, gs))


def test_cpu_matches_reference_without_state() -> None:
    xs = make_inputs(2, 19, 2, 16, seed=5)
    gy = torch.randn(2, 19, 2, 16)
    assert_close(run("cpu", xs, None, gy, None), run("torch", xs, None, gy, None))


def test_grads_from_final_state_only() -> None:
    """A loss on the final state alone reaches every input but r, and the initial state."""
    xs = make_inputs(1, 35, 2, 16, seed=7, w_lo=-3.0, w_hi=0.0)
    s0 = torch.randn(1, 2, 16, 16)
    gs = torch.randn(1, 2, 16, 16)
    zero = torch.zeros(1, 35, 2, 16)
    got, want = run("cpu", xs, s0, zero, gs), run("torch", xs, s0, zero, gs)
    assert_close(got, want)
    assert torch.equal(got[2], torch.zeros_like(got[2]))  # r only reads the state
    assert all(gr.abs().sum() > 0 for gr in got[3:])


def test_chunked_equals_whole_sequence() -> None:
    """Two calls passing the state on (infctx training) == one call, values and gradients."""
    xs = make_inputs(2, 40, 2, 16, seed=3, w_lo=-4.0, w_hi=1.0)
    s0 = torch.randn(2, 2, 16, 16)
    gy = torch.randn(2, 40, 2, 16)
    whole = run("cpu", xs, s0, gy, None)
    ins = [x.clone().requires_grad_() for x in xs]
    st = s0.clone().requires_grad_()
    y1, s1 = wkv7(*(x[:, :23].contiguous() for x in ins), state=st, op="cpu")
    y2, _ = wkv7(*(x[:, 23:].contiguous() for x in ins), state=s1, op="cpu")
    ((y1 * gy[:, :23]).sum() + (y2 * gy[:, 23:]).sum()).backward()
    assert_close([torch.cat([y1, y2], 1).detach(), *(x.grad for x in ins), st.grad],
                 [whole[0], *whole[2:]])


def test_bf16_inputs_cpu() -> None:
    """bf16 in, read by the kernel and computed in fp32: y and every gradient are exactly the fp32
    kernel's on the same (rounded) values, rounded to bf16 (the kernel rounds as torch does)."""
    xs = [x.bfloat16() for x in make_inputs(2, 37, 2, 16, seed=9)]
    s0 = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(4))
    gy = torch.randn(2, 37, 2, 16, generator=torch.Generator().manual_seed(5)).bfloat16()
    got = run("cpu", xs, s0, gy, s0)
    want = run("cpu", [x.float() for x in xs], s0, gy.float(), s0)
    names = ["y", "state", "dr", "dw", "dk", "dv", "da", "db", "ds0"]
    for name, g, w in zip(names, got, want, strict=True):
        assert g.dtype == (torch.float32 if name in ("state", "ds0") else torch.bfloat16), name
        assert torch.equal(g, w.to(g.dtype)), name


def test_no_grad_inference_matches() -> None:
    xs = make_inputs(1, 18, 1, 16, seed=2)
    with torch.no_grad():
        y, s = wkv7(*xs, op="cpu")
    y_ref, s_ref = wkv7(*xs, op="torch")
    torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=RTOL * y_ref.abs().max().item())
    torch.testing.assert_close(s, s_ref, rtol=RTOL, atol=RTOL * s_ref.abs().max().item())


def test_broadcast_state_gets_summed_grad() -> None:
    """A learned (H,N,N) state expanded over the batch (state tuning) gets the batch-summed grad."""
    xs = make_inputs(3, 10, 2, 16, seed=4)
    grads = []
    for op in ("cpu", "torch"):
        p = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
        y, _ = wkv7(*xs, state=p.expand(3, 2, 16, 16), op=op)
        y.square().sum().backward()
        grads.append(p.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=RTOL, atol=RTOL * grads[1].abs().max())


def test_auto_uses_cpu_kernel_on_cpu() -> None:
    xs = make_inputs(1, 5, 1, 16, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y_auto, _ = wkv7(*xs, op="auto")
    y_cpu, _ = wkv7(*xs, op="cpu")
    assert torch.equal(y_auto, y_cpu)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda xs, s: (xs[:5] + [xs[5].double()], s), "all six must share one dtype"),
        (lambda xs, s: ([x.double() for x in xs], s), "expected one of float32, bfloat16"),
        (lambda xs, s: ([x.half() for x in xs], s), "expected one of float32, bfloat16"),
        (lambda xs, s: ([xs[0][0]] + xs[1:], s), "r must be 4-D"),
        (lambda xs, s: (xs[:2] + [xs[2][:, :3]] + xs[3:], s), "k has shape"),
        (lambda xs, s: (xs[:3] + [xs[3].transpose(1, 2).contiguous().transpose(1, 2)] + xs[4:],
                        s), "v is not contiguous"),
        (lambda xs, s: (xs, s[:, :1]), r"state has shape .* expected \(B,H,N,N\)"),
        (lambda xs, s: (xs, s.double()), "state must be float32"),
        (lambda xs, s: ([x[:, :0] for x in xs], s), "empty input"),
        (lambda xs, s: (xs[:1] + [xs[1].tolist()] + xs[2:], s), "w must be a torch.Tensor"),
    ],
)
def test_bad_input_is_a_clear_error(mutate, match) -> None:
    xs, s = mutate(make_inputs(2, 6, 2, 16, seed=0), torch.zeros(2, 2, 16, 16))
    with pytest.raises(ValueError, match=match):
        wkv7(*xs, state=s, op="cpu")


def test_odd_head_size_is_a_clear_error_on_cpu_and_auto_float64_uses_reference() -> None:
    with pytest.raises(ValueError, match="head size N must be even"):
        wkv7(*make_inputs(1, 3, 1, 15, seed=0), op="cpu")
    xs = [x.double() for x in make_inputs(1, 3, 1, 16, seed=0)]
    y, s = wkv7(*xs, op="auto")
    y_ref, s_ref = wkv7(*xs, op="torch")
    assert y.dtype == torch.float64 and torch.equal(y, y_ref) and torch.equal(s, s_ref)


def test_bad_op_and_wrong_device() -> None:
    xs = make_inputs(1, 4, 1, 16, seed=0)
    with pytest.raises(ValueError, match="--op: expected one of"):
        wkv7(*xs, op="triton")
    with pytest.raises(ValueError, match="must be CUDA tensors"):
        wkv7(*xs, op="cuda")


def test_fla_op_without_fla_is_a_clear_error() -> None:
    try:
        import fla  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="flash-linear-attention"):
            wkv7(*make_inputs(1, 4, 1, 16, seed=0), op="fla")
    else:
        pytest.skip("fla is installed; its kernel needs a GPU (covered by scripts/gpu_check.sh)")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_sources_compile_for_sm80_sm90(tmp_path: Path) -> None:
    """Object files only: no GPU needed, catches compile errors in the CUDA kernel."""
    for src in sorted(CSRC.glob("*.cu")):
        cmd = ["nvcc", "-c", "-O3", "--use_fast_math", "-DWKV_N=64", "-Xcompiler", "-fPIC",
               "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
               str(src), "-o", str(tmp_path / (src.stem + ".o"))]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{src.name}:\n{proc.stderr[-3000:]}"


def test_model_logits_and_grads_same_with_cpu_and_torch_op() -> None:
    """The RWKV-7 model gives the same logits (and weight gradients) with op cpu and torch."""
    assert_cpu_op_matches_torch(perturbed("x070", 2, 32, 50, 16), 50, RTOL)


def test_auto_falls_back_to_reference_with_one_line_warning(monkeypatch, tmp_path) -> None:
    """A failed build makes ``auto`` warn once, in one line, and use the torch reference."""
    import rwkv_peft.ops as ops
    from rwkv_peft.ops import build

    caches = (build.load_kernel, ops._kernel_unavailable)
    for c in caches:
        c.cache_clear()
    monkeypatch.setattr(build, "sources", lambda family, device: (("no_such_kernel.cpp",), ()))
    monkeypatch.setenv("RWKV_PEFT_CACHE", str(tmp_path))
    try:
        xs = make_inputs(1, 6, 1, 16, seed=0)
        with pytest.warns(RuntimeWarning, match="cpu kernel unavailable") as rec:
            y, s = wkv7(*xs, op="auto")
        assert len(rec) == 1 and "\n" not in str(rec[0].message)
        assert "no_such_kernel.cpp" in str(rec[0].message)
        y_ref, s_ref = wkv7(*xs, op="torch")
        assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
        with pytest.raises(FileNotFoundError, match="no_such_kernel.cpp"):
            wkv7(*xs, op="cpu")  # an explicit op never falls back silently
    finally:
        for c in caches:
            c.cache_clear()


def test_second_process_reuses_the_build() -> None:
    """A new process loads the cached library instead of rebuilding it."""
    import sys

    from rwkv_peft.ops.build import load_kernel

    so = Path(load_kernel("wkv7", "cpu").lib._name)
    before = so.stat().st_mtime_ns
    code = "from rwkv_peft.ops.build import load_kernel; print(load_kernel('wkv7', 'cpu').lib._name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert Path(out.stdout.strip()) == so
    assert so.stat().st_mtime_ns == before


EMULATED_ENTRY_POINTS = r"""
extern "C" void emu_forward(int B, int T, int H, const float* r, const float* w, const float* k,
                            const float* v, const float* a, const float* b, const float* s0,
                            float* y, float* sT, float* ckpt, float* sa) {
  launch(B, H, [&] { wkv7_forward_kernel<float>(T, H, r, w, k, v, a, b, s0, y, sT, ckpt, sa); });
}
extern "C" void emu_backward(int B, int T, int H, const float* r, const float* w, const float* k,
                             const float* v, const float* a, const float* b, const float* dy,
                             const float* dsT, const float* ckpt, const float* sa, float* hist,
                             float* dr, float* dw, float* dk, float* dv, float* da, float* db,
                             float* ds0) {
  launch(B, H, [&] {
    wkv7_backward_kernel<float>(T, H, r, w, k, v, a, b, dy, dsT, ckpt, sa, hist, dr, dw, dk, dv,
                                da, db, ds0);
  });
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not on PATH")
def test_cuda_kernels_emulated_on_cpu_match_reference(tmp_path: Path) -> None:
    """The CUDA device code (indexing, barriers, chunk replay, state in/out) is exact."""
    N = 16
    lib = emulated_cuda_kernel("wkv7", EMULATED_ENTRY_POINTS, N, tmp_path)
    for B, T, H in ((2, 37, 2), (1, 16, 1), (1, 1, 1)):  # partial chunk, exact chunk, one step
        xs = make_inputs(B, T, H, N, seed=T)
        g = torch.Generator().manual_seed(1)
        s0, gs = (0.5 * torch.randn(B, H, N, N, generator=g) for _ in range(2))
        gy = torch.randn(B, T, H, N, generator=g)
        y, sT = torch.empty_like(xs[0]), torch.empty_like(s0)
        ckpt, sa = torch.empty(B, H, -(-T // 16), N, N), torch.empty(B, H, T, N)
        lib.emu_forward(B, T, H, *pointers(*xs, s0, y, sT, ckpt, sa))
        grads, ds0 = [torch.empty_like(x) for x in xs], torch.empty_like(s0)
        hist = torch.empty(B * H * 16 * N * N)
        lib.emu_backward(B, T, H, *pointers(*xs, gy, gs, ckpt, sa, hist, *grads, ds0))
        assert_close([y, sT, *grads, ds0], run("torch", xs, s0, gy, gs))
