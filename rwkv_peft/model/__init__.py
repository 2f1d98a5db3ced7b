"""RWKV models whose parameter names are the official checkpoint keys; architecture read from tensors.

Each supported generation (x070, x060, x052) registers its config class, model class, config
reader and initialiser in ``VERSIONS``; everything else here is version-agnostic, and what the
model classes share (block, token shift, state, forward) is in ``base.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from rwkv_peft.model import rwkv5, rwkv6, rwkv7
from rwkv_peft.model.checkpoint import fits, read_state_dict, write_state_dict
from rwkv_peft.model.rwkv5 import RWKV5, RWKV5Config, init_rwkv5_
from rwkv_peft.model.rwkv6 import RWKV6, RWKV6Config, init_rwkv6_
from rwkv_peft.model.rwkv7 import RWKV7, RWKV7Config, init_rwkv7_

__all__ = [
    "RWKV7",
    "RWKV7Config",
    "RWKV6",
    "RWKV6Config",
    "RWKV5",
    "RWKV5Config",
    "VERSIONS",
    "detect_version",
    "config_from_state_dict",
    "build_model",
    "init_model",
    "load_model",
    "save_model",
    "checkpoint_state_dict",
    "fits",
    "to_stored",
    "read_state_dict",
    "write_state_dict",
]

RWKVModel = RWKV7 | RWKV6 | RWKV5
RWKVConfig = RWKV7Config | RWKV6Config | RWKV5Config


def detect_version(sd: Mapping[str, torch.Tensor], name: str = "checkpoint") -> str:
    """RWKV generation from the key names: x070, x060 or x052 (older ones are refused)."""
    if "blocks.0.att.r_k" in sd or "blocks.0.att.x_r" in sd:
        return "x070"
    if "blocks.0.att.time_maa_x" in sd:
        return "x060"
    if "blocks.0.att.time_faaaa" in sd and "blocks.0.att.time_mix_g" in sd:
        return "x052"
    if "blocks.0.att.time_first" in sd or "blocks.0.att.time_mix_k" in sd:
        raise ValueError(
            f"{name}: an RWKV-4 / v5.0 / v5.1 checkpoint (time_first or time_mix_* without time_faaaa); "
            f"not supported, only {', '.join(VERSIONS)}"
        )
    raise ValueError(
        f"{name}: not an RWKV-7/6/5 checkpoint (no blocks.0.att.r_k, time_maa_x or time_faaaa key; "
        f"first keys: {', '.join(list(sd)[:5]) or 'none'})"
    )


@dataclass(frozen=True)
class Version:
    """What one RWKV generation provides: ``config(n_layer, n_embd, vocab_size, head_size, dim_ffn)``."""

    config: type
    model: type[nn.Module]
    read_config: Callable[[Mapping[str, torch.Tensor], str], Any]
    init: Callable[[nn.Module], nn.Module]


VERSIONS: Mapping[str, Version] = MappingProxyType(
    {
        "x070": Version(RWKV7Config, RWKV7, rwkv7.config_from_state_dict, init_rwkv7_),
        "x060": Version(RWKV6Config, RWKV6, rwkv6.config_from_state_dict, init_rwkv6_),
        "x052": Version(RWKV5Config, RWKV5, rwkv5.config_from_state_dict, init_rwkv5_),
    }
)


def _version_of(cfg: RWKVConfig) -> Version:
    for v in VERSIONS.values():
        if type(cfg) is v.config:
            return v
    raise ValueError(f"unknown RWKV config type {type(cfg).__name__}")


def config_from_state_dict(sd: Mapping[str, torch.Tensor], name: str = "checkpoint") -> RWKVConfig:
    """Architecture of a checkpoint (any supported version), read from its tensor shapes."""
    return VERSIONS[detect_version(sd, name)].read_config(sd, name)


def build_model(cfg: RWKVConfig, op: str = "auto", device: str | torch.device = "cpu") -> RWKVModel:
    """An uninitialised model (on ``device``, which may be ``"meta"``)."""
    with torch.device(device):
        return _version_of(cfg).model(cfg, op)


def init_model(cfg: RWKVConfig, seed: int = 0, op: str = "auto") -> RWKVModel:
    """A freshly initialised fp32 model with RWKV-LM's training initialisation."""
    torch.manual_seed(seed)
    return _version_of(cfg).init(build_model(cfg, op))


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], name: str) -> None:
    """One error naming the file, listing every missing, unexpected and mis-shaped key."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    shapes = [
        f"{k} {tuple(sd[k].shape)} (expected {want[k]})"
        for k in want
        if k in sd and not fits(tuple(sd[k].shape), want[k], k)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", shapes)):
        if items:
            shown = ", ".join(items[:8]) + (
                f", ... ({len(items)} in all)" if len(items) > 8 else ""
            )
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(
            f"{name}: not a consistent RWKV {model.version} checkpoint; " + "; ".join(problems)
        )


def load_model(
    path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    op: str = "auto",
) -> RWKVModel:
    """Model from an official checkpoint; ``dtype=None`` keeps each tensor's stored dtype.

    ``model.layout`` remembers each key's stored shape and dtype, in file order, so that
    ``save_model`` and the trainer's checkpoints give the file back with exactly its key set.
    """
    if isinstance(path_or_state_dict, Mapping):
        sd, name = path_or_state_dict, "state dict"
    else:
        sd, name = read_state_dict(path_or_state_dict), str(path_or_state_dict)
    cfg = config_from_state_dict(sd, name)
    model = build_model(cfg, op, device="meta")
    check_state_dict(model, sd, name)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    layout = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
    sd = {k: v.reshape(shapes[k]).to(device=device, dtype=dtype or v.dtype, copy=True) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.layout = layout
    return model


def to_stored(model: nn.Module, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (parameter ``key`` of ``model``) in the shape its checkpoint stores it in."""
    stored = (getattr(model, "layout", None) or {}).get(key)
    return tensor if stored is None else tensor.reshape(stored[0])


def checkpoint_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights as a checkpoint (cpu): a loaded model's exactly in its file's layout."""
    sd = model.state_dict()
    layout = getattr(model, "layout", None)
    if layout is None:
        return {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in sd.items()}
    extra, missing = [k for k in sd if k not in layout], [k for k in layout if k not in sd]
    if extra or missing:
        raise ValueError(
            f"the model's tensors differ from the checkpoint it was loaded from (extra: {extra[:3]}, "
            f"missing: {missing[:3]}); save adapters with trainable_state_dict, or merge them first"
        )
    return {
        k: sd[k].detach().reshape(shape).to("cpu", dtype or stored).contiguous()
        for k, (shape, stored) in layout.items()
    }


def save_model(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
) -> None:
    """Write the official key layout (.pth or .safetensors), atomically.

    A loaded model is written with its file's keys, order, shapes and dtypes (``dtype`` overrides
    the dtypes); a fresh one with its own keys.
    """
    if isinstance(model_or_state_dict, nn.Module):
        sd = checkpoint_state_dict(model_or_state_dict, dtype)
    else:
        sd = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model_or_state_dict.items()}
    write_state_dict(sd, path)
