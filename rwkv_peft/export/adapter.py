"""An adapter as a Hugging Face peft folder that ``peft`` loads unchanged:

    python -m rwkv_peft.export adapter --adapter OUT/rwkv-N.pth --format peft [--names blinkdl|hf] --output DIR

DIR gets adapter_config.json (MISS for MiSS balance / mini / bat_row, LORA for LoRA and DoRA) and
adapter_model.safetensors with ``base_model.model.<module>.<peft suffix>`` keys: modules named as in
this project's and RWKV-PEFT's model (``--names blinkdl``) or in the Hugging Face RWKV-7 layout
(``--names hf``). Tensors go from the adapter file to the folder as bytes (dtype kept, nothing
decoded); the key and config tables are rwkv_peft.peft.folder's, which reads such folders back.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from rwkv_peft import files
from rwkv_peft.merge.plan import read_adapter
from rwkv_peft.model.stream import tensor_layout, write_safetensors
from rwkv_peft.peft.folder import CONFIG, HF_LINEARS, LAYOUTS, MISS_INIT, PREFIX, SUFFIXES, WEIGHTS
from rwkv_peft.peft.lora import PISSA_BUFFERS
from rwkv_peft.peft.miss import miss_mode
from rwkv_peft.peft.registry import adapter_keys, key_aliases, merge_flags, method_for_keys

NAMES = tuple(LAYOUTS)
EXPORTABLE = ("miss", "lora", "dora")  # methods whose adapters peft has (PiSSA's is relative to its residual base)


def check_exportable(method: str, mode: str | None, train_parts: list[str], where: str) -> None:
    """What a peft folder can hold: MiSS (not bat_col), LoRA and DoRA adapters on linears, nothing else."""
    if method not in EXPORTABLE:
        raise ValueError(f"{where}: a {method} adapter has no peft adapter folder form (MiSS, LoRA and DoRA have); "
                         "merge it instead")
    if mode == "bat_col":
        raise ValueError(f"{where}: MiSS mode bat_col (RWKV-PEFT's \"bat\") has no peft equivalent: peft's "
                         "init_weights \"bat\" is bat_row")
    if train_parts:
        raise ValueError(f"{where}: {train_parts[0]} (train_parts) replaces a base tensor; a peft adapter folder holds "
                         "only adapters on linears: merge it instead")


def _miss_config(groups: dict[str, dict[str, torch.Tensor]], cfg: dict, where: str) -> dict:
    """peft's MissConfig fields for MiSS tensors of one mode and one r (peft has one of each per adapter)."""
    found = set()
    for linear, tensors in groups.items():
        ((suffix, t),) = tensors.items()
        mode = miss_mode(cfg, suffix, t, f"{where}: {linear}", cfg.get("_source", "adapter_config.json"))
        found.add((mode, t.shape[-1] if mode.startswith("bat") else t.shape[0], t.shape[1] if mode == "mini" else 1))
    if len(found) > 1:
        raise ValueError(f"{where}: a peft MissConfig has one mode and one r, the adapter has {sorted(found)}")
    ((mode, r, mini_r),) = found
    check_exportable("miss", mode, [], where)
    init = next(k for k, v in MISS_INIT.items() if v == mode)
    return {"peft_type": "MISS", "r": r, "mini_r": mini_r, "init_weights": init, "miss_dropout": 0.0}


def _lora_config(groups: dict[str, dict[str, torch.Tensor]], cfg: dict, dora: bool, where: str) -> dict:
    """peft's LoraConfig fields (scale lora_alpha / r, as ours) for LoRA or DoRA tensors of one r."""
    ranks = {t["lora_A"].shape[0] for t in groups.values() if "lora_A" in t}
    if len(ranks) != 1:
        raise ValueError(f"{where}: a peft LoraConfig has one r, the adapter has {sorted(ranks)}")
    if cfg.get("alpha") is None:
        raise ValueError(f"{where}: LoRA needs alpha: no adapter_config.json with \"alpha\" and no --lora_alpha flag")
    alpha = float(cfg["alpha"])
    return {"peft_type": "LORA", "r": ranks.pop(), "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
            "use_dora": dora, "use_rslora": False, "lora_dropout": 0.0, "init_lora_weights": True,
            "fan_in_fan_out": False}


def _module(linear: str, names: str, where: str) -> str:
    """A linear's module path in the ``names`` layout."""
    if names == "blinkdl":
        return linear
    _, i, name = linear.split(".", 2)
    if name not in HF_LINEARS:
        raise ValueError(f"{where}: {linear} has no name in the Hugging Face RWKV-7 layout ({', '.join(HF_LINEARS)})")
    return LAYOUTS["hf"].format(i) + HF_LINEARS[name]


