"""Put adapters into a model, freeze the rest, and move adapter tensors in and out of checkpoints.

Target linears come from the model class's ``peft_targets`` ({part: linear names inside
``blocks.<i>.<part>``}) and extra trainable groups from ``model.train_part(name)``, so nothing
here knows a particular RWKV version. Adapter modules keep the base linear's ``weight`` name,
so every parameter name stays a checkpoint key (``blocks.3.ffn.key.weight``, ``...key.miss``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from rwkv_peft.peft.config import json_fields
from rwkv_peft.peft.lora import LoraConfig, LoraLinear
from rwkv_peft.peft.miss import MissConfig, MissLinear, miss_check
from rwkv_peft.peft.state import StateConfig, add_time_state

METHODS = ("miss", "lora", "pissa", "state", "full")
FLAGS = {"miss": "--miss_config", "lora": "--lora_config", "pissa": "--lora_config", "state": "--peft_config"}
FOREIGN_SUFFIXES = (".disha", ".bone")  # RWKV-PEFT's names for the MiSS tensor


@dataclass
class FullConfig:
    """Full fine-tuning: every parameter trains; ``load`` starts from a saved (partial) state dict."""

    load: str = ""
    train_parts: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, text: str) -> FullConfig:
        return cls(**json_fields(cls, text, "--peft_config"))


PeftConfig = MissConfig | LoraConfig | StateConfig | FullConfig


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"--peft: expected one of {'|'.join(METHODS)}, got {method!r}")


def parse_peft_config(method: str, json_text: str | None) -> PeftConfig:
    """The config for ``--peft METHOD`` from the JSON of its flag (--miss_config, --lora_config; '' = defaults)."""
    _check_method(method)
    text = json_text or ""
    if method == "miss":
        return MissConfig.from_json(text)
    if method in ("lora", "pissa"):
        return LoraConfig.from_json(text, pissa=method == "pissa")
    if method == "state":
        return StateConfig.from_json(text)
    return FullConfig.from_json(text)


def default_config(method: str) -> PeftConfig:
    return parse_peft_config(method, "")


def target_linears(model: nn.Module, parts: tuple[str, ...], flag: str) -> list[tuple[str, nn.Module, str]]:
    """(checkpoint path, parent module, attribute) of every linear that ``parts`` selects."""
    targets = type(model).peft_targets
    bad = [p for p in parts if p not in targets]
    if bad or not parts:
        raise ValueError(f"{flag}: parts must be a non-empty subset of {sorted(targets)}, got {list(parts)}")
    found = []
    for i, block in enumerate(model.blocks):
        for part in parts:
            parent = getattr(block, part)
            for attr in targets[part]:
                linear = getattr(parent, attr)
                if not isinstance(linear, nn.Linear):
                    raise ValueError(f"{flag}: blocks.{i}.{part}.{attr} is {type(linear).__name__}, not nn.Linear")
                found.append((f"blocks.{i}.{part}.{attr}", parent, attr))
    return found


def is_adapted(model: nn.Module) -> bool:
    return any(isinstance(m, (MissLinear, LoraLinear)) for m in model.modules()) or any(
        n.endswith(".time_state") for n, _ in model.named_parameters()
    )


def param_report(model: nn.Module) -> str:
    """peft's one-line summary of trainable vs all parameters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def apply_peft(model: nn.Module, method: str, cfg: PeftConfig | None = None) -> str:
    """Freeze the model except ``cfg.train_parts``, add the method's adapters, load ``cfg.load``; returns the report.

    All targets are checked before any module is replaced, so a bad setting leaves the model as it was.
    """
    _check_method(method)
    cfg = default_config(method) if cfg is None else cfg
    if is_adapted(model):
        raise ValueError(f"--peft {method}: the model already has adapters")
    if method == "full":
        model.requires_grad_(True)
    else:
        flag = FLAGS[method]
        if method == "miss":
            targets = target_linears(model, cfg.parts, flag)
            for name, parent, attr in targets:
                miss_check(*getattr(parent, attr).weight.shape, cfg, name)
        elif method in ("lora", "pissa"):
            targets = target_linears(model, cfg.parts, flag)
        model.requires_grad_(False)
        for name, p in model.named_parameters():
            if model.train_part(name) in cfg.train_parts:
                p.requires_grad_(True)
        if method == "miss":
            for name, parent, attr in targets:
                setattr(parent, attr, MissLinear(getattr(parent, attr), cfg, name))
        elif method in ("lora", "pissa"):
            pissa = method == "pissa" or cfg.pissa
            for name, parent, attr in targets:
                setattr(parent, attr, LoraLinear(getattr(parent, attr), cfg, name, pissa=pissa))
        else:
            add_time_state(model)
    if cfg.load:
        n = load_adapter(model, cfg.load)
        print(f"loaded {n} tensors from {cfg.load}")
    return param_report(model)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What ``rwkv-<epoch>.pth`` holds: trainable parameters plus PiSSA's initial factors (cpu copies)."""
    sd = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    for n, b in model.named_buffers():
        if n.endswith((".pissa_A0", ".pissa_B0")):
            sd[n] = b.detach().to("cpu", copy=True)
    return sd


