"""What the user sees and keeps: the per-step jsonl log, the loss-curve PNG and the closing summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rwkv_peft import files


def append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict]:
    """The records of ``train_log.jsonl``. A torn last line (the run was killed or the disk filled while
    appending) is dropped with a note; any other line that is not a JSON object is an error naming it."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").split("\n")
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        last = not any(x.strip() for x in lines[i:])
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if last:
                print(f"note: {path}:{i}: dropped a torn last line ({e})", file=sys.stderr)
                break
            raise ValueError(f"{path}:{i}: not a log record ({e}); fix or delete the line") from None
        records.append(record)
    return records


def truncate_log(path: Path, last_step: int) -> None:
    """Keep only records up to ``last_step`` (a resumed run rewrites the steps after its checkpoint);
    ``last_step`` < 0 starts an empty log without reading the old one."""
    keep = [r for r in read_log(path) if r.get("step", 0) <= last_step] if last_step >= 0 else []
    files.write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


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
    try:
        with files.atomic_path(png_path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


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
