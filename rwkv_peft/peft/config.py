"""What every method shares: strict parsing of its flag's JSON, the train_parts check, ``Fold`` and ``PeftForm``."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn

TRAIN_PARTS = ("emb", "head", "ln", "time", "deepembed")  # deepembed: RWKV-7a ffn.s_emb, s_emb_x, s0-s2


def json_fields(cls: type, text: str, flag: str, renames: dict[str, str] | None = None) -> dict[str, Any]:
    """The JSON object in ``text`` as keyword arguments of ``cls``; unknown keys are an error naming ``flag``."""
    try:
        raw = json.loads(text) if text and text.strip() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag}: not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{flag}: expected a JSON object, got {text!r}")
    renames = renames or {}
    raw = {renames.get(k, k): v for k, v in raw.items()}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{flag}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    return raw


def check_train_parts(train_parts: tuple[str, ...], flag: str) -> None:
    bad = [p for p in train_parts if p not in TRAIN_PARTS]
    if bad:
        raise ValueError(f"{flag}: train_parts must be among {'|'.join(TRAIN_PARTS)}, got {bad}")


def as_tuple(value: str | list | tuple) -> tuple[str, ...]:
    """JSON lists (or a single name) as a tuple of names."""
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class Fold:
    """One linear's adapter tensors, checked against its weight: how they fold in and out of it.

    ``method`` and ``spec`` (the method's JSON config: r, mode, alpha...) rebuild the adapted layer
    that produced the tensors, so a merged file can be compared with the adapted model.
    ``merge`` / ``unmerge`` map the fp32 weight to the fp32 result and may overwrite their argument
    (the caller hands over its own copy: no second weight-sized buffer per tensor); a method whose
    merge cannot be undone from the merged weight and the adapter has no ``unmerge`` and says why in
    ``no_unmerge``.
    """

    method: str
    spec: dict[str, Any]
    merge: Callable[[Tensor], Tensor]
    unmerge: Callable[[Tensor], Tensor] | None = None
    no_unmerge: str = ""


@dataclass(frozen=True)
class PeftForm:
    """How a method's adapter is written as a Hugging Face peft folder and read back from one.

    ``write`` gets one adapter's tensors grouped per linear (``{linear: {our suffix: tensor}}``) and its
    adapter_config.json fields, and gives peft's config fields; ``read`` gets peft's config (its ``r``
    checked) and gives adapter_config.json's fields, or None when the folder is another method's of the
    same peft_type (LoRA and DoRA share LORA). ``refuse`` says why a mode has no peft form ('' = it has).
    """

    suffixes: Mapping[str, Mapping[str, str]]  # peft_type -> {peft key suffix: ours}; the first type is written
    write: Callable[[dict[str, dict[str, Tensor]], dict, str], dict]
    read: Callable[[dict, int, str], dict | None]
    refuse: Callable[[str | None], str] = lambda mode: ""


class Switchable:
    """An adapter layer whose delta can be bypassed: with ``adapter_off`` set its forward is the base
    linear's exact output (``adapter_disabled``, the free reference model of DPO and GRPO)."""

    adapter_off = False


def switch_layers(model: nn.Module, off: bool) -> None:
    """Bypass (or restore) the delta of every adapter layer of the model."""
    for module in model.modules():
        if isinstance(module, Switchable):
            module.adapter_off = off
