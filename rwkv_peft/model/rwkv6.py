"""RWKV-6 "Finch" (x060): its mixers, config (read from a checkpoint) and init; the rest is in base.py.

RWKV-5.2 (rwkv5.py) reuses the v5/v6 pieces defined here: ``RWKV56Config``, ``read_common``, the
projections, ``ChannelMix``, ``ramps``, ``init_linears_``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rwkv_peft.model import base
from rwkv_peft.model.checkpoint import block_count, tensor_shape
from rwkv_peft.ops import wkv6

LN_X_EPS = 1e-5 * 8**2  # RWKV-LM's GroupNorm eps, 1e-5 * head_size_divisor**2 (divisor 8)


def ffn_width(n_embd: int) -> int:
    """RWKV-LM's default channel-mix width for v5.2 and v6: 3.5 x n_embd, rounded down to 32."""
    return int(n_embd * 3.5) // 32 * 32


@dataclass
class RWKV56Config:
    """The architecture fields x052 and x060 share (all of RWKV5Config; RWKV6Config adds its LoRA widths)."""

    n_layer: int
    n_embd: int
    vocab_size: int
    head_size: int = 64
    dim_ffn: int = 0  # 0: ffn_width(n_embd)
    dim_att: int = 0  # 0: n_embd

    def __post_init__(self) -> None:
        self.dim_att = self.dim_att or self.n_embd
        if self.dim_att % self.head_size:
            raise ValueError(f"dim_att {self.dim_att} is not a multiple of head_size {self.head_size}")
        self.dim_ffn = self.dim_ffn or ffn_width(self.n_embd)

    @property
    def n_head(self) -> int:
        return self.dim_att // self.head_size


@dataclass
class RWKV6Config(RWKV56Config):
    d_mix: int = 0  # width of the token-shift LoRA (per w/k/v/r/g); 0: 32 (64 at n_embd 4096)
    d_decay: int = 0  # width of the decay LoRA; 0: 64 (128 at n_embd 4096)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.d_mix = self.d_mix or (64 if self.n_embd == 4096 else 32)
        self.d_decay = self.d_decay or (128 if self.n_embd == 4096 else 64)


def read_common(sd: Mapping[str, torch.Tensor], name: str) -> dict[str, int]:
    """Architecture fields shared by x060 and x052, read from tensor shapes.

    Heads come from ``time_faaaa``'s first dimension, as the runtime reads them; it may carry
    trailing size-1 dimensions (stored (H, N) or (H, N, 1)).
    """
    vocab_size, n_embd = tensor_shape(sd, "emb.weight", name)
    dim_att = tensor_shape(sd, "blocks.0.att.key.weight", name)[0]
    bonus = tensor_shape(sd, "blocks.0.att.time_faaaa", name)
    n_head = bonus[0] if bonus else 0
    if not n_head or math.prod(bonus) != dim_att or dim_att % n_head:
        raise ValueError(
            f"{name}: blocks.0.att.time_faaaa is {bonus}, expected (heads, head_size) with "
            f"heads x head_size = dim_att {dim_att}"
        )
    return dict(
        n_layer=block_count(sd),
        n_embd=n_embd,
        vocab_size=vocab_size,
        head_size=dim_att // n_head,
        dim_ffn=tensor_shape(sd, "blocks.0.ffn.key.weight", name)[0],
        dim_att=dim_att,
    )


def config_from_state_dict(sd: Mapping[str, torch.Tensor], name: str = "checkpoint") -> RWKV6Config:
    """Architecture of an x060 checkpoint, read from its tensor shapes."""
    return RWKV6Config(
        **read_common(sd, name),
        d_mix=tensor_shape(sd, "blocks.0.att.time_maa_w2", name)[1],
        d_decay=tensor_shape(sd, "blocks.0.att.time_decay_w1", name)[1],
    )


def add_projections(mix: nn.Module, cfg: RWKV56Config) -> None:
    """The v5/v6 time mix's linears (receptance, key, value, gate: C -> A; output: A -> C) and ln_x,
    registered after the mix's own tensors, in checkpoint order."""
    C, A = cfg.n_embd, cfg.dim_att
    for name in ("receptance", "key", "value", "gate"):
        setattr(mix, name, nn.Linear(C, A, bias=False))
    mix.output = nn.Linear(A, C, bias=False)
    # RWKV-LM divides by head_size_divisor (8) before a GroupNorm with eps 1e-5: the same as this.
    mix.ln_x = nn.GroupNorm(cfg.n_head, A, eps=LN_X_EPS)


