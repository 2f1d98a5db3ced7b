"""Time and peak memory of merging a MiSS adapter into a bf16 RWKV-7 base: ours, another script, a plain copy.

    python scripts/bench_merge.py [--compare RWKV-PEFT/merge/merge_disha.py] [--dir /tmp/bench_merge]
    python scripts/bench_merge.py --shape 7b      # the released 7B shape (L32 D4096, ~15 GB), built once

Default base: L24 D1024 (~0.4B params, ~0.9 GB bf16) from rwkv_peft.tools.init_model. ``--shape 7b``
(or 2.9b, 1.5b) writes a base of that released shape with random bf16 values, streamed tensor by
tensor (never held in memory), cached in ~/.cache/rwkv_peft/bench. The adapter is a balance r=64
MiSS on att+ffn with random values, saved with RWKV-PEFT's ``.disha`` keys in bf16 so every script
reads the very same file. Each run is its own process; wall time, CPU time and that process's peak
RSS (ru_maxrss, which counts memory-mapped pages too) are measured in interleaved rounds and the
best round is kept. The floor is a copy of the base file (read it, write it once): ``copy``
(shutil.copyfile: inside the kernel) and ``copy+fsync`` (also on disk before it returns, as every
merge output is before its rename); ``through`` reads every byte into the process and writes it
back (+fsync), what a merge must do at least for the bytes it changes; ``startup`` is the
interpreter importing torch and rwkv_peft.merge, which every merge pays whatever the model's size;
``ours chunked`` is ours reading the edited tensors through a buffer instead of a private mapping.
With ``--compare`` the outputs are checked to hold the same tensors. Goals: ours <= 0.5x their
wall time, <= 1.5x the copy's, peak RSS <= 0.3x theirs; --shape 7b: < 1 GB.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing

from rwkv_peft.cli import ArgumentParser  # noqa: E402
from rwkv_peft.model import RWKV7, RWKV7Config, build_model  # noqa: E402
from rwkv_peft.model.stream import write_pth  # noqa: E402

SHAPES = {"7b": (32, 4096), "2.9b": (32, 2560), "1.5b": (24, 2048)}  # released x070 (n_layer, n_embd), vocab 65536
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rwkv_peft" / "bench"

# A bare interpreter starts each run and reports its child's rusage: a child forked from this
# process would inherit this process's peak RSS in ru_maxrss (Linux carries the high-water mark
# across exec), which would inflate every measurement by the parent's size.
LAUNCHER = """
import os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(p.pid, 0)
print(time.perf_counter() - t0, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""
COPY = "import shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2])"
SYNCED = COPY + "; import os; fd = os.open(sys.argv[2], os.O_RDONLY); os.fsync(fd)"  # durable, as a merge's output
THROUGH = """
import os, sys
src, buf = os.open(sys.argv[1], os.O_RDONLY), bytearray(1 << 23)
dst = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
while n := os.readv(src, [buf]):
    os.write(dst, memoryview(buf)[:n])
os.fsync(dst)
"""  # every byte read into this process and written back: what a merge must do for the bytes it changes
STARTUP = "import rwkv_peft.merge"  # the interpreter and torch: a fixed cost of every merge, whatever the size
# ours with every edited tensor read in chunks through a buffer instead of a private mapping
CHUNKED = ("import sys; from rwkv_peft.model import stream; stream.MAP_MIN = 1 << 62; "
           "from rwkv_peft.merge import main; main(sys.argv[1:])")


def run(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in MB) of one process; exits if it fails."""
    out = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], cwd=ROOT, capture_output=True, text=True)
    try:
        wall, cpu, rss, code = out.stdout.split()
    except ValueError:
        sys.exit(f"bench_merge: launcher failed: {out.stderr[-2000:]}")
    if int(code) != 0:
        sys.exit(f"bench_merge: failed ({code}): {shlex.join(cmd)}\n{out.stderr[-2000:]}")
    return float(wall), float(cpu), int(rss) / 1024  # Linux reports KiB


def shape_specs(n_layer: int, n_embd: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Keys and shapes of an x070 base in the official layout, stored bf16 (from a model on the meta device)."""
    model = build_model(RWKV7Config(n_layer, n_embd, 65536), op="torch", device="meta")
    return [(k, torch.bfloat16, tuple(v.shape)) for k, v in model.state_dict().items()]


def stream_base(path: Path, n_layer: int, n_embd: int) -> None:
    """A bf16 base of this shape with random values, written tensor by tensor (temp file + rename)."""
    specs = shape_specs(n_layer, n_embd)
    g = torch.Generator().manual_seed(0)
    tensors = ((torch.randn(shape, generator=g) * 0.02).to(dtype) for _, dtype, shape in specs)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_pth(f, specs, tensors)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_inputs(d: Path, n_layer: int, n_embd: int, r: int, streamed: bool) -> tuple[Path, Path]:
    base, adapter = d / f"base-L{n_layer}-D{n_embd}.pth", d / f"adapter-L{n_layer}-D{n_embd}-r{r}" / "rwkv-0.pth"
    if not base.is_file():
        if streamed:
            size = sum(_numel(s) for *_, s in shape_specs(n_layer, n_embd)) * 2e-9
            print(f"building {base} once (streamed, {size:.1f} GB)")
            stream_base(base, n_layer, n_embd)
        else:
            subprocess.run(
                [sys.executable, "-m", "rwkv_peft.tools.init_model", "--n_layer", str(n_layer), "--n_embd",
                 str(n_embd), "--dtype", "bf16", "--vocab_size", "65536", "--out", str(base)],
                cwd=ROOT, check=True,
            )
    if not adapter.is_file():
        adapter.parent.mkdir(exist_ok=True)
        shapes = {k: s for k, _, s in shape_specs(n_layer, n_embd)}
        g = torch.Generator().manual_seed(0)
        shards = {}
        for i in range(n_layer):
            for part, names in RWKV7.peft_targets.items():
                for name in names:
                    out_features = shapes[f"blocks.{i}.{part}.{name}.weight"][0]
                    shards[f"blocks.{i}.{part}.{name}.disha"] = (
                        torch.randn(r, out_features, generator=g) * 1e-2
                    ).bfloat16()
        torch.save(shards, adapter)
    return base, adapter


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def same_tensors(a: Path, b: Path) -> str:
    x = torch.load(a, mmap=True, weights_only=True)
    y = torch.load(b, mmap=True, weights_only=True)
    if set(x) != set(y):
        return f"DIFFERENT key sets ({len(set(x) ^ set(y))} keys differ)"
    diff = max((x[k].float() - y[k].float()).abs().max().item() for k in x)
    dtypes = all(x[k].dtype == y[k].dtype for k in x)
    return f"same keys, same dtypes: {dtypes}, max |ours - theirs| = {diff:.3g}"


def main() -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), help="a released shape, base built once in " + str(CACHE))
    p.add_argument("--dir", default="", help="where outputs go (default /tmp/bench_merge; --shape: the cache)")
    p.add_argument("--n_layer", type=int, default=24)
    p.add_argument("--n_embd", type=int, default=1024)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2, help="interleaved rounds; each run's best is kept")
    p.add_argument("--compare", default="", help="another merge script, e.g. RWKV-PEFT's merge/merge_disha.py")
    p.add_argument("--compare_args", default="--device cpu", help="extra arguments for the --compare script")
    a = p.parse_args()
    if a.shape:
        a.n_layer, a.n_embd = SHAPES[a.shape]
    d = Path(a.dir or (CACHE if a.shape else "/tmp/bench_merge"))
    d.mkdir(parents=True, exist_ok=True)
    base, adapter = make_inputs(d, a.n_layer, a.n_embd, a.r, streamed=bool(a.shape))
    print(f"base {base} ({base.stat().st_size / 1e9:.2f} GB, L{a.n_layer} D{a.n_embd} bf16), "
          f"adapter {adapter} (balance r={a.r}, att+ffn, .disha keys)")
    outputs = {name: d / f"{name}.pth" for name in ("ours", "theirs", "copy")}
    cmds = {"ours": [sys.executable, str(ROOT / "merge" / "merge_miss.py"), "--base_model", str(base),
                     "--peft_checkpoint", str(adapter), "--output", str(outputs["ours"]), "--quiet"]}
    cmds["ours chunked"] = [sys.executable, "-c", CHUNKED, *cmds["ours"][2:]]
    if a.compare:
        cmds["theirs"] = [sys.executable, a.compare, "--base_model", str(base), "--peft_checkpoint", str(adapter),
                          "--output", str(outputs["theirs"]), *shlex.split(a.compare_args)]
    cmds["copy"] = [sys.executable, "-S", "-c", COPY, str(base), str(outputs["copy"])]
    cmds["copy+fsync"] = [sys.executable, "-S", "-c", SYNCED, str(base), str(outputs["copy"])]
    cmds["through"] = [sys.executable, "-S", "-c", THROUGH, str(base), str(outputs["copy"])]
    cmds["startup"] = [sys.executable, "-c", STARTUP]
    best: dict[str, tuple[float, float, float]] = {}
    try:
        for _ in range(a.repeat):
            for name, cmd in cmds.items():  # interleaved, so machine load affects all alike
                for out in outputs.values():  # no run starts with another's output in the page cache
                    out.unlink(missing_ok=True)
                with open(base, "rb") as f:  # every run starts with as much of the base cached as fits
                    while f.read(1 << 24):
                        pass
                got = run(cmd)
                best[name] = tuple(min(x, y) for x, y in zip(best.get(name, got), got, strict=True))
                if name in ("ours", "theirs") and a.compare:  # kept for the comparison, out of the page cache's way
                    outputs[name].rename(d / f"{name}-kept.pth")
        for name, (wall, cpu, rss) in best.items():
            print(f"{name:>12}: {wall:6.2f} s wall  {cpu:6.2f} s CPU (user+sys)  peak RSS {rss:7.0f} MB")
        t_ours, c_ours, m_ours = best["ours"]
        t_chunked, c_chunked, _ = best["ours chunked"]
        print(f"ratio ours/ours chunked (edited tensors mapped vs read through a buffer): {t_ours / t_chunked:.2f}x "
              f"wall, {c_ours / c_chunked:.2f}x CPU")
        if "theirs" in best:
            t_theirs, c_theirs, m_theirs = best["theirs"]
            print(f"ratio ours/theirs: time {t_ours / t_theirs:.2f}x wall (goal <= 0.5x), "
                  f"{c_ours / c_theirs:.2f}x CPU, peak RSS {m_ours / m_theirs:.2f}x (goal <= 0.3x)")
            print("outputs:", same_tensors(d / "ours-kept.pth", d / "theirs-kept.pth"))
        t_sync, t_start = best["copy+fsync"][0], best["startup"][0]
        print(f"ratio ours/copy: time {t_ours / best['copy'][0]:.2f}x wall, {t_ours / t_sync:.2f}x copy+fsync "
              f"(goal <= 1.5x); without the startup: {(t_ours - t_start) / t_sync:.2f}x copy+fsync, "
              f"{(t_ours - t_start) / best['through'][0]:.2f}x through")
    finally:
        for out in [*outputs.values(), d / "ours-kept.pth", d / "theirs-kept.pth"]:
            out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
