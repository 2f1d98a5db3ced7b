"""The run's pictures: loss.png (the training loss and its centred running mean) and eval.png (held-out loss
over the training curve, best step marked), drawn from train_log.jsonl and written atomically."""

from __future__ import annotations

from pathlib import Path

from rwkv_peft import files
from rwkv_peft.train.loggers import read_log


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
    ax.plot(steps, smooth, lw=1.8, label=f"centred mean of {k}")
    if "reward" in records[-1]:  # objectives that learn from rewards (grpo): the mean reward on a second axis
        reward = ax.twinx()
        k, smooth = moving_average([r["reward"] for r in records])
        reward.plot(steps, smooth, lw=1.8, color="tab:green", label=f"reward (centred mean of {k})")
        reward.set_ylabel("mean reward")
        reward.legend(loc="lower right")
    _save_figure(fig, ax, png_path, title)


def moving_average(values: list[float]) -> tuple[int, list[float]]:
    """(window, mean over a window of a fifth of the run, at most 51, centred on each step).

    Centred, the line goes through the data; a trailing mean would lag by half its window (above a falling
    loss for the whole run). Near either end the window shrinks to stay centred."""
    k = max(1, min(len(values) // 5, 50)) // 2 * 2 + 1
    out = []
    for i in range(len(values)):
        h = min(k // 2, i, len(values) - 1 - i)
        out.append(sum(values[i - h : i + h + 1]) / (2 * h + 1))
    return k, out


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
    """Held-out loss per evaluation (best marked) over the training loss's moving average, and any held-out
    accuracy the objective logs (e.g. preference tuning's reward accuracy) on a 0..1 axis of its own."""
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
        ax.plot([r["step"] for r in train], smooth, lw=1.2, alpha=0.6, label=f"train loss (centred mean of {k})")
    ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", lw=1.8, label="held-out loss")
    best = min(evals, key=lambda r: r["eval_loss"])
    ax.plot([best["step"]], [best["eval_loss"]], "*", ms=14,
            label=f"best: {best['eval_loss']:.4f} at step {best['step']}")
    accuracies = sorted({k for r in evals for k in r if k.startswith("eval_") and "acc" in k})
    if accuracies:
        right = ax.twinx()
        for k in accuracies:
            right.plot([r["step"] for r in evals if k in r], [r[k] for r in evals if k in r], "s--", color="tab:green",
                       label=f"held-out {k[5:]}")
        right.set_ylim(0, 1.05)
        right.set_ylabel("accuracy")
        right.legend(loc="center right")
    _save_figure(fig, ax, png_path, title)
