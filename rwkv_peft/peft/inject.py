"""Put adapters into a model, freeze the rest, and move adapter tensors in and out of checkpoints.

Target linears come from the model class's ``peft_targets`` ({part: linear names inside
``blocks.<i>.<part>``}) and extra trainable groups from ``model.train_part(name)``, so nothing
here knows a particular RWKV version. Adapter modules keep the base linear's ``weight`` name,
so every parameter name stays a checkpoint key (``blocks.3.ffn.key.weight``, ``...key.miss``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from rwkv_peft.peft.registry import adapter_keys, get_method, key_aliases, saved_buffers

PeftConfig = Any  # the config class of the method's registry record (MissConfig, LoraConfig, ...)


def parse_peft_config(method: str, json_text: str | None) -> PeftConfig:
    """The config for ``--peft METHOD`` from the JSON of its flag (--miss_config, --lora_config; '' = defaults)."""
    return get_method(method).parse(json_text or "")


def target_slots(model: nn.Module, parts: tuple[str, ...] | None = None) -> list[tuple[str, nn.Module, str]]:
    """(checkpoint path, parent module, attribute) of every target linear in the model class's
    ``peft_targets`` (those of ``parts``; None: all), whatever sits there now (plain, adapted, quantized)."""
    targets = type(model).peft_targets
    return [(f"blocks.{i}.{part}.{attr}", getattr(block, part), attr)
            for i, block in enumerate(model.blocks) for part in (targets if parts is None else parts)
            for attr in targets[part]]


def target_linears(model: nn.Module, parts: tuple[str, ...], flag: str) -> list[tuple[str, nn.Module, str]]:
    """``target_slots`` of ``parts``, checked: ``parts`` valid, and every slot a plain (not yet adapted) linear."""
    targets = type(model).peft_targets
    bad = [p for p in parts if p not in targets]
    if bad or not parts:
        raise ValueError(f"{flag}: parts must be a non-empty subset of {sorted(targets)}, got {list(parts)}")
    found = target_slots(model, parts)
    for path, parent, attr in found:
        linear = getattr(parent, attr)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{flag}: {path} is {type(linear).__name__}, not nn.Linear")
    return found


def is_adapted(model: nn.Module) -> bool:
    keys = adapter_keys()
    return any(n.rpartition(".")[2] in keys for n, _ in model.named_parameters())


def param_report(model: nn.Module) -> str:
    """peft's one-line summary of trainable vs all parameters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def apply_peft(model: nn.Module, method: str, cfg: PeftConfig | None = None) -> str:
    """Freeze the model except ``cfg.train_parts``, add the method's adapters, load ``cfg.load``; returns the report.

    All targets are checked before any module is replaced, so a bad setting leaves the model as it was.
    """
    m = get_method(method)
    cfg = m.parse("") if cfg is None else cfg
    if is_adapted(model):
        raise ValueError(f"--peft {method}: the model already has adapters")
    if cfg.load and os.path.isdir(cfg.load):
        from rwkv_peft.peft.folder import check_loadable

        check_loadable(cfg.load, method, m.describe(cfg), m.flag)
    targets = target_linears(model, cfg.parts, m.flag) if m.layer is not None else []
    for name, parent, attr in targets if m.check is not None else ():
        m.check(*getattr(parent, attr).weight.shape, cfg, name)
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if model.train_part(name) in cfg.train_parts:
            p.requires_grad_(True)
    for name, parent, attr in targets:
        setattr(parent, attr, m.layer(getattr(parent, attr), cfg, name))
    if m.attach is not None:
        m.attach(model, cfg)
    model.peft_method = m.name
    if cfg.load:
        n = load_adapter(model, cfg.load)
        print(f"loaded {n} tensors from {cfg.load}")
    return param_report(model)


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes its base's exact output: every adapter switched off the way its
    method's record says (adapter layers bypass their delta; state tuning starts from the zero state).

    Trained ``train_parts`` change base tensors in place and full fine-tuning trains the base itself:
    there is nothing to switch off, which is a one-line error.
    """
    name = getattr(model, "peft_method", None)
    if name is None:
        raise ValueError("adapter_disabled: the model has no adapter (apply_peft has not run on it)")
    m = get_method(name)
    if m.switch is None:
        raise ValueError(f"--peft {name}: {m.no_switch}")
    in_place = next((n for n, p in model.named_parameters() if p.requires_grad and model.train_part(n)), None)
    if in_place is not None:
        raise ValueError(f"--peft {name}: {in_place} is a base tensor trained in place (train_parts); the base "
                         "output cannot be recovered by switching the adapter off")
    m.switch(model, True)
    try:
        yield model
    finally:
        m.switch(model, False)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What ``rwkv-<epoch>.pth`` holds: trainable parameters plus the buffers methods save (cpu copies).

    Base tensors (train_parts, full) keep the shape the base checkpoint stores them in.
    """
    from rwkv_peft.model import to_stored

    sd = {
        n: to_stored(model, n, p.detach()).to("cpu", copy=True)
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    keep = saved_buffers()
    for n, b in model.named_buffers():
        if n.rpartition(".")[2] in keep:
            sd[n] = b.detach().to("cpu", copy=True)
    return sd


def _rename_foreign(key: str, aliases: dict[str, str]) -> str:
    path, _, leaf = key.rpartition(".")
    return f"{path}.{aliases[leaf]}" if leaf in aliases else key


@torch.no_grad()
def load_adapter(model: nn.Module, path_or_sd: str | os.PathLike | dict[str, torch.Tensor]) -> int:
    """Copy a saved adapter (a checkpoint, a peft folder, or any partial state dict) into the model; returns
    the number of tensors loaded.

    Every key must name a parameter or buffer of the model with the same shape (or the shape the
    base checkpoint stores it in): a load that silently matches nothing (or only part of the file)
    is an error naming the file and key.
    """
    from rwkv_peft.model import fits, read_state_dict

    if isinstance(path_or_sd, dict):
        sd, where = path_or_sd, "adapter state dict"
    elif os.path.isdir(path_or_sd):
        from rwkv_peft.peft.folder import read_peft_folder

        sd, where = read_peft_folder(path_or_sd)[0], str(path_or_sd)
    else:
        sd, where = read_state_dict(path_or_sd), str(path_or_sd)
    aliases = key_aliases()
    sd = {_rename_foreign(k, aliases): v for k, v in sd.items()}
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    missing = [k for k in sd if k not in targets]
    if not sd or len(missing) == len(sd):
        sample = ", ".join(list(sd)[:3]) or "(empty)"
        raise ValueError(f"{where}: no key matches the model (file has e.g. {sample}); wrong adapter or --peft?")
    if missing:
        raise ValueError(f"{where}: {len(missing)} key(s) not in the model, e.g. {missing[0]!r}")
    buffers, kinds = saved_buffers(), {}  # per layer path: the saved buffers it gets, all or none
    for k, v in sd.items():
        if not fits(tuple(v.shape), tuple(targets[k].shape), k):
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)}, the model expects {tuple(targets[k].shape)}")
        path, _, leaf = k.rpartition(".")
        if leaf in buffers:
            kinds.setdefault(path, {})[leaf] = v
    modules = dict(model.named_modules())
    for path, saved in kinds.items():
        want = [b for b in buffers if hasattr(modules[path], b)]
        if sorted(saved) != sorted(want):
            raise ValueError(f"{where}: {path} has {sorted(saved)} but needs all of {want} to load them")
    for k, v in sd.items():
        if k.rpartition(".")[2] not in buffers:
            targets[k].copy_(v.reshape(targets[k].shape))
    for path, saved in kinds.items():  # e.g. PiSSA: the frozen residual must match the saved initial factors
        modules[path].load_buffers(saved)
    return len(sd)


def adapter_config(model: nn.Module, method: str, cfg: PeftConfig) -> dict:
    """The content of ``adapter_config.json``: the method's settings and the base architecture."""
    fields = {"method": method, "mode": None, "r": None, "mini_r": None, "alpha": None}
    arch = model.cfg
    return fields | get_method(method).describe(cfg) | {
        "parts": list(getattr(cfg, "parts", ())),
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
