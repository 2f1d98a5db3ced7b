"""Full fine-tuning: every parameter trains, so its "adapter" is base tensors that replace the base's own.
It has no adapter to switch off and nothing to quantize (the weights train)."""

from __future__ import annotations

from torch import nn

from rwkv_peft.peft.state import StateConfig


class FullConfig(StateConfig):
    """Full fine-tuning: every parameter trains; ``load`` starts from a saved (partial) state dict."""


def train_everything(model: nn.Module, cfg: FullConfig) -> None:
    """Full fine-tuning's adapter: none; every parameter of the model trains."""
    model.requires_grad_(True)