def _rename_foreign(key: str) -> str:
    for suffix in FOREIGN_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)] + ".miss"
    return key


@torch.no_grad()
def load_adapter(model: nn.Module, path_or_sd: str | os.PathLike | dict[str, torch.Tensor]) -> int:
    """Copy a saved adapter (or any partial state dict) into the model; returns the number of tensors loaded.

    Every key must name a parameter or buffer of the model with the same shape: a load that silently
    matches nothing (or only part of the file) is an error naming the file and key.
    """
    if isinstance(path_or_sd, dict):
        sd, where = path_or_sd, "adapter state dict"
    else:
        from rwkv_peft.model import read_state_dict

        sd, where = read_state_dict(path_or_sd), str(path_or_sd)
    sd = {_rename_foreign(k): v for k, v in sd.items()}
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    missing = [k for k in sd if k not in targets]
    if not sd or len(missing) == len(sd):
        sample = ", ".join(list(sd)[:3]) or "(empty)"
        raise ValueError(f"{where}: no key matches the model (file has e.g. {sample}); wrong adapter or --peft?")
    if missing:
        raise ValueError(f"{where}: {len(missing)} key(s) not in the model, e.g. {missing[0]!r}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(targets[k].shape):
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)}, the model expects {tuple(targets[k].shape)}")
        if k.endswith((".pissa_A0", ".pissa_B0")) and k[:-2] + ("B0" if k.endswith("A0") else "A0") not in sd:
            raise ValueError(f"{where}: {k} comes without its PiSSA partner; both pissa_A0 and pissa_B0 are needed")
    modules = dict(model.named_modules())
    for k, v in sd.items():
        path, leaf = k.rsplit(".", 1)
        if leaf == "pissa_A0":  # the frozen residual must match the saved initial factors
            layer = modules[path]
            layer.set_pissa_init(v.to(layer.pissa_A0), sd[f"{path}.pissa_B0"].to(layer.pissa_B0))
        elif leaf != "pissa_B0":
            targets[k].copy_(v)
    return len(sd)


def adapter_config(model: nn.Module, method: str, cfg: PeftConfig) -> dict:
    """The content of ``adapter_config.json``: the method's settings and the base architecture."""
    _check_method(method)
    arch = model.cfg
    is_lora = isinstance(cfg, LoraConfig)
    if is_lora and cfg.pissa:
        method = "pissa"
    return {
        "method": method,
        "mode": cfg.mode if isinstance(cfg, MissConfig) else None,
        "r": cfg.r if isinstance(cfg, (MissConfig, LoraConfig)) else None,
        "mini_r": cfg.mini_r if isinstance(cfg, MissConfig) else None,
        "alpha": cfg.alpha if is_lora else None,
        "parts": list(getattr(cfg, "parts", ())) if method != "full" else [],
        "train_parts": list(cfg.train_parts),
        "base": {
            "version": model.version,
            "n_layer": arch.n_layer,
            "n_embd": arch.n_embd,
            "vocab_size": arch.vocab_size,
            "head_size": arch.head_size,
            "dim_ffn": arch.dim_ffn,
        },
    }
