"""What the user sees and keeps: the per-step jsonl log, the loss-curve PNG and the closing summary."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, last_step: int) -> None:
    """Keep only records up to ``last_step`` (a resumed run rewrites the steps after its checkpoint)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def plot_loss(log_path: Path, png_path: Path, title: str = "") -> None:
    """Loss per step and its moving average, written atomically (matplotlib Agg, no display needed)."""
    records = [r for r in read_log(log_path) if "loss" in r]
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    loss = [r["loss"] for r in records]
    k, smooth = moving_average(loss)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, loss, lw=0.6, alpha=0.4, label="loss")
    ax.plot(steps, smooth, lw=1.8, label=f"mean of {k}")
    _save_figure(fig, ax, png_path, title)


def moving_average(values: list[float]) -> tuple[int, list[float]]:
    """(window, trailing mean over a window of a fifth of the run, at most 50)."""
    k = max(1, min(len(values) // 5, 50))
    return k, [sum(values[max(0, i - k + 1): i + 1]) / len(values[max(0, i - k + 1): i + 1])
               for i in range(len(values))]


def _save_figure(fig, ax, png_path: Path, title: str) -> None:
    """Label the loss axes and write the PNG atomically."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked cross-entropy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{png_path.name}.", suffix=".png", dir=png_path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, png_path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


def plot_eval(log_path: Path, png_path: Path, title: str = "") -> None:
    """Held-out loss per evaluation (best marked) over the training loss's moving average."""
    records = read_log(log_path)
    evals = [r for r in records if "eval_loss" in r]
    if not evals:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        k, smooth = moving_average([r["loss"] for r in train])
        ax.plot([r["step"] for r in train], smooth, lw=1.2, alpha=0.6, label=f"train loss (mean of {k})")
    ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", lw=1.8, label="held-out loss")
    best = min(evals, key=lambda r: r["eval_loss"])
    ax.plot([best["step"]], [best["eval_loss"]], "*", ms=14,
            label=f"best: {best['eval_loss']:.4f} at step {best['step']}")
    _save_figure(fig, ax, png_path, title)


def fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def peak_memory_mb(device: str) -> float:
    """Peak resident memory of this process (CPU) or peak allocated CUDA memory, in MiB."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
