"""Training objectives behind one interface: a batch in, a loss and named metrics out.

The recipe (``rwkv_peft/train``) knows only this module: ``--objective NAME`` picks a registered
``ObjectiveRecord``, whose ``build(ctx)`` returns an ``Objective``; each micro-batch goes to its
``loss(batch)``, and held-out batches to its ``evaluate(batches)``. What an objective needs from the
run comes through the ``Context``: the forward callable (DeepSpeed's engine), the un-wrapped model (for
``forward_hidden``, ``head`` or ``rwkv_peft.decoder.Decoder`` rollouts), the config and the objective's
own flags, the device and this process's place, and ``reference()``: the base model's output with
the adapter switched off (``rwkv_peft.peft.adapter_disabled``), the free reference of DPO and GRPO.

Adding an objective is one module that calls ``register_objective`` (its flags declared in the
record, so the trainer's parser grows without an edit) and one import line below.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rwkv_peft.peft import adapter_disabled
from rwkv_peft.records import Records

Metrics = dict[str, float | torch.Tensor]  # named numbers: train_log.jsonl, the progress line, TensorBoard


@dataclass
class Context:
    """What an objective may use of the run."""

    forward: Callable[..., Any]  # the model as the optimizer sees it (DeepSpeed's engine: ZeRO-3 gathers)
    model: nn.Module  # the same model un-wrapped: forward_hidden / head / forward_state, decoding
    cfg: Any  # the TrainConfig
    options: Mapping[str, Any]  # the objective's own flags (``ObjectiveRecord.flags``), parsed
    device: str = "cpu"
    rank: int = 0
    world: int = 1

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The model with its adapter switched off (the frozen base; an error for full fine-tuning)."""
        with adapter_disabled(self.model):
            yield self.model


class Objective:
    """One training objective. Subclasses define ``loss``; ``evaluate`` defaults to the mean loss and
    metrics over held-out batches."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def loss(self, batch: dict) -> tuple[torch.Tensor, Metrics]:
        """(scalar loss to backpropagate, metrics) of one micro-batch."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, batches: Sequence[dict]) -> dict[str, float]:
        """Held-out metrics (``loss`` and any others), logged as ``eval_<name>``; the model is in eval mode."""
        sums: dict[str, float] = {}
        for batch in batches:
            loss, metrics = self.loss(batch)
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {k: v / len(batches) for k, v in sums.items()}


@dataclass(frozen=True)
class ObjectiveRecord:
    """One ``--objective``: its name, the data types it trains on, its own flags and its builder."""

    name: str
    build: Callable[[Context], Objective]  # usually the Objective subclass
    data_types: tuple[str, ...] = ()  # the --data_type values it accepts (empty: every token data type)
    help: str = ""
    flags: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # "--beta" -> argparse keywords
    check: Callable[[Any], None] | None = None  # cheap checks of the TrainConfig before heavy work


OBJECTIVES: Records[ObjectiveRecord] = Records("--objective")


def register_objective(record: ObjectiveRecord) -> ObjectiveRecord:
    """Add an objective. Two objectives may declare the same flag (e.g. ``--beta``) only with the same
    argparse keywords."""
    for flag, kw in record.flags.items():
        clash = next((o.name for o in OBJECTIVES.values() if o.name != record.name and o.flags.get(flag, kw) != kw),
                     None)
        if clash:
            raise ValueError(f"--objective {record.name}: {flag} is declared differently by --objective {clash}")
    return OBJECTIVES.register(record)


def get_objective(name: str) -> ObjectiveRecord:
    """The record for ``--objective name``; a ValueError naming the flag and the choices otherwise."""
    return OBJECTIVES[name]


def add_objective_flags(parser: argparse.ArgumentParser) -> None:
    """Every registered objective's flags, each once; unset ones stay out of the parsed namespace."""
    seen: set[str] = set()
    for record in OBJECTIVES.values():
        for flag, kw in record.flags.items():
            if flag not in seen:
                seen.add(flag)
                owners = "|".join(o.name for o in OBJECTIVES.values() if flag in o.flags)
                parser.add_argument(flag, **{**kw, "default": argparse.SUPPRESS,
                                             "help": f"(--objective {owners}) {kw.get('help', '')}"})


def objective_options(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The options of ``--objective name``: its flags' defaults updated by ``given`` (dest -> value); a flag
    given that belongs only to other objectives is an error."""
    record = get_objective(name)
    dests = {flag.lstrip("-").replace("-", "_"): kw for flag, kw in record.flags.items()}
    foreign = [k for k in given if k not in dests]
    if foreign:
        raise ValueError(f"--{foreign[0]}: not a flag of --objective {name}")
    return {k: given.get(k, kw.get("default")) for k, kw in dests.items()}


from rwkv_peft.train.objectives import grpo, lm, preference  # noqa: E402,F401  (registers the built-in objectives)
