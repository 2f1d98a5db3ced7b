"""What the user reads at the end of a run: the summary lines, the command that merges (or chats with) the
adapter, and, for a run that trained nothing, which input made its loss NaN/inf."""

from __future__ import annotations

import resource
from pathlib import Path

import torch

from rwkv_peft.peft.registry import get_method
from rwkv_peft.train.checkpoints import BEST_FILE, FINAL_FILE
from rwkv_peft.train.config import TrainConfig

DEMO = (Path("out/demo/base.pth"), Path("out/demo/miss"))  # scripts/run_miss.sh's paths: the short command


def fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def peak_memory_mb(device: str) -> float:
    """Peak resident memory of this process (CPU) or peak allocated CUDA memory, in MiB."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def merge_command(cfg: TrainConfig, proj: Path) -> str:
    """The command that folds this run's adapter into its base (the short one for the demo's paths; '' if none)."""
    script = get_method(cfg.peft).merge_script
    if script is None:
        return ""
    if (Path(cfg.load_model), proj) == DEMO:
        return "sh scripts/merge_miss.sh"
    return (f"python merge/{script}.py --base_model {cfg.load_model} --peft_checkpoint {proj / FINAL_FILE} "
            f"--output {proj / 'merged.pth'}")


def closing_lines(cfg: TrainConfig, proj: Path, summary: dict, train_parts: tuple[str, ...]) -> list[str]:
    """Rank 0's closing lines: totals, where the adapter is, the command to merge (or chat with) it, the best
    held-out step."""
    n_train, n_all = summary["trainable_params"], summary["total_params"]
    lines = [f"done: trainable {fmt_count(n_train)} / {fmt_count(n_all)} params ({100 * n_train / n_all:.2f}%) | "
             f"{fmt_count(summary['tokens'])} tokens in {summary['wall_s']:.0f}s ({summary['train_tok_s']:.0f} "
             f"tok/s) | peak memory {summary['peak_mem_mb']:.0f} MiB"
             + (f" | {summary['skipped_steps']} NaN/inf steps skipped" if summary["skipped_steps"] else "")]
    if summary["adapter"] is not None:
        lines.append(f"adapter: {summary['adapter']} (also {proj / FINAL_FILE}); log {proj / 'train_log.jsonl'}; "
                     f"curve {proj / 'loss.png'}")
        if merge_command(cfg, proj):
            lines.append(f"merge:   {merge_command(cfg, proj)}")
        else:  # a learned start state has no weight to fold into; alone it is a state file (RWKV-Runner/Ai00)
            flag = "state" if get_method(cfg.peft).state_file and not train_parts else "adapter"
            lines.append(f"chat:    python -m rwkv_peft.generate --model {cfg.load_model} --{flag} "
                         f"{proj / FINAL_FILE} --chat")
    if summary.get("best_step") is not None:
        kept = f" (kept as {proj / BEST_FILE})" if cfg.save_best else ""
        lines.append(f"eval:    best held-out loss {summary['best_eval_loss']:.4f} at step {summary['best_step']}"
                     f"{kept}; curve {proj / 'eval.png'}")
    if summary.get("resume_changes"):  # --resume_changes allow
        lines.append(f"changed: resumed with other settings than the saved run's: "
                     f"{'; '.join(summary['resume_changes'])}")
    return lines


def nonfinite_cause(model: torch.nn.Module, cfg: TrainConfig, params: list, steps_trained: int) -> str:
    """Which input made the loss NaN/inf (the base was checked finite before training): the adapter, the
    run's divergence after finite steps, or from the first step on the data or the arithmetic."""
    names = {id(p): n for n, p in model.named_parameters()}
    bad = next((names[id(p)] for p in params if not torch.isfinite(p).all()), None)
    if bad is not None:
        return f"the adapter diverged ({bad} is NaN/inf): lower --lr_init (it is {cfg.lr_init:g})"
    if steps_trained:
        return (f"the loss was finite for {steps_trained} step(s), then NaN/inf: the run diverged; "
                f"lower --lr_init (it is {cfg.lr_init:g})")
    hint = "" if cfg.precision == "fp32" else f", or use --precision fp32 instead of {cfg.precision}"
    return f"NaN/inf from the first step with a finite base and adapter: check --data_file{hint}"
