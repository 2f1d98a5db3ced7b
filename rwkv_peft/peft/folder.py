"""Hugging Face peft adapter folders (``save_pretrained``: adapter_config.json + adapter_model.safetensors).

Keys there are ``base_model.model.<module>.<peft suffix>`` (the prefix may be absent) with the module
named as RWKV-PEFT saves it (BlinkDL: ``blocks.3.att.receptance``) or as a Hugging Face layout of
rwkv_peft.export.hf names it (RWKV-7's ``model.layers.3.attn.r_proj``, RWKV-6's
``rwkv.blocks.3.attention.receptance``). Reading renames every key to ours
(``blocks.3.att.receptance.miss``) and the config to adapter_config.json's fields, so the merge,
``--verify``, generate and ``load`` see an ordinary adapter; tensors are views of the memory-mapped
file (nothing copied, dtype kept). ``rwkv_peft.export.adapter`` writes such folders with these tables.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from rwkv_peft import files
from rwkv_peft.export.hf import DEFAULT_LAYOUT, blinkdl_module_name, hf_module_name
from rwkv_peft.export.hf import LAYOUTS as HF_LAYOUTS
from rwkv_peft.peft.registry import from_peft_config, peft_suffixes

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before every module path
NAMES = ("blinkdl", "hf")  # module names: ours (RWKV-PEFT's), or the version's Hugging Face layout (export.hf)
# Config fields whose non-default values change what the tensors mean in ways no method here computes.
_REFUSED = {
    "modules_to_save": "whole modules saved beside the adapter",
    "bias": "trained biases",
    "fan_in_fan_out": "transposed (Conv1D) weights",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "layer_replication": "replicated layers",
    "target_parameters": "adapters on parameters instead of modules",
    "trainable_token_indices": "trained token embeddings",
    "lora_bias": "a trained bias on lora_B",
}


def linear_names(version_targets: Iterable[dict[str, tuple[str, ...]]]) -> set[str]:
    """``part.attr`` of every linear some model class adapts (att.receptance, ffn.key, ...)."""
    return {f"{part}.{attr}" for targets in version_targets for part, attrs in targets.items() for attr in attrs}


@functools.cache
def _blinkdl_linears() -> frozenset[str]:
    from rwkv_peft.model import VERSIONS

    return frozenset(linear_names(v.model.peft_targets for v in VERSIONS.values()))


def our_module(module: str) -> tuple[str, str] | None:
    """(our path, its layout: blinkdl or an export.hf layout) of a module path; None when it names no linear
    an adapter folds into."""
    found = [(module, "blinkdl")] if re.fullmatch(r"blocks\.\d+\.\w+\.\w+", module) else []
    for layout in HF_LAYOUTS:
        try:
            found.append((blinkdl_module_name(module, layout), layout))
        except ValueError:
            continue
    return next(((p, lay) for p, lay in found if p.split(".", 2)[2] in _blinkdl_linears()), None)


def module_name(path: str, names: str, version: str) -> str:
    """Our linear ``path`` named as ``names`` says (hf: the version's default Hugging Face layout)."""
    return path if names == "blinkdl" else hf_module_name(path, DEFAULT_LAYOUT[version])


def _known_modules(layers: set[int]) -> dict[str, str]:
    """Every adaptable linear of these layers in every layout: module path -> layout."""
    out = {}
    for path in (f"blocks.{i}.{n}" for i in layers for n in _blinkdl_linears()):
        out[path] = "blinkdl"
        for layout in HF_LAYOUTS:
            try:
                out[hf_module_name(path, layout)] = layout
            except ValueError:
                continue
    return out


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a peft adapter folder (no {CONFIG} in it)")
    raw = files.read_json_object(path)
    if raw.get("peft_type") not in peft_suffixes():
        raise ValueError(f"{path}: peft_type {raw.get('peft_type')!r} is not supported (expected one of "
                         f"{', '.join(peft_suffixes())})")
    for field, what in _REFUSED.items():
        if raw.get(field) not in (None, False, "none", [], {}):
            raise ValueError(f"{path}: {field}={raw[field]!r} ({what}) is not supported")
    return raw


def _our_config(raw: dict, where: str) -> dict:
    """adapter_config.json's fields (method, mode, r, mini_r, alpha) from peft's config (the method
    record's peft form reads them)."""
    r = raw.get("r")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"{where}: r must be a positive integer, got {r!r}")
    return from_peft_config(raw, r, where)


