"""Every PEFT method as one record: the trainer, inject, the merge and the benchmark look methods up here.

Like peft's ``register_peft_method`` (name -> config class, tuner class, key prefix), but a record
here also says how the method's adapter folds into a weight and what the merge CLI needs, so
adding a method is one record plus one module with its math (config, layer, merge, unmerge side
by side, as ``miss.py`` and ``lora.py``); nothing else in the package names a method.

A linear-adapting method gives ``layer`` (and optionally ``check``, run on every target before
any module is replaced); a whole-model method gives ``attach``. ``keys`` are the adapter key
suffixes it owns (``blocks.3.ffn.key.<suffix>``), RWKV-PEFT's names included; ``fold`` checks
one linear's tensors against its weight and says how they merge and unmerge (``config.Fold``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from rwkv_peft.peft.config import Fold, PeftForm, switch_layers
from rwkv_peft.peft.dora import DoraConfig, DoraLinear, dora_fold
from rwkv_peft.peft.full import FullConfig, train_everything
from rwkv_peft.peft.lora import PEFT_SUFFIXES as LORA_PEFT
from rwkv_peft.peft.lora import (
    PISSA_BUFFERS,
    LoraConfig,
    LoraLinear,
    lora_fold,
    lora_from_peft,
    lora_to_peft,
)
from rwkv_peft.peft.miss import (
    MODE_ALIASES,
    MODES,
    PEFT_SUFFIXES,
    MissConfig,
    MissLinear,
    miss_check,
    miss_fold,
    miss_from_peft,
    miss_peft_refusal,
    miss_quant,
    miss_shape,
    miss_to_peft,
)
from rwkv_peft.peft.state import StateConfig, add_time_state, merge_state, switch_state

Shapes = list[tuple[int, int]]  # (out, in) of every adapted linear


@dataclass(frozen=True)
class MergeFlag:
    """A flag of the merge CLI that overrides adapter_config.json's ``key`` (argparse keyword arguments)."""

    flag: str
    key: str
    kwargs: Mapping[str, Any]


@dataclass(frozen=True)
class Method:
    """One ``--peft`` method: how to configure, attach, save, fold and benchmark it."""

    name: str
    flag: str  # the trainer flag holding its JSON config
    parse: Callable[[str], Any]  # that JSON ('' = defaults) -> the config
    layer: Callable[[nn.Linear, Any, str], nn.Module] | None = None  # adapts one target linear
    check: Callable[[int, int, Any, str], None] | None = None  # (out, in, cfg, name): before any change
    attach: Callable[[nn.Module, Any], Any] | None = None  # whole-model methods (state, full)
    describe: Callable[[Any], dict] = lambda cfg: {}  # its fields of adapter_config.json
    keys: tuple[str, ...] = ()  # adapter key suffixes it owns
    required: tuple[str, ...] = ()  # suffixes that tell it apart from a method sharing its other keys
    key_aliases: Mapping[str, str] = field(default_factory=dict)  # foreign suffix -> ours
    buffers: tuple[str, ...] = ()  # buffers saved with the adapter (all or none per layer)
    fold: Callable[..., Fold] | None = None  # (weight, {suffix: tensor}, config, where, cfg_name) -> Fold
    no_fold: str = ""  # why its adapter cannot be merged (said to the user)
    merge_script: str | None = None  # merge/<script>.py folds its adapters
    merge_flags: tuple[MergeFlag, ...] = ()
    params: Callable[[Any, Shapes], int] | None = None  # trainable parameters on these linears
    matched: Callable[[Shapes, int], dict] | None = None  # the JSON config nearest a parameter budget
    switch: Callable[[nn.Module, bool], None] | None = switch_layers  # (model, off): bypass the adapter or not
    no_switch: str = ""  # why it has no switch (said to the user)
    state_file: bool = False  # its adapter (without train_parts) is a start-state file: generate --state
    replaces_base: bool = False  # its adapter is plain base tensors that replace the base's (no adapter keys)
    no_quant: Callable[[nn.Module], str] = lambda layer: ""  # why an adapted layer cannot keep a quantized base
    merge_whole: Callable[[Any, Any, Any], Any] | None = None  # (base, adapter, output): a merge not per linear
    peft: PeftForm | None = None  # how its adapter is a Hugging Face peft folder (None: it has no such form)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _matched_lora(shapes: Shapes, budget: int, fixed: int = 0) -> dict:
    """The rank whose r * (out + in) (+ ``fixed``) is nearest ``budget``, with alpha = 2 r."""
    r = max(1, round((budget - fixed) / sum(o + i for o, i in shapes)))
    return {"r": r, "alpha": 2 * r}


_ALPHA_FLAG = MergeFlag("--lora_alpha", "alpha", {"type": float, "help": "LoRA/PiSSA/DoRA alpha "
                                                  "(overrides adapter_config.json)"})
_LORA = {
    "flag": "--lora_config", "keys": ("lora_A", "lora_B", *PISSA_BUFFERS), "buffers": PISSA_BUFFERS,
    "fold": lora_fold, "merge_script": "merge_lora", "merge_flags": (_ALPHA_FLAG,),
    "params": lambda cfg, shapes: cfg.r * sum(o + i for o, i in shapes),
    "matched": _matched_lora,
}

