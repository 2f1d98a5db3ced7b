"""Where the trainer's numbers go: ``train_log.jsonl`` always (appended, read back, cut at a resumed step),
wandb and TensorBoard when asked.

Every record is one step's dict (``"step"`` plus numbers, eval records also ``"eval_samples"``);
each sink gets the same numbers under the same step, so the three never disagree.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from rwkv_peft import files
from rwkv_peft.train.config import TrainConfig


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


def check_loggers(cfg: TrainConfig) -> None:
    """Fail before heavy work when a requested logger cannot be imported."""
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError(f"--tensorboard {cfg.tensorboard}: the tensorboard package is not installed "
                         "(pip install tensorboard)")


def tb_tag(key: str) -> str:
    """TensorBoard tag of a record key: ``eval_loss`` -> ``eval/loss``, ``lr`` -> ``train/lr``."""
    return "eval/" + key[5:] if key.startswith("eval_") else "train/" + key


class RunLog:
    """The open sinks of one run (rank 0 only)."""

    def __init__(self, cfg: TrainConfig, proj: Path, effective: dict):
        self.path = proj / "train_log.jsonl"
        self.wandb = _wandb(cfg, effective)
        self.tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            Path(cfg.tensorboard).mkdir(parents=True, exist_ok=True)
            self.tb = SummaryWriter(cfg.tensorboard, flush_secs=10)

    def log(self, record: dict) -> None:
        append_log(self.path, record)
        step = record["step"]
        scalars = {k: v for k, v in record.items()
                   if k not in ("step", "epoch") and isinstance(v, int | float) and not isinstance(v, bool)}
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(tb_tag(k), v, step)
        samples = record.get("eval_samples")
        if samples:
            self._log_samples(samples, step)

    def _log_samples(self, samples: list[dict], step: int) -> None:
        if self.tb is not None:
            text = "\n\n".join(f"**prompt** `{s['prompt'][-200:]!r}`  \n**output** `{s['output']!r}`  \n"
                               f"**reference** `{s['reference']!r}`" for s in samples)
            self.tb.add_text("eval/samples", text, step)
            self.tb.flush()
        if self.wandb is not None:
            import wandb

            table = wandb.Table(columns=["prompt", "output", "reference"],
                                data=[[s["prompt"], s["output"], s["reference"]] for s in samples])
            self.wandb.log({"eval_samples": table}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb(cfg: TrainConfig, effective: dict):
    if not cfg.wandb:
        return None
    try:
        import wandb
    except ImportError:
        print("note: --wandb given but the wandb package is not installed; logging to train_log.jsonl only",
              file=sys.stderr)
        return None
    return wandb.init(project=cfg.wandb, config=effective, name=f"{cfg.peft}-{Path(cfg.proj_dir).name}",
                      dir=cfg.proj_dir)