def _check_targets(targets: str | list | None, modules: list[str], where: str) -> None:
    """Every target_modules entry names some linear an adapter folds into, in any layout (peft's rule:
    the full path, a dotted suffix of it, or a regex over the full path)."""
    if targets is None:
        return
    known = _known_modules({int(i) for m in modules for i in re.findall(r"\.(\d+)\.", f".{m}.")} or {0})
    if isinstance(targets, str):
        bad = [] if any(re.fullmatch(targets, k) for k in known) else [targets]
    else:
        bad = [t for t in targets if not any(k == t or k.endswith(f".{t}") for k in known)]
    if bad:
        examples = sorted({re.split(r"\.\d+\.", k, maxsplit=1)[1] for k, lay in known.items()
                           if lay in ("blinkdl", "fla")})
        raise ValueError(f"{where}: target_modules {bad} name no linear of the RWKV model this adapter folds into "
                         f"(e.g. {', '.join(examples)})")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from rwkv_peft.model.checkpoint import map_safetensors, read_state_dict

    if (folder / WEIGHTS).is_file():
        return map_safetensors(folder / WEIGHTS)
    if (folder / "adapter_model.bin").is_file():  # safe_serialization=False: a torch zip, read weights_only
        return read_state_dict(folder / "adapter_model.bin")
    raise FileNotFoundError(f"{folder}: no {WEIGHTS} (nor adapter_model.bin) in the adapter folder")


def read_peft_folder(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors under our keys, adapter_config.json's fields) of a peft adapter folder; one ValueError
    naming the file and the field or key otherwise."""
    folder = Path(path)
    raw = _read_config(folder)
    where = str(folder / CONFIG)
    cfg = _our_config(raw, where)
    suffixes = peft_suffixes()[raw["peft_type"]]
    tensors = _weights(folder)
    if not tensors:
        raise ValueError(f"{folder}: the adapter holds no tensors")
    split = {}  # peft key -> (module path, peft suffix)
    for key in tensors:
        name = key.removeprefix(PREFIX)
        suffix = next((s for s in suffixes if name.endswith(f".{s}")), "")
        split[key] = name[: -len(suffix) - 1] if suffix else name, suffix
    _check_targets(raw.get("target_modules"), [m for m, _ in split.values()], where)
    out, layouts = {}, set()
    for key, (module, suffix) in split.items():
        found = our_module(module) if suffix else None
        if found is None:
            example = next(iter(suffixes))
            raise ValueError(f"{folder}: key {key} is not a {raw['peft_type']} tensor of an RWKV linear (expected "
                             f"e.g. {PREFIX}blocks.0.att.receptance.{example} or model.layers.0.attn.r_proj.{example})")
        out[f"{found[0]}.{suffixes[suffix]}"] = tensors[key]
        layouts.add(found[1])
    if len(layouts) > 1:
        raise ValueError(f"{folder}: keys mix module names of several layouts ({', '.join(sorted(layouts))})")
    parts = sorted({k.split(".")[2] for k in out})
    return out, cfg | {"parts": parts, "train_parts": [], "_source": where}


def adapter_file(path: str | os.PathLike) -> Path:
    """The file holding an adapter's tensors: ``path`` itself, or a peft folder's weights."""
    path = Path(path)
    return path / WEIGHTS if path.is_dir() else path


def check_loadable(path: str | os.PathLike, method: str, settings: dict, flag: str) -> None:
    """A peft folder given as ``load`` holds the adapter the flags set up (method, mode, r, alpha): shapes
    alone do not tell bat_row from bat_col on a square weight, nor one LoRA scale from another."""
    where = str(Path(path) / CONFIG)
    have = _our_config(_read_config(Path(path)), where)
    want = {"method": method} | settings
    diff = [f"{k} {have[k]!r} ({flag} says {want[k]!r})" for k in have
            if k in want and have[k] is not None and not _same(have[k], want[k])]
    if diff:
        raise ValueError(f"{flag} load {path}: the folder's adapter differs from the one configured: {', '.join(diff)}")


def _same(a: object, b: object) -> bool:
    """Equal, numbers to rounding (an rsLoRA alpha converted to ours is a product with sqrt(r))."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b
