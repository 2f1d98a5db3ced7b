"""What a merge changes: the adapter checked against the base (metadata only), one ``Edit`` per base tensor.

Adapter keys: each method's suffixes (``<linear>.miss``, RWKV-PEFT's ``.disha`` / ``.bone``,
``.lora_A`` / ``.lora_B`` ...), grouped per linear and handed to the method that owns them (its
record in rwkv_peft.peft.registry checks them and folds them), and plain base keys (train_parts),
which replace the base tensor. The formulas live in rwkv_peft.peft.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from rwkv_peft import files
from rwkv_peft.model import config_from_state_dict, detect_version, read_state_dict
from rwkv_peft.peft.config import Fold
from rwkv_peft.peft.registry import METHODS, adapter_keys, base_replacing, method_for_keys

ARCH_FIELDS = ("n_layer", "n_embd", "vocab_size", "head_size", "dim_ffn")


@dataclass
class Edit:
    """What happens to one base tensor: an adapter folded in (``fold``) or a replacement (train_parts)."""

    key: str  # the base key it changes
    source: str  # adapter key(s), for messages
    fold: Fold | None = None
    replacement: torch.Tensor | None = None

    def apply(self, weight: torch.Tensor, unmerge: bool, owned: bool = False) -> torch.Tensor:
        """The new tensor in fp32 from the base (or merged) ``weight``; ``owned``: ``weight`` is an fp32
        tensor the caller gives up, folded in place (no second copy)."""
        if self.fold is None:
            return self.replacement.float()
        w = weight if owned and weight.dtype == torch.float32 else weight.to(torch.float32, copy=True)
        return (self.fold.unmerge if unmerge else self.fold.merge)(w)


def adapter_config_path(adapter_path: str | os.PathLike) -> Path:
    """adapter_config.json beside the adapter checkpoint."""
    return Path(adapter_path).with_name("adapter_config.json")


def read_adapter_config(adapter_path: str | os.PathLike) -> dict:
    """The adapter_config.json beside ``adapter_path``, or {} when there is none (foreign adapters)."""
    path = adapter_config_path(adapter_path)
    if not path.is_file():
        return {}
    return files.read_json_object(path)


def resolve_config(adapter_path: str | os.PathLike, config: dict | None) -> dict:
    """adapter_config.json beside the adapter, with ``config`` overriding it key by key."""
    cfg = read_adapter_config(adapter_path)
    if cfg:
        cfg["_source"] = str(adapter_config_path(adapter_path))
    for k, v in (config or {}).items():
        if v is not None:
            cfg[k] = v
    return cfg


def read_adapter(adapter_path: str | os.PathLike, config: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """An adapter's tensors and its config (``resolve_config``): a checkpoint file with adapter_config.json
    beside it, or a Hugging Face peft folder (keys and config translated: rwkv_peft.peft.folder)."""
    if not Path(adapter_path).is_dir():
        return read_state_dict(adapter_path), resolve_config(adapter_path, config)
    from rwkv_peft.peft.folder import read_peft_folder

    tensors, cfg = read_peft_folder(adapter_path)
    return tensors, cfg | {k: v for k, v in (config or {}).items() if v is not None}


def _split(key: str) -> tuple[str, str]:
    prefix, _, suffix = key.rpartition(".")
    return prefix, suffix


def model_class(version: str) -> type[torch.nn.Module]:
    """The rwkv_peft.model class that declares ``version`` (its ``peft_targets`` say what is adaptable)."""
    import rwkv_peft.model as models

    for c in vars(models).values():
        if isinstance(c, type) and issubclass(c, torch.nn.Module) and getattr(c, "version", None) == version:
            return c
    raise ValueError(f"RWKV {version}: no model class in rwkv_peft.model declares this version")


def target_weights(keys: Iterable[str], model_cls: type) -> set[str]:
    """Paths of the Linear layers (``<path>.weight`` keys) that the model class declares adaptable."""
    out = set()
    for k in keys:
        path, _, leaf = k.rpartition(".")
        parent, _, name = path.rpartition(".")
        if leaf == "weight" and name in model_cls.peft_targets.get(parent.rpartition(".")[2], ()):
            out.add(path)
    return out


def _check_arch(base: Mapping[str, torch.Tensor], cfg: dict, base_name: str, cfg_name: str) -> type:
    """The base's model class; ValueError if adapter_config's "base" describes another architecture."""
    version = detect_version(base, base_name)
    model_cfg = config_from_state_dict(base, base_name)
    have = {"version": version} | {f: getattr(model_cfg, f) for f in ARCH_FIELDS}
    want = cfg.get("base") or {}
    diff = [f"{k} {want[k]} (base has {have[k]})" for k in have if k in want and want[k] != have[k]]
    if diff:
        raise ValueError(
            f"{cfg_name}: adapter was trained for another architecture than {base_name}: " + ", ".join(diff)
        )
    return model_class(version)


def _check_adapter(adapter: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], config: dict,
                   adapter_name: str) -> None:
    """Refuse what is not an adapter that folds: a method without a merge, an empty file, a whole model."""
    for m in METHODS.values():
        if m.no_fold and (config.get("method") == m.name or any(_split(k)[1] in m.keys for k in adapter)):
            raise ValueError(f"{adapter_name}: {m.no_fold}")
    if not adapter:
        raise ValueError(f"{adapter_name}: the adapter holds no tensors")
    whole = base_replacing().name  # its adapter is plain base tensors
    if config.get("method") != whole and not any(_split(k)[1] in adapter_keys() for k in adapter):
        if set(base) <= set(adapter) or not config.get("method"):  # a whole model, or nothing says otherwise
            raise ValueError(
                f"{adapter_name}: holds no adapter tensors (.miss, .lora_A, ...) but {len(adapter)} plain model "
                "tensors: is it a base model? Pass the adapter the trainer wrote (e.g. OUT/rwkv-final.pth); a "
                f'--peft {whole} checkpoint needs its adapter_config.json ("method": "{whole}") beside it'
            )


def _replacement(k: str, t: torch.Tensor, base: Mapping[str, torch.Tensor], names: tuple[str, str, str],
                 unmerge: bool) -> Edit:
    """A plain base key in the adapter (train_parts): the tensor that replaces the base's."""
    base_name, adapter_name, _ = names
    if k not in base:
        raise ValueError(f"{adapter_name}: adapter key {k} has no base tensor in {base_name}")
    if unmerge:
        raise ValueError(
            f"{adapter_name}: {k} replaced the base tensor (train_parts); the original is not in the "
            "adapter, so the base cannot be recovered"
        )
    if tuple(t.shape) != tuple(base[k].shape):
        raise ValueError(f"{adapter_name}: {k} has shape {tuple(t.shape)}, base {base_name} has {tuple(base[k].shape)}")
    return Edit(k, k, replacement=t)


