"""What a resumed run must keep: the settings that decide what the uninterrupted run would compute.

Every saved ``trainer_state.pt`` records them (``snapshot``), with the identity of each file the run
learns from: its size and a digest of its bytes (whole files up to 64 MiB, else the first and last 16
MiB: a binidx ``.idx`` whole, a ``.pth``'s zip directory with every record's CRC), so moving or copying
the data is no change and editing it is. ``check_resume`` refuses a resume whose settings differ, with
one line listing each change, unless ``--resume_changes allow``; then the changes are returned, for the
log and the summary. Settings that only change speed or memory (op, head_chunk, grad_cp, strategy),
what is saved or shown (epoch_save, eval, loggers) are not compared.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from rwkv_peft.data import get_data_type
from rwkv_peft.integrity import Span, read_chunks
from rwkv_peft.train.config import TrainConfig

COMPUTED = ("objective", "ctx_len", "micro_bsz", "accumulate_grad_batches", "random_seed", "epoch_steps", "epoch_count",
            "epoch_begin", "lr_init", "lr_final", "lr_schedule", "warmup_steps", "wsd_decay", "beta1", "beta2",
            "adam_eps", "weight_decay", "grad_clip", "data_type", "dataload", "sft_field", "sft_template",
            "too_long", "magic_prime", "train_type", "chunk_ctx", "precision", "quant", "peft")
WHOLE, SAMPLE = 1 << 26, 1 << 24  # files up to WHOLE bytes are hashed whole, bigger ones by head and tail


def identity(flag_value: str, paths: list[str]) -> dict:
    """The files behind one flag: its value (shown, not compared), their total size and a digest."""
    h, size = hashlib.blake2b(digest_size=8), 0
    for p in paths:
        n = os.path.getsize(p)
        size += n
        h.update(n.to_bytes(8, "little"))
        spans = [(0, n)] if n <= WHOLE else [(0, SAMPLE), (n - SAMPLE, SAMPLE)]
        for offset, nbytes in spans:
            for chunk in read_chunks(Span(Path(p), offset, nbytes)):
                h.update(chunk)
    return {"path": flag_value, "size": size, "digest": h.hexdigest()}


def snapshot(cfg: TrainConfig, world_size: int) -> dict:
    """This run's settings (plain JSON values: trainer_state.pt stores them, loaded weights_only)."""
    found = {name: getattr(cfg, name) for name in COMPUTED}
    found["sft_field"] = list(cfg.sft_field)
    found["peft_config"] = json.loads(cfg.peft_json or "{}")
    found["objective_options"] = json.loads(json.dumps(cfg.objective_options, default=str))  # plain values
    found["world_size"] = world_size
    base = Path(cfg.load_model)  # a file, or a Hugging Face folder: its files
    found["load_model"] = identity(cfg.load_model, sorted(str(f) for f in base.iterdir() if f.is_file()
                                                          and not f.name.startswith(".")) if base.is_dir() else [base])
    found["data_file"] = identity(cfg.data_file, get_data_type(cfg.data_type).files("--data_file", cfg.data_file))
    for name in ("tokenizer", "chat_template"):
        value = getattr(cfg, name)
        found[name] = identity(value, [value]) if Path(value).is_file() else value
    return found


def _show(value) -> str:
    if isinstance(value, dict) and "digest" in value:
        return f"{value['path']} ({value['size']} bytes, digest {value['digest']})"
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def changes(saved: dict, now: dict) -> list[str]:
    """``name old -> new`` for each setting in both that differs (file identities: by size and digest)."""
    out = []
    for name, new in now.items():
        if name not in saved:
            continue
        old = saved[name]
        if isinstance(old, dict) and isinstance(new, dict) and "digest" in old and "digest" in new:
            same = (old["size"], old["digest"]) == (new["size"], new["digest"])
        else:
            same = old == new
        if not same:
            out.append(f"{name} {_show(old)} -> {_show(new)}")
    return out


def check_resume(state: dict | None, now: dict, policy: str, where: Path) -> list[str]:
    """The changes from the settings saved in ``state`` (read from ``where``; None: not resuming) to ``now``:
    a ValueError listing them unless ``policy`` is "allow"."""
    if state is None:
        return []
    saved = state.get("settings")
    if not isinstance(saved, dict):
        print(f"note: {where} records no settings (an older trainer's); they are not compared", file=sys.stderr)
        return []
    found = changes(saved, now)
    if found and policy != "allow":
        raise ValueError(f"--resume 1: {where} was saved with other settings: {'; '.join(found)}; a resumed run "
                         "must compute what the uninterrupted one would: resume with the saved settings, choose "
                         "another --proj_dir, or pass --resume_changes allow (the changes are then logged)")
    return found
