"""RWKV models whose parameter names are the official checkpoint keys; architecture read from tensors."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from rwkv_peft.model.checkpoint import read_state_dict, write_state_dict
from rwkv_peft.model.rwkv7 import RWKV7, RWKV7Config, init_rwkv7_

__all__ = [
    "RWKV7",
    "RWKV7Config",
    "detect_version",
    "config_from_state_dict",
    "build_model",
    "init_model",
    "load_model",
    "save_model",
    "read_state_dict",
    "write_state_dict",
]

SUPPORTED = ("x070",)


def detect_version(sd: Mapping[str, torch.Tensor], name: str = "checkpoint") -> str:
    """RWKV generation from the key names: x070, x060 or x052."""
    if "blocks.0.att.r_k" in sd or "blocks.0.att.x_r" in sd:
        return "x070"
    if "blocks.0.att.time_maa_x" in sd:
        return "x060"
    if "blocks.0.att.time_faaaa" in sd or "blocks.0.att.time_mix_g" in sd:
        return "x052"
    raise ValueError(
        f"{name}: not an RWKV-7/6/5 checkpoint (no blocks.0.att.r_k, time_maa_x or time_faaaa key; "
        f"first keys: {', '.join(list(sd)[:5]) or 'none'})"
    )


def _shape(sd: Mapping[str, torch.Tensor], key: str, name: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"{name}: missing key {key!r}, needed to read the architecture")
    return tuple(sd[key].shape)


def config_from_state_dict(sd: Mapping[str, torch.Tensor], name: str = "checkpoint") -> RWKV7Config:
    """Architecture of an x070 checkpoint, read from its tensor shapes."""
    version = detect_version(sd, name)
    if version not in SUPPORTED:
        raise ValueError(f"{name}: RWKV {version} checkpoints are not supported yet (only x070)")
    vocab_size, n_embd = _shape(sd, "emb.weight", name)
    layers = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    n_head, head_size = _shape(sd, "blocks.0.att.r_k", name)
    if n_head * head_size != n_embd:
        raise ValueError(
            f"{name}: blocks.0.att.r_k is {n_head}x{head_size}, expected heads x head_size = {n_embd}"
        )
    return RWKV7Config(
        n_layer=max(layers) + 1,
        n_embd=n_embd,
        vocab_size=vocab_size,
        head_size=head_size,
        dim_ffn=_shape(sd, "blocks.0.ffn.key.weight", name)[0],
        d_decay=_shape(sd, "blocks.0.att.w1", name)[1],
        d_aaa=_shape(sd, "blocks.0.att.a1", name)[1],
        d_mv=_shape(sd, "blocks.0.att.v1", name)[1],
        d_gate=_shape(sd, "blocks.0.att.g1", name)[1],
    )


def build_model(cfg: RWKV7Config, op: str = "auto", device: str | torch.device = "cpu") -> RWKV7:
    """An uninitialised model (on ``device``, which may be ``"meta"``)."""
    with torch.device(device):
        return RWKV7(cfg, op)


def init_model(cfg: RWKV7Config, seed: int = 0, op: str = "auto") -> RWKV7:
    """A freshly initialised fp32 model with RWKV-LM's training initialisation."""
    torch.manual_seed(seed)
    return init_rwkv7_(build_model(cfg, op))


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], name: str) -> None:
    """One error listing every missing, unexpected and mis-shaped key."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    shapes = [
        f"{k} {tuple(sd[k].shape)} (expected {want[k]})"
        for k in want
        if k in sd and tuple(sd[k].shape) != want[k]
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
) -> RWKV7:
    """Model from an official checkpoint; ``dtype=None`` keeps each tensor's stored dtype."""
    if isinstance(path_or_state_dict, Mapping):
        sd, name = path_or_state_dict, "state dict"
    else:
        sd, name = read_state_dict(path_or_state_dict), str(path_or_state_dict)
    cfg = config_from_state_dict(sd, name)
    model = build_model(cfg, op, device="meta")
    check_state_dict(model, sd, name)
    sd = {k: v.to(device=device, dtype=dtype or v.dtype, copy=True) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def save_model(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
) -> None:
    """Write the official key layout (.pth or .safetensors), atomically."""
    sd = model_or_state_dict
    if isinstance(sd, nn.Module):
        sd = sd.state_dict()
    write_state_dict(
        {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in sd.items()}, path
    )