class GatedTimeMix(base.TimeMix):
    """The v5/v6 time mix: receptance, decay, key, value and gate from the token-shifted input (``inputs``),
    WKV over the heads (``wkv``), then the output normalised per head (ln_x), gated and projected."""

    def mix(
        self, x: torch.Tensor, prev: torch.Tensor, v_first: torch.Tensor | None, wkv_state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        r, w, k, v, g = self.inputs(x, prev)
        y, wkv_state = self.wkv(r, w, k, v, wkv_state)
        B, T, A = g.shape
        return self.output(self.ln_x(y.reshape(B * T, A)).view(B, T, A) * g), v_first, wkv_state

    def heads(self, *ts: torch.Tensor) -> list[torch.Tensor]:
        """(B, T, A) tensors as (B, T, H, N)."""
        return [t.reshape(*t.shape[:2], self.n_head, self.head_size) for t in ts]

    def inputs(self, x: torch.Tensor, prev: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def wkv(self, r: torch.Tensor, w: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor,
            state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def add_ffn_projections(mix: nn.Module, cfg: RWKV56Config) -> None:
    """The v5/v6 channel mix's linears: key C -> dim_ffn, receptance C -> C, value dim_ffn -> C."""
    C = cfg.n_embd
    mix.key = nn.Linear(C, cfg.dim_ffn, bias=False)
    mix.receptance = nn.Linear(C, C, bias=False)
    mix.value = nn.Linear(cfg.dim_ffn, C, bias=False)


class TimeMix(GatedTimeMix):
    def __init__(self, cfg: RWKV6Config, layer_id: int, op: str = "auto"):
        super().__init__(cfg, layer_id, op)
        C, A = cfg.n_embd, cfg.dim_att
        for name in ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g"):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, C)))
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * cfg.d_mix))  # data-dependent mixes of w k v r g
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, cfg.d_mix, C))
        self.time_decay = nn.Parameter(torch.zeros(1, 1, A))
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, cfg.d_decay))
        self.time_decay_w2 = nn.Parameter(torch.zeros(cfg.d_decay, A))
        self.time_faaaa = nn.Parameter(torch.zeros(cfg.n_head, cfg.head_size))
        add_projections(self, cfg)

    def inputs(self, x: torch.Tensor, prev: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(r, w, k, v, g) from data-dependent token-shift mixes; w is the log-log decay of every token."""
        B, T, C = x.shape
        xx = prev - x
        m = torch.tanh((x + xx * self.time_maa_x) @ self.time_maa_w1).view(B * T, 5, -1).transpose(0, 1)
        mw, mk, mv, mr, mg = torch.bmm(m, self.time_maa_w2).view(5, B, T, C).unbind(0)
        xw = x + xx * (self.time_maa_w + mw)
        xk = x + xx * (self.time_maa_k + mk)
        xv = x + xx * (self.time_maa_v + mv)
        xr = x + xx * (self.time_maa_r + mr)
        xg = x + xx * (self.time_maa_g + mg)

        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        g = F.silu(self.gate(xg))
        w = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2  # log-log decay
        return r, w, k, v, g

    def wkv(self, r: torch.Tensor, w: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor,
            state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return wkv6(*self.heads(r, w, k, v), self.time_faaaa, state=state, op=self.op)


class ChannelMix(base.ChannelMix):
    """The v5/v6 channel mix: a squared-ReLU key, gated by a sigmoid receptance, each on its token-shifted x.
    x052's differs only in its mixes' names and direction (``mixes``, ``shift``)."""

    mixes = ("time_maa_k", "time_maa_r")  # the key's and the receptance's token-shift mix

    def __init__(self, cfg: RWKV56Config, layer_id: int):
        super().__init__()
        for name in self.mixes:
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, cfg.n_embd)))
        add_ffn_projections(self, cfg)

    @staticmethod
    def shift(x: torch.Tensor, prev: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        """RWKV-6's token shift: x moved a fraction ``mix`` of the way to the previous token."""
        return x + (prev - x) * mix

    def mix(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        mix_k, mix_r = (getattr(self, name) for name in self.mixes)
        k = torch.relu(self.key(self.shift(x, prev, mix_k))) ** 2
        return torch.sigmoid(self.receptance(self.shift(x, prev, mix_r))) * self.value(k)


class RWKV6(base.RWKV):
    version = "x060"
    time_mix, channel_mix = TimeMix, ChannelMix
    peft_targets = {"att": ("receptance", "key", "value", "gate", "output"), "ffn": ("key", "receptance", "value")}
    time_params = ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g",
                   "time_maa_w1", "time_maa_w2", "time_decay", "time_decay_w1", "time_decay_w2", "time_faaaa")


def ramps(cfg, layer_id: int) -> tuple[float, float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RWKV-LM's per-layer init ramps: (0 -> 1, 1 -> ~0, channel position in [0, 1), decay speed, bonus).

    The decay speed (dim_att,) runs from -6 to -1 along the channels, steeper in deeper layers;
    the bonus (dim_att,) falls along the channels with a small period-3 zigzag.
    """
    L, A = cfg.n_layer, cfg.dim_att
    r01 = layer_id / (L - 1) if L > 1 else 0.0
    r10 = 1.0 - layer_id / L
    ddd = (torch.arange(cfg.n_embd, dtype=torch.float32) / cfg.n_embd).view(1, 1, -1)
    n = torch.arange(A, dtype=torch.float32)
    decay = -6 + 5 * (n / (A - 1)) ** (0.7 + 1.3 * r01)
    bonus = r01 * (1 - n / (A - 1)) + ((n + 1) % 3 - 1) * 0.1
    return r01, r10, ddd, decay, bonus


@torch.no_grad()
def init_linears_(model: nn.Module, ln_x_ramp: bool) -> None:
    """RWKV-LM's v5/v6 init of the matrices and norms (rwkv_v6_demo.py's init_params)."""
    cfg = model.cfg
    for i, block in enumerate(model.blocks):
        att, ffn = block.att, block.ffn
        for lin in (att.receptance, att.value, ffn.key):
            nn.init.orthogonal_(lin.weight, gain=1.0)
        for lin in (att.key, att.gate):
            nn.init.orthogonal_(lin.weight, gain=0.1)
        for lin in (att.output, ffn.value, ffn.receptance):
            lin.weight.zero_()
        att.ln_x.reset_parameters()
        if ln_x_ramp:
            att.ln_x.weight.fill_(((1 + i) / cfg.n_layer) ** 0.7)
        for ln in (block.ln1, block.ln2) + ((block.ln0,) if i == 0 else ()):
            ln.reset_parameters()
    model.ln_out.reset_parameters()
    model.emb.weight.uniform_(-1e-4, 1e-4)
    V, C = cfg.vocab_size, cfg.n_embd
    nn.init.orthogonal_(model.head.weight, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)


@torch.no_grad()
def init_rwkv6_(model: RWKV6) -> RWKV6:
    """RWKV-LM's initialisation for real training: per-layer ramps, small random LoRAs, zero outputs."""
    cfg = model.cfg
    for i, block in enumerate(model.blocks):
        att, ffn = block.att, block.ffn
        r01, r10, ddd, decay, bonus = ramps(cfg, i)
        for name in ("time_maa_x", "time_maa_w", "time_maa_k"):
            getattr(att, name).copy_(1.0 - ddd.pow(r10))
        att.time_maa_v.copy_(1.0 - (ddd.pow(r10) + 0.3 * r01))
        att.time_maa_r.copy_(1.0 - ddd.pow(0.5 * r10))
        att.time_maa_g.copy_(1.0 - ddd.pow(0.5 * r10))
        att.time_maa_w1.zero_()
        att.time_maa_w2.uniform_(-0.01, 0.01)
        att.time_decay.copy_(decay.view(1, 1, -1))
        att.time_decay_w1.zero_()
        att.time_decay_w2.uniform_(-0.01, 0.01)
        att.time_faaaa.copy_(bonus.view(cfg.n_head, cfg.head_size))
        ffn.time_maa_k.copy_(1.0 - ddd.pow(r10))
        ffn.time_maa_r.copy_(1.0 - ddd.pow(r10))
    init_linears_(model, ln_x_ramp=True)
    return model