_RECORDS = (
    Method(
        "miss", "--miss_config", MissConfig.from_json, layer=MissLinear, check=miss_check,
        describe=lambda cfg: {"mode": cfg.mode, "r": cfg.r, "mini_r": cfg.mini_r},
        keys=("miss", "disha", "bone"), key_aliases={"disha": "miss", "bone": "miss"}, fold=miss_fold,
        merge_script="merge_miss", no_quant=miss_quant,
        merge_flags=(MergeFlag("--mode", "mode", {"choices": [*MODES, *MODE_ALIASES],
                                                  "help": "MiSS mode (overrides adapter_config.json)"}),),
        params=lambda cfg, shapes: sum(_numel(miss_shape(o, i, cfg)) for o, i in shapes),
        peft=PeftForm(PEFT_SUFFIXES, miss_to_peft, miss_from_peft, refuse=miss_peft_refusal),
    ),
    Method(
        "lora", parse=LoraConfig.from_json, layer=lambda lin, cfg, name: LoraLinear(lin, cfg, name, pissa=cfg.pissa),
        describe=lambda cfg: {"method": "pissa" if cfg.pissa else "lora", "r": cfg.r, "alpha": cfg.alpha}, **_LORA,
        peft=PeftForm(LORA_PEFT, lora_to_peft,
                      lambda raw, r, where: lora_from_peft(raw, r, where, "lora", dora=False)),
    ),
    Method(
        "pissa", parse=lambda text: LoraConfig.from_json(text, pissa=True),
        layer=lambda lin, cfg, name: LoraLinear(lin, cfg, name, pissa=True),
        describe=lambda cfg: {"method": "pissa", "r": cfg.r, "alpha": cfg.alpha}, required=PISSA_BUFFERS, **_LORA,
    ),
    Method(
        "dora", "--lora_config", DoraConfig.from_json, layer=DoraLinear,
        describe=lambda cfg: {"r": cfg.r, "alpha": cfg.alpha},
        keys=("lora_A", "lora_B", "lora_magnitude_vector"), required=("lora_magnitude_vector",), fold=dora_fold,
        merge_script="merge_lora", merge_flags=(_ALPHA_FLAG,),
        params=lambda cfg, shapes: sum(cfg.r * (o + i) + o for o, i in shapes),
        matched=lambda shapes, budget: _matched_lora(shapes, budget, sum(o for o, _ in shapes)),
        peft=PeftForm(LORA_PEFT, lambda groups, cfg, where: lora_to_peft(groups, cfg, where, dora=True),
                      lambda raw, r, where: lora_from_peft(raw, r, where, "dora", dora=True)),
    ),
    Method(
        "state", "--peft_config", StateConfig.from_json, attach=add_time_state, keys=("time_state",),
        switch=switch_state, state_file=True, merge_whole=merge_state,
        no_fold="a state-tuning adapter (time_state) has no weights to fold into the base; "
                "load it as the initial state instead",
    ),
    Method("full", "--peft_config", FullConfig.from_json, attach=train_everything, merge_script="merge_miss",
           replaces_base=True,
           switch=None, no_switch="full fine-tuning trains the base weights themselves; there is no adapter to "
                               "switch off (compute reference outputs before training instead)"),
)

METHODS: Mapping[str, Method] = MappingProxyType({m.name: m for m in _RECORDS})


def get_method(name: str) -> Method:
    """The record for ``--peft name``; a ValueError naming the flag and the choices otherwise."""
    if name not in METHODS:
        raise ValueError(f"--peft: expected one of {'|'.join(METHODS)}, got {name!r}")
    return METHODS[name]


def saved_buffers() -> tuple[str, ...]:
    """Buffer names saved with an adapter (PiSSA's initial factors)."""
    return tuple(dict.fromkeys(b for m in _RECORDS for b in m.buffers))


def key_aliases() -> dict[str, str]:
    """Foreign adapter key suffixes (RWKV-PEFT's) -> ours."""
    return {k: v for m in _RECORDS for k, v in m.key_aliases.items()}


def adapter_keys() -> set[str]:
    """Every adapter key suffix some method owns (a model with such a parameter is already adapted)."""
    return {k for m in _RECORDS for k in m.keys}


def method_for_keys(found: set[str]) -> Method | None:
    """The method whose adapter one linear's key suffixes ``found`` are (of those with all they require, the
    one that requires most: PiSSA's buffers tell it from LoRA); the first that could own them (to report
    what is missing) when none has all it requires; None when none could."""
    owners = [m for m in _RECORDS if m.keys and found <= set(m.keys)]
    complete = [m for m in owners if set(m.required) <= found]
    if complete:
        return max(complete, key=lambda m: len(m.required))
    return (owners or [None])[0]


def merge_flags() -> tuple[MergeFlag, ...]:
    """The merge CLI's override flags, each once."""
    return tuple({f.flag: f for m in _RECORDS for f in m.merge_flags}.values())


def base_replacing() -> Method:
    """The method whose adapter is whole base tensors (full fine-tuning)."""
    return next(m for m in _RECORDS if m.replaces_base)


def whole_merge_method(config_method: str | None, keys: set[str]) -> Method | None:
    """The method that merges this adapter as a whole rather than linear by linear (state tuning), named by
    adapter_config.json's ``method`` or recognised by its key suffixes; None for every other adapter."""
    if config_method in METHODS:
        return METHODS[config_method] if METHODS[config_method].merge_whole else None
    suffixes = {k.rpartition(".")[2] for k in keys}
    return next((m for m in _RECORDS if m.merge_whole and suffixes & set(m.keys)), None)


def peft_suffixes() -> dict[str, Mapping[str, str]]:
    """peft_type -> {peft key suffix: ours} of every method with a peft folder form."""
    return {t: sx for m in _RECORDS if m.peft for t, sx in m.peft.suffixes.items()}


def from_peft_config(raw: dict, r: int, where: str) -> dict:
    """adapter_config.json's fields (method, mode, r, mini_r, alpha) from a peft folder's config."""
    for m in _RECORDS:
        if m.peft and raw["peft_type"] in m.peft.suffixes and (ours := m.peft.read(raw, r, where)) is not None:
            return ours
    raise ValueError(f"{where}: peft_type {raw['peft_type']!r} is not supported")
