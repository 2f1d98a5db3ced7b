"""What a run keeps in ``--proj_dir``: the adapter of each saved epoch with the trainer state beside it
(resume), the best adapter by held-out loss, and the final one, written only by a run that trained.

``trainer_state.pt`` holds plain tensors and numbers (optimizer state per rank, RNG per rank, the
position), CRC-checked and loaded with ``weights_only``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from rwkv_peft import files
from rwkv_peft.model import write_state_dict
from rwkv_peft.model.checkpoint import load_checked
from rwkv_peft.train.config import TrainConfig, input_files
from rwkv_peft.train.engine import gathered_trainable, load_optimizer_state, optimizer_state

STATE_FILE = "trainer_state.pt"
BEST_FILE = "rwkv-best.pth"
FINAL_FILE = "rwkv-final.pth"


class RunFailed(Exception):
    """The run did not train (NaN/inf losses, a diverged adapter): exit non-zero, no rwkv-final.pth."""


def output_files(cfg: TrainConfig, proj: Path) -> list[Path]:
    """Every file a run may write in --proj_dir."""
    epochs = [f"rwkv-{e}.pth" for e in range(cfg.epoch_begin, cfg.epoch_begin + cfg.epoch_count)]
    folders = [peft_folder_of(Path(n)).name for n in (*epochs, FINAL_FILE)] if cfg.peft_folder else []
    return [proj / n for n in (*epochs, *folders, FINAL_FILE, BEST_FILE, STATE_FILE, "adapter_config.json",
                               "train_config.json", "train_log.jsonl", "loss.png", "eval.png")]


def check_outputs(cfg: TrainConfig, proj: Path) -> None:
    """--proj_dir takes files, and none the run writes there is one of its inputs."""
    files.check_writable_dir(proj, f"--proj_dir {proj}")
    files.check_not_input(dict.fromkeys(output_files(cfg, proj), f"--proj_dir {proj}"), input_files(cfg))


def latest_checkpoint(proj_dir: Path) -> dict | None:
    """trainer_state.pt (CRC-checked, tensors only), or None; a damaged one is an error naming it."""
    path = proj_dir / STATE_FILE
    if not path.is_file():
        return None
    state = load_checked(path)
    need = {"epoch": int, "step": int, "adapter": str, "optimizer": list, "rng": list}
    wrong = [k for k, t in need.items() if not isinstance(state, dict) or not isinstance(state.get(k), t)]
    if wrong or Path(state["adapter"]).name != state["adapter"]:
        raise ValueError(f"{path}: not a trainer state of this trainer (bad or missing "
                         f"{', '.join(wrong) or 'adapter'}); delete it to start fresh")
    return state


def find_resume(cfg: TrainConfig, proj: Path) -> dict | None:
    """--resume 1: the trainer state of the interrupted run (None: start fresh)."""
    if not cfg.resume:
        return None
    state = latest_checkpoint(proj)
    if state is None:
        print(f"note: --resume 1 but {proj / STATE_FILE} does not exist; starting fresh", file=sys.stderr)
    return state


def restore(engine, state: dict, rank: int, proj: Path) -> None:
    """This rank's optimizer state and RNG from the trainer state (after the adapter was loaded)."""
    load_optimizer_state(engine, state["optimizer"][rank], proj / STATE_FILE)
    torch.set_rng_state(state["rng"][rank])


def save_epoch(engine, model: torch.nn.Module, params: list, proj: Path, epoch: int, step: int,
               settings: dict) -> Path | None:
    """rwkv-<epoch>.pth (trainable tensors) and trainer_state.pt (optimizer per rank, RNG, position, the run's
    ``settings`` that a resume compares), written by rank 0 (its path returned); collective. A NaN/inf adapter
    is not saved: RunFailed."""
    sd = gathered_trainable(engine, model, params)
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    world = dist.get_world_size()
    gathered_opt, gathered_rng = [None] * world, [None] * world
    dist.all_gather_object(gathered_opt, optimizer_state(engine))
    dist.all_gather_object(gathered_rng, torch.get_rng_state())
    if bad:
        raise RunFailed(f"epoch {epoch} not saved: the adapter diverged ({bad[0]} is NaN/inf): lower --lr_init")
    if dist.get_rank() != 0:
        return None
    path = proj / f"rwkv-{epoch}.pth"
    write_state_dict(sd, path)
    with files.atomic_path(proj / STATE_FILE) as tmp, open(tmp, "wb") as f:
        torch.save({"epoch": epoch, "step": step, "adapter": path.name, "optimizer": gathered_opt,
                    "rng": gathered_rng, "settings": settings}, f)
    return path


def save_best(engine, model: torch.nn.Module, params: list, proj: Path) -> None:
    """The adapter as rwkv-best.pth (collective; rank 0 writes)."""
    sd = gathered_trainable(engine, model, params)
    if dist.get_rank() == 0:
        write_state_dict(sd, proj / BEST_FILE)


def forget_final(proj: Path) -> bool:
    """Remove an earlier run's rwkv-final.pth (this run may fail); whether there was one."""
    if (proj / FINAL_FILE).is_file():
        (proj / FINAL_FILE).unlink()
        return True
    return False


def write_final(last_saved: Path, proj: Path) -> Path:
    """rwkv-final.pth: a copy of the run's last adapter."""
    files.copy_file(last_saved, proj / FINAL_FILE)
    return proj / FINAL_FILE


def peft_folder_of(adapter: Path) -> Path:
    """Where --peft_folder writes an adapter as a Hugging Face peft folder: rwkv-<epoch>-peft/ beside it."""
    return adapter.with_name(f"{adapter.stem}-peft")


def write_peft_folder(names: str, adapter: Path) -> None:
    """With --peft_folder blinkdl|hf ('' = off): the adapter also as a peft folder with those module names."""
    if names:
        from rwkv_peft.export.adapter import export_adapter

        export_adapter(adapter, peft_folder_of(adapter), names)
