"""RWKV-5.2 "Eagle" (x052): its mixers, config (read from a checkpoint) and init; the rest is in base.py.

Unlike RWKV-6 it has static token-shift mixes (``time_mix_*``) and a decay ``time_decay``
(heads, head_size) that does not depend on the data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rwkv_peft.model import base, rwkv6
from rwkv_peft.model.rwkv6 import RWKV6, RWKV56Config, add_projections, init_linears_, ramps, read_common
from rwkv_peft.ops import wkv5


@dataclass
class RWKV5Config(RWKV56Config):
    """x052's architecture: the fields it shares with x060, nothing more."""


def config_from_state_dict(sd: Mapping[str, torch.Tensor], name: str = "checkpoint") -> RWKV5Config:
    """Architecture of an x052 checkpoint, read from its tensor shapes."""
    return RWKV5Config(**read_common(sd, name))


def shift_mix(x: torch.Tensor, prev: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """RWKV-5's static token shift: ``ratio`` of the current token, the rest from the previous one."""
    return x * ratio + prev * (1 - ratio)


class TimeMix(rwkv6.GatedTimeMix):
    def __init__(self, cfg: RWKV5Config, layer_id: int, op: str = "auto"):
        super().__init__(cfg, layer_id, op)
        C = cfg.n_embd
        for name in ("time_mix_k", "time_mix_v", "time_mix_r", "time_mix_g"):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, C)))
        self.time_decay = nn.Parameter(torch.zeros(cfg.n_head, cfg.head_size))
        self.time_faaaa = nn.Parameter(torch.zeros(cfg.n_head, cfg.head_size))
        add_projections(self, cfg)

    def inputs(self, x: torch.Tensor, prev: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(r, None, k, v, g) from static token-shift mixes: the decay is the same at every token."""
        r = self.receptance(shift_mix(x, prev, self.time_mix_r))
        k = self.key(shift_mix(x, prev, self.time_mix_k))
        v = self.value(shift_mix(x, prev, self.time_mix_v))
        g = F.silu(self.gate(shift_mix(x, prev, self.time_mix_g)))
        return r, None, k, v, g

    def wkv(self, r: torch.Tensor, w: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor,
            state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        r, k, v = self.heads(r, k, v)
        return wkv5(r, self.time_decay, k, v, self.time_faaaa, state=state, op=self.op)


class ChannelMix(rwkv6.ChannelMix):
    """RWKV-6's channel mix with RWKV-5's static shift: ``time_mix_*`` weigh the current token."""

    mixes = ("time_mix_k", "time_mix_r")
    shift = staticmethod(shift_mix)


class RWKV5(base.RWKV):
    version = "x052"
    peft_targets = RWKV6.peft_targets  # the same linears
    time_mix, channel_mix = TimeMix, ChannelMix
    time_params = ("time_mix_k", "time_mix_v", "time_mix_r", "time_mix_g", "time_decay", "time_faaaa")


@torch.no_grad()
def init_rwkv5_(model: RWKV5) -> RWKV5:
    """RWKV-LM's v5 initialisation: per-layer ramps for the mixes, decay and bonus; zero outputs."""
    cfg = model.cfg
    for i, block in enumerate(model.blocks):
        att, ffn = block.att, block.ffn
        r01, r10, ddd, decay, bonus = ramps(cfg, i)
        att.time_mix_k.copy_(ddd.pow(r10))
        att.time_mix_v.copy_(ddd.pow(r10) + 0.3 * r01)
        att.time_mix_r.copy_(ddd.pow(0.5 * r10))
        att.time_mix_g.copy_(ddd.pow(0.5 * r10))
        att.time_decay.copy_(decay.view(cfg.n_head, cfg.head_size))
        att.time_faaaa.copy_(bonus.view(cfg.n_head, cfg.head_size))
        ffn.time_mix_k.copy_(ddd.pow(r10))
        ffn.time_mix_r.copy_(ddd.pow(r10))
    init_linears_(model, ln_x_ramp=False)
    return model
