"""An adapter as a Hugging Face peft folder that ``peft`` loads unchanged:

    python -m rwkv_peft.export adapter --adapter OUT/rwkv-N.pth --format peft [--names blinkdl|hf] --output DIR

DIR gets adapter_config.json (the peft_type and fields the method record's ``peft`` form writes) and
adapter_model.safetensors with ``base_model.model.<module>.<peft suffix>`` keys: modules named as in
this project's and RWKV-PEFT's model (``--names blinkdl``) or in the version's Hugging Face layout
(``--names hf``: RWKV-7's ``model.layers.N.attn.r_proj``). Tensors go from the adapter file to the
folder as bytes (dtype kept, nothing decoded); the key and config tables are rwkv_peft.peft.folder's,
which reads such folders back.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from rwkv_peft import files
from rwkv_peft.cli import ArgumentParser, fail
from rwkv_peft.merge.plan import read_adapter
from rwkv_peft.model.stream import tensor_layout, write_safetensors
from rwkv_peft.peft.folder import CONFIG, NAMES, PREFIX, WEIGHTS, module_name
from rwkv_peft.peft.registry import METHODS, adapter_keys, key_aliases, merge_flags, method_for_keys


def check_exportable(method: str, mode: str | None, train_parts: list[str], where: str) -> None:
    """What a peft folder can hold: adapters on linears of a method with a peft form (its record's ``peft``)
    in a mode that form has, nothing else."""
    form = METHODS[method].peft if method in METHODS else None
    if form is None:
        have = [m.name for m in METHODS.values() if m.peft]
        raise ValueError(f"{where}: a {method} adapter has no peft adapter folder form ({', '.join(have)} have); "
                         "merge it instead")
    if form.refuse(mode):
        raise ValueError(f"{where}: {form.refuse(mode)}")
    if train_parts:
        raise ValueError(f"{where}: {train_parts[0]} (train_parts) replaces a base tensor; a peft adapter folder holds "
                         "only adapters on linears: merge it instead")


def peft_folder(tensors: dict[str, torch.Tensor], cfg: dict, names: str, where: str) -> tuple[dict, dict[str, str]]:
    """(adapter_config.json's content, our key -> peft key) for an adapter's tensors and config."""
    aliases, suffixes = key_aliases(), adapter_keys()
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        linear, _, suffix = k.rpartition(".")
        groups.setdefault(linear, {})[suffix] = t
    plain = [k for k in tensors if k.rpartition(".")[2] not in suffixes]
    methods = {getattr(method_for_keys(set(t)), "name", None) for t in groups.values()} - {None}
    if len(methods) != 1:
        raise ValueError(f"{where}: expected the adapter tensors of one method, found {sorted(methods) or 'none'}")
    method = methods.pop()
    check_exportable(method, None, plain, where)
    version = (cfg.get("base") or {}).get("version", "x070")  # a foreign adapter without one: RWKV-7's names
    form = METHODS[method].peft
    peft_type, their_suffixes = next(iter(form.suffixes.items()))
    body = {"peft_type": peft_type} | form.write(groups, cfg, where)
    theirs = {ours: peft for peft, ours in their_suffixes.items()}
    keys, targets = {}, set()
    for linear, group in groups.items():
        try:
            module = module_name(linear, names, version)
        except ValueError as e:
            raise ValueError(f"{where}: --names {names}: {e}") from None
        targets.add(re.split(r"\.\d+\.", module, maxsplit=1)[1])  # the name below the layer, as peft users write
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
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output}: expected a folder, found a file")
    files.check_not_input({output: f"--output {output}"}, {adapter: f"--adapter {adapter}"})
    files.check_writable_dir(output.parent, f"--output {output}")
    tensors, cfg = read_adapter(adapter, config)
    body, keys = peft_folder(tensors, cfg, names, str(adapter))
    spans = tensor_layout(adapter)[1] if adapter.is_file() else {}  # copied as bytes; a folder's from its mapping
    specs = [(keys[k], t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    output.parent.mkdir(parents=True, exist_ok=True)
    files.note_removed(files.remove_stale_temps(output.parent, output.name))
    with files.atomic_dir(output) as tmp:  # the whole folder or none of it, an older one replaced
        with open(tmp / WEIGHTS, "wb") as f:
            write_safetensors(f, specs, (spans.get(k, t) for k, t in tensors.items()))
        (tmp / CONFIG).write_text(json.dumps(body, indent=2) + "\n")
    return output


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m rwkv_peft.export adapter",
                       description="Write an adapter as a Hugging Face peft adapter folder")
    p.add_argument("--adapter", required=True, help="adapter checkpoint OUT/rwkv-N.pth (adapter_config.json beside "
                   "it) or a peft folder")
    p.add_argument("--format", default="peft", choices=("peft",), help="peft: adapter_config.json + "
                   "adapter_model.safetensors")
    p.add_argument("--names", default="blinkdl", choices=NAMES, help="module names: blinkdl (blocks.N.att.receptance, "
                   "as RWKV-PEFT) or hf (the version's Hugging Face layout: model.layers.N.attn.r_proj for RWKV-7)")
    p.add_argument("--output", required=True, help="the folder to write")
    for f in merge_flags():  # for adapters without adapter_config.json (RWKV-PEFT's)
        p.add_argument(f.flag, dest=f.key, **f.kwargs)
    a = p.parse_args(argv)
    try:
        out = export_adapter(a.adapter, a.output, a.names, {f.key: getattr(a, f.key) for f in merge_flags()})
    except (ValueError, OSError) as e:
        fail(e)
    print(f"wrote {out}")
    return 0
