"""Time and peak memory of merging a MiSS adapter into a 24-layer x 1024 bf16 model, ours vs another script.

    python scripts/bench_merge.py [--compare RWKV-PEFT/merge/merge_disha.py] [--dir /tmp/bench_merge]

The base (~0.4B params, ~0.9 GB bf16) comes from rwkv_peft.tools.init_model; the adapter is a
balance r=64 MiSS on att+ffn with random values, saved with RWKV-PEFT's ``.disha`` keys in bf16
so both scripts read the very same file. Each merge runs in its own process; wall time and that
process's peak RSS (ru_maxrss, which counts memory-mapped pages too) are measured, the best of
``--repeat`` runs is kept, and with ``--compare`` the outputs are checked to hold the same tensors.
The other script gets ``--base_model --peft_checkpoint --output`` plus ``--compare_args``; its own
imports (RWKV-PEFT's need einops and bitsandbytes) must be importable, e.g. through PYTHONPATH.
Goals: ours <= 0.5x their time and <= 0.5x their peak RSS.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


# A bare interpreter starts each merge and reports its child's rusage: a child forked from this
# process would inherit this process's peak RSS in ru_maxrss (Linux carries the high-water mark
# across exec), which would inflate both measurements by the parent's size.
LAUNCHER = """
import os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(p.pid, 0)
print(time.perf_counter() - t0, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def run(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in MB) of one merge process; exits if it fails."""
    out = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], cwd=ROOT, capture_output=True, text=True)
    try:
        wall, cpu, rss, code = out.stdout.split()
    except ValueError:
        sys.exit(f"bench_merge: launcher failed: {out.stderr[-2000:]}")
    if int(code) != 0:
        sys.exit(f"bench_merge: failed ({code}): {shlex.join(cmd)}\n{out.stderr[-2000:]}")
    return float(wall), float(cpu), int(rss) / 1024  # Linux reports KiB


def make_inputs(d: Path, n_layer: int, n_embd: int, r: int) -> tuple[Path, Path]:
    base, adapter = d / "base.pth", d / "adapter" / "rwkv-0.pth"
    if not base.is_file():
        subprocess.run(
            [sys.executable, "-m", "rwkv_peft.tools.init_model", "--n_layer", str(n_layer), "--n_embd", str(n_embd),
             "--dtype", "bf16", "--vocab_size", "65536", "--out", str(base)],
            cwd=ROOT, check=True,
        )
    if not adapter.is_file():
        from rwkv_peft.model import RWKV7, read_state_dict

        adapter.parent.mkdir(exist_ok=True)
        sd = read_state_dict(base)
        g = torch.Generator().manual_seed(0)
        shards = {}
        for i in range(n_layer):
            for part, names in RWKV7.peft_targets.items():
                for name in names:
                    out_features = sd[f"blocks.{i}.{part}.{name}.weight"].shape[0]
                    shards[f"blocks.{i}.{part}.{name}.disha"] = (
                        torch.randn(r, out_features, generator=g) * 1e-2
                    ).bfloat16()
        torch.save(shards, adapter)
    return base, adapter


def same_tensors(a: Path, b: Path) -> str:
    x = torch.load(a, mmap=True, weights_only=True)
    y = torch.load(b, mmap=True, weights_only=True)
    if set(x) != set(y):
        return f"DIFFERENT key sets ({len(set(x) ^ set(y))} keys differ)"
    diff = max((x[k].float() - y[k].float()).abs().max().item() for k in x)
    dtypes = all(x[k].dtype == y[k].dtype for k in x)
    return f"same keys, same dtypes: {dtypes}, max |ours - theirs| = {diff:.3g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/bench_merge", help="where the base, adapter and outputs go (~3 GB)")
    p.add_argument("--n_layer", type=int, default=24)
    p.add_argument("--n_embd", type=int, default=1024)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2, help="runs per script; the best is kept")
    p.add_argument("--compare", default="", help="another merge script, e.g. RWKV-PEFT's merge/merge_disha.py")
    p.add_argument("--compare_args", default="--device cpu", help="extra arguments for the --compare script")
    a = p.parse_args()
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    base, adapter = make_inputs(d, a.n_layer, a.n_embd, a.r)
    print(f"base {base} ({base.stat().st_size / 1e9:.2f} GB, L{a.n_layer} D{a.n_embd} bf16), "
          f"adapter {adapter} (balance r={a.r}, att+ffn, .disha keys)")
    cmds = {"ours": [sys.executable, str(ROOT / "merge" / "merge_miss.py"), "--base_model", str(base),
                     "--peft_checkpoint", str(adapter), "--output", str(d / "ours.pth"), "--quiet"]}
    if a.compare:
        cmds["theirs"] = [sys.executable, a.compare, "--base_model", str(base), "--peft_checkpoint", str(adapter),
                          "--output", str(d / "theirs.pth"), *shlex.split(a.compare_args)]
    with open(base, "rb") as f:  # both start with the base in the page cache
        while f.read(1 << 24):
            pass
    best: dict[str, tuple[float, float, float]] = {}
    for _ in range(a.repeat):
        for name, cmd in cmds.items():  # interleaved, so machine load affects both alike
            got = run(cmd)
            best[name] = tuple(min(x, y) for x, y in zip(best.get(name, got), got, strict=True))
    for name, (wall, cpu, rss) in best.items():
        print(f"{name:>6}: {wall:6.2f} s wall  {cpu:6.2f} s CPU (user+sys)  peak RSS {rss:7.0f} MB")
    if "theirs" in best:
        (t_ours, c_ours, m_ours), (t_theirs, c_theirs, m_theirs) = best["ours"], best["theirs"]
        print(f"ratio ours/theirs: time {t_ours / t_theirs:.2f}x wall, {c_ours / c_theirs:.2f}x CPU (goal <= 0.5x), "
              f"peak RSS {m_ours / m_theirs:.2f}x (goal <= 0.5x)")
        print("outputs:", same_tensors(d / "ours.pth", d / "theirs.pth"))


if __name__ == "__main__":
    main()