def _fold_edit(linear: str, tensors: dict[str, torch.Tensor], base: Mapping[str, torch.Tensor], config: dict,
               model_cls: type, names: tuple[str, str, str], unmerge: bool) -> Edit:
    """One linear's adapter tensors, checked and handed to the method that owns their suffixes."""
    base_name, adapter_name, cfg_name = names
    keys = ", ".join(f"{linear}.{s}" for s in tensors)
    wkey = f"{linear}.weight"
    if wkey not in base:
        raise ValueError(f"{adapter_name}: adapter key {keys} has no base tensor {wkey} in {base_name}")
    if linear not in target_weights([wkey], model_cls):
        raise ValueError(
            f"{adapter_name}: adapter key {keys}: {linear} is not a PEFT target of RWKV {model_cls.version} "
            f"(targets: {model_cls.peft_targets})"
        )
    method = method_for_keys(set(tensors))
    if method is None:
        raise ValueError(f"{adapter_name}: {keys} mix adapter tensors of different methods on one linear")
    fold = method.fold(base[wkey], tensors, config, f"{adapter_name}: {linear}", cfg_name)
    if unmerge and fold.unmerge is None:
        raise ValueError(f"{adapter_name}: {linear}: {fold.no_unmerge}")
    return Edit(wkey, keys, fold=fold)


def plan_edits(
    base: Mapping[str, torch.Tensor],
    adapter: Mapping[str, torch.Tensor],
    config: dict | None = None,
    base_name: str = "base",
    adapter_name: str = "adapter",
    unmerge: bool = False,
) -> dict[str, Edit]:
    """Check the adapter against the base (metadata only) and say what changes in each base tensor.

    ``config`` is adapter_config.json's content plus overrides: "mode" for ``.miss`` keys (and to
    force a mode for ``.disha``), "alpha" for LoRA/PiSSA, "base" for the architecture check.
    """
    config = dict(config or {})
    cfg_name = config.pop("_source", "adapter_config.json")
    _check_adapter(adapter, base, config, adapter_name)
    model_cls = _check_arch(base, config, base_name, cfg_name)
    names, suffixes = (base_name, adapter_name, cfg_name), adapter_keys()
    edits: dict[str, Edit] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}  # linear path -> {key suffix: tensor}
    for k, t in adapter.items():
        linear, suffix = _split(k)
        if suffix in suffixes:
            groups.setdefault(linear, {})[suffix] = t
        else:
            edits[k] = _replacement(k, t, base, names, unmerge)
    for linear, tensors in groups.items():
        edit = _fold_edit(linear, tensors, base, config, model_cls, names, unmerge)
        if edit.key in edits:
            raise ValueError(f"{adapter_name}: {edit.key} is changed by both {edits[edit.key].source} and "
                             f"{edit.source}")
        edits[edit.key] = edit
    return edits


class MergedView(Mapping):
    """``base`` with ``edits`` applied as each tensor is read, in the base's dtype (what a merged file holds):
    a merge streamed into another writer (HF folders, GGUF)."""

    def __init__(self, base: Mapping[str, torch.Tensor], edits: Mapping[str, Edit], unmerge: bool = False):
        from rwkv_peft.model.checkpoint import tensor_specs

        self.base, self.edits, self.unmerge = base, edits, unmerge
        self._specs = tensor_specs(base)
        self._dtype = {k: d for k, d, _ in self._specs}

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self.base[key]
        if key not in self.edits:
            return t
        return self.edits[key].apply(t, self.unmerge).to(self._dtype[key]).reshape(t.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def specs(self) -> list:
        return list(self._specs)


def merge_state_dict(
    base: Mapping[str, torch.Tensor], adapter: Mapping[str, torch.Tensor], config: dict | None = None,
    unmerge: bool = False,
) -> dict[str, torch.Tensor]:
    """In-memory merge (same checks and math as the file version) for models already loaded."""
    edits = plan_edits(base, adapter, config, unmerge=unmerge)
    return {k: edits[k].apply(v, unmerge).to(v.dtype) if k in edits else v for k, v in base.items()}
