"""State tuning (a trainable initial WKV state per layer and head, the base frozen) and full fine-tuning.

The model's time-mix uses ``att.time_state`` (H, N, N), indexed [value, key], as the initial
WKV state whenever it exists and no state is passed in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from rwkv_peft.peft.config import as_tuple, check_train_parts, json_fields


@dataclass
class StateConfig:
    """State tuning (and full fine-tuning) settings: extra train parts and an adapter to start from."""

    train_parts: tuple[str, ...] = ()
    load: str = ""

    def __post_init__(self) -> None:
        self.train_parts = as_tuple(self.train_parts)
        check_train_parts(self.train_parts, "--peft_config")

    @classmethod
    def from_json(cls, text: str) -> StateConfig:
        return cls(**json_fields(cls, text, "--peft_config"))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class FullConfig(StateConfig):
    """Full fine-tuning: every parameter trains; ``load`` starts from a saved (partial) state dict."""


def train_everything(model: nn.Module, cfg: FullConfig) -> None:
    """Full fine-tuning's adapter: none; every parameter of the model trains."""
    model.requires_grad_(True)


def add_time_state(model: nn.Module, cfg: StateConfig | None = None) -> int:
    """Give every block's time-mix a zero (fp32) ``time_state`` parameter; returns how many were added."""
    for i, block in enumerate(model.blocks):
        att = block.att
        if hasattr(att, "time_state"):
            raise ValueError(f"state tuning: blocks.{i}.att already has a time_state")
        device = next(att.parameters()).device
        att.time_state = nn.Parameter(torch.zeros(att.n_head, att.head_size, att.head_size, device=device))
    return len(model.blocks)