def peft_folder(tensors: dict[str, torch.Tensor], cfg: dict, names: str, where: str) -> tuple[dict, dict[str, str]]:
    """(adapter_config.json's content, our key -> peft key) for an adapter's tensors and config."""
    aliases, suffixes = key_aliases(), adapter_keys()
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        linear, _, suffix = k.rpartition(".")
        groups.setdefault(linear, {})[suffix] = t
    plain = [k for k in tensors if k.rpartition(".")[2] not in suffixes]
    methods = {"pissa" if set(PISSA_BUFFERS) & set(t) else getattr(method_for_keys(set(t)), "name", None)
               for t in groups.values()} - {None}
    if len(methods) != 1:
        raise ValueError(f"{where}: expected the adapter tensors of one method, found {sorted(methods) or 'none'}")
    method = methods.pop()
    check_exportable(method, None, plain, where)
    if names == "hf" and (cfg.get("base") or {}).get("version", "x070") != "x070":
        raise ValueError(f"{where}: --names hf: the Hugging Face layout here is RWKV-7's (x070), the adapter's base is "
                         f"{cfg['base']['version']}")
    body = _miss_config(groups, cfg, where) if method == "miss" else _lora_config(groups, cfg, method == "dora", where)
    theirs = {ours: peft for peft, ours in SUFFIXES[body["peft_type"]].items()}
    keys, targets = {}, set()
    for linear, group in groups.items():
        module = _module(linear, names, where)
        targets.add(module.split(".", 3)[-1] if names == "hf" else module.split(".", 2)[-1])
        for suffix in group:
            keys[f"{linear}.{suffix}"] = f"{PREFIX}{module}.{theirs[aliases.get(suffix, suffix)]}"
    config = body | {"target_modules": sorted(targets), "bias": "none", "modules_to_save": None, "task_type": None,
                     "inference_mode": True, "base_model_name_or_path": None, "revision": None}
    return config, keys


def export_adapter(adapter: str | os.PathLike, output: str | os.PathLike, names: str = "blinkdl",
                   config: dict | None = None) -> Path:
    """Write the adapter at ``adapter`` (a checkpoint with adapter_config.json beside it, or a peft folder)
    as a peft folder ``output``; ``config`` overrides adapter_config.json (mode, alpha) as in the merge."""
    adapter, output = Path(adapter), Path(output)
    if names not in NAMES:
        raise ValueError(f"--names: expected one of {'|'.join(NAMES)}, got {names!r}")
    if not adapter.exists():
        raise FileNotFoundError(f"{adapter}: --adapter file (or peft adapter folder) not found")
    if output.exists() and (not output.is_dir() or adapter.is_dir() and os.path.samefile(adapter, output)):
        raise ValueError(f"--output {output}: expected a new or existing folder other than the adapter's")
    files.check_writable_dir(output, f"--output {output}")
    tensors, cfg = read_adapter(adapter, config)
    body, keys = peft_folder(tensors, cfg, names, str(adapter))
    spans = tensor_layout(adapter)[1] if adapter.is_file() else {}  # copied as bytes; a folder's from its mapping
    specs = [(keys[k], t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    output.mkdir(parents=True, exist_ok=True)
    files.note_removed(files.remove_stale_temps(output))
    with files.atomic_path(output / WEIGHTS) as tmp, open(tmp, "wb") as f:
        write_safetensors(f, specs, (spans.get(k, t) for k, t in tensors.items()))
    files.write_text(output / CONFIG, json.dumps(body, indent=2) + "\n")
    return output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rwkv_peft.export adapter",
                                description="Write an adapter as a Hugging Face peft adapter folder")
    p.add_argument("--adapter", required=True, help="adapter checkpoint OUT/rwkv-N.pth (adapter_config.json beside "
                   "it) or a peft folder")
    p.add_argument("--format", default="peft", choices=("peft",), help="peft: adapter_config.json + "
                   "adapter_model.safetensors")
    p.add_argument("--names", default="blinkdl", choices=NAMES, help="module names: blinkdl (blocks.N.att.receptance, "
                   "as RWKV-PEFT) or hf (model.layers.N.attn.r_proj, the Hugging Face RWKV-7 layout)")
    p.add_argument("--output", required=True, help="the folder to write")
    for f in merge_flags():  # for adapters without adapter_config.json (RWKV-PEFT's)
        p.add_argument(f.flag, dest=f.key, **f.kwargs)
    a = p.parse_args(argv)
    try:
        out = export_adapter(a.adapter, a.output, a.names, {f.key: getattr(a, f.key) for f in merge_flags()})
    except (ValueError, OSError) as e:
        sys.exit(f"error: {files.describe(e)}")
    print(f"wrote {out}")
    return 0
