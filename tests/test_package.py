"""The package as pip installs it (not editable): the kernel sources, kept in the top-level cuda/ folder, travel
inside its sdist and wheel and build from any directory."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# runs in a fresh interpreter that sees only the installed copy; a tiny WKV-7 on the CPU kernel vs the reference
CHECK = """
import sys, torch
import rwkv_peft
from rwkv_peft.ops import wkv7
from rwkv_peft.ops.build import CSRC
assert rwkv_peft.__file__.startswith(sys.argv[1]), rwkv_peft.__file__
assert str(CSRC).startswith(sys.argv[1]), CSRC
g = torch.Generator().manual_seed(0)
r, w, k, v = (torch.randn(1, 5, 1, 16, generator=g) for _ in range(4))
kk = torch.nn.functional.normalize(torch.randn(1, 5, 1, 16, generator=g), dim=-1)
xs = (r, w, k, v, -kk, kk * 0.5)
y, s = wkv7(*xs, op="cpu")
y_ref, s_ref = wkv7(*xs, op="torch")
torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-5)
print("ok", sorted(p.name for p in CSRC.iterdir()))
"""


# (pip's presence is asked of a subprocess: looking pip up in this process makes setuptools' distutils
# shim stand down for good, and torch's extension builder, which imports setuptools, then fails)
@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None or shutil.which("g++") is None,
                    reason="needs setuptools and a C++ compiler")
def test_installed_package_builds_its_kernel_from_another_directory(tmp_path: Path) -> None:
    """An sdist of the checkout (cuda/ and the rwkv_peft/ops/csrc link to it, as they are), ``pip install`` of
    it (a wheel built from the sdist, into a target dir) ships the sources of cuda/; the CPU kernel builds
    from them."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode:
        pytest.skip("needs pip")
    src = tmp_path / "src"  # a copy of the project, so the build leaves nothing in the checkout
    assert (ROOT / "rwkv_peft" / "ops" / "csrc").resolve() == ROOT / "cuda"
    for name in ("rwkv_peft", "cuda"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    sdist = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                            "print(b.build_sdist(sys.argv[1]))", str(tmp_path / "dist")], cwd=src,
                           capture_output=True, text=True, timeout=300)
    assert sdist.returncode == 0, sdist.stderr[-3000:]
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--quiet", "--target", str(target), str(tmp_path / "dist" / sdist.stdout.split()[-1])],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for source in (ROOT / "cuda").iterdir():
        installed = target / "rwkv_peft" / "ops" / "csrc" / source.name
        assert not installed.is_symlink() and installed.read_bytes() == source.read_bytes(), source.name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "PYTHONPATH": str(target), "RWKV_PEFT_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", CHECK, str(target)], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "wkv7_cpu.cpp" in run.stdout and "wkv7_cuda_kernels.cuh" in run.stdout
