"""State tuning: a trainable initial WKV state per layer and head, the base frozen.

``add_time_state`` gives every block's time mix a ``time_state`` (H, N, N), indexed [value, key],
and makes it the mix's ``start_state``: the WKV state it starts from when no state is passed in.
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from rwkv_peft.peft.config import as_tuple, check_train_parts, json_fields


@dataclass
class StateConfig:
    """State tuning settings (full fine-tuning's too): extra train parts and an adapter to start from."""

    train_parts: tuple[str, ...] = ()
    load: str = ""

    def __post_init__(self) -> None:
        self.train_parts = as_tuple(self.train_parts)
        check_train_parts(self.train_parts, "--peft_config")

    @classmethod
    def from_json(cls, text: str) -> StateConfig:
        return cls(**json_fields(cls, text, "--peft_config"))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _learned_start(att: nn.Module, batch: int) -> torch.Tensor:
    """The time mix's ``start_state`` under state tuning: its learned state, the same for every sample."""
    return att.time_state.float().expand(batch, *att.time_state.shape)


def switch_state(model: nn.Module, off: bool) -> None:
    """Start every layer from the zero state (the base's) instead of its learned one, or back."""
    for block in model.blocks:
        att = block.att
        if off:
            vars(att).pop("start_state", None)  # the class's: None, zeros
        elif hasattr(att, "time_state"):
            att.start_state = types.MethodType(_learned_start, att)


def add_time_state(model: nn.Module, cfg: StateConfig | None = None) -> int:
    """Give every block's time-mix a zero (fp32) ``time_state`` parameter as its start state; returns how many."""
    for i, block in enumerate(model.blocks):
        att = block.att
        if hasattr(att, "time_state"):
            raise ValueError(f"state tuning: blocks.{i}.att already has a time_state")
        device = next(att.parameters()).device
        att.time_state = nn.Parameter(torch.zeros(att.n_head, att.head_size, att.head_size, device=device))
        att.start_state = types.MethodType(_learned_start, att)
    return len(model.blocks)


# ----------------------------------------------------------------------------- state files
#
# A state file is RWKV-PEFT's state-tuning output, which RWKV-Runner and Ai00 load: a plain dict
# {"blocks.<i>.att.time_state": (H, N, N)} for every layer, indexed [value, key] like the model's
# time_state. A state run's adapter (``OUT/rwkv-N.pth``) is such a file when it has no train_parts.

STATE_KEY = "blocks.{}.att.time_state"


def is_state_key(key: str) -> bool:
    return key.startswith("blocks.") and key.endswith(".att.time_state")


def split_states(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(everything else, the time_state tensors) of a checkpoint or adapter."""
    rest = {k: v for k, v in sd.items() if not is_state_key(k)}
    return rest, {k: v for k, v in sd.items() if is_state_key(k)}


def check_states(states: Mapping[str, torch.Tensor], model: nn.Module, name: str) -> list[torch.Tensor]:
    """The per-layer (H, N, N) fp32 start states for ``model``; one error naming the file otherwise."""
    L = len(model.blocks)
    H, N = model.blocks[0].att.n_head, model.blocks[0].att.head_size
    want = [STATE_KEY.format(i) for i in range(L)]
    missing = [k for k in want if k not in states]
    extra = [k for k in states if k not in want]
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise ValueError(f"{name}: not a state file for this {L}-layer model ({what}; "
                         f"expected {want[0]} .. {want[-1]})")
    out = []
    for k in want:
        t = states[k]
        if tuple(t.shape) != (H, N, N):
            raise ValueError(f"{name}: {k} has shape {tuple(t.shape)}, the model needs (H, N, N) = {(H, N, N)}")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise ValueError(f"{name}: {k} is not a finite floating-point tensor")
        out.append(t.float())
    return out


def read_state_file(path: str | os.PathLike, model: nn.Module) -> list[torch.Tensor]:
    """The start states in a state file (RWKV-PEFT's format), checked against ``model``."""
    from rwkv_peft.model import read_state_dict

    rest, states = split_states(read_state_dict(path, mmap=False))
    if rest:
        raise ValueError(f"{path}: holds {len(rest)} tensor(s) besides time_state (e.g. {next(iter(rest))}); "
                         "a state adapter trained with train_parts goes in --adapter, not --state")
    if not states:
        raise ValueError(f"{path}: no blocks.N.att.time_state tensors; not a state file")
    return check_states(states, model, str(path))


@torch.no_grad()
def set_time_state(model: nn.Module, states: list[torch.Tensor]) -> None:
    """Make ``states`` (per layer, [value, key]) the model's start state, as state tuning does."""
    if not any(hasattr(b.att, "time_state") for b in model.blocks):
        add_time_state(model)
    for block, s in zip(model.blocks, states, strict=True):
        block.att.time_state.copy_(s)
    model.requires_grad_(False)


def time_states(model: nn.Module) -> list[torch.Tensor]:
    """The model's per-layer start states (fp32 cpu copies); zeros where it has none."""
    out = []
    for block in model.blocks:
        att = block.att
        ts = getattr(att, "time_state", None)
        out.append(torch.zeros(att.n_head, att.head_size, att.head_size) if ts is None
                   else ts.detach().float().cpu().clone())
    return out


def merge_state(base_path: str | os.PathLike, adapter_path: str | os.PathLike,
                output_path: str | os.PathLike) -> Path:
    """Write the base with a state adapter folded in, as RWKV-PEFT's merge_state.py does: train_parts
    tensors replace base tensors and the ``time_state`` tensors are added.

    The `rwkv` runtime uses a ``time_state`` it finds in an x060/x052 model file as the start state;
    its x070 class ignores one, so for x070 this refuses and the state file is used on its own.
    """
    from rwkv_peft.model import build_model, config_from_state_dict, detect_version, read_state_dict, write_state_dict

    base_path, adapter_path, output = Path(base_path), Path(adapter_path), Path(output_path)
    if output.resolve() in (base_path.resolve(), adapter_path.resolve()):
        raise ValueError(f"{output}: --output would overwrite an input")
    base = read_state_dict(base_path)
    version = detect_version(base, str(base_path))
    if version == "x070":
        raise ValueError(f"{base_path}: the rwkv runtime ignores a time_state inside an x070 model file; use "
                         f"the state file {adapter_path} on its own (generate --state, RWKV-Runner/Ai00 state)")
    rest, states = split_states(read_state_dict(adapter_path))
    if not states:
        raise ValueError(f"{adapter_path}: no blocks.N.att.time_state tensors; not a state adapter")
    bad = [k for k in rest if k not in base or tuple(rest[k].shape) != tuple(base[k].shape)]
    if bad:
        raise ValueError(f"{adapter_path}: {bad[0]} is not a base tensor of that shape in {base_path}")
    check_states(states, build_model(config_from_state_dict(base, str(base_path)), device="meta"), str(adapter_path))
    merged = {k: rest[k].to(v.dtype) if k in rest else v for k, v in base.items()}
    merged.update(states)
    return write_state_dict(merged, output)
