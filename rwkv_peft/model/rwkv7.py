"""RWKV-7 "Goose" (x070) for training; parameter names and shapes equal the official checkpoint keys."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rwkv_peft.ops import wkv7


@dataclass
class RWKV7Config:
    n_layer: int
    n_embd: int
    vocab_size: int
    head_size: int = 64
    dim_ffn: int = 0  # 0: 4 * n_embd
    d_decay: int = 0  # widths of the low-rank w / a / v / g paths; 0: RWKV-LM's current defaults
    d_aaa: int = 0
    d_mv: int = 0
    d_gate: int = 0
    # Layer 0 never uses the value residual: released checkpoints store no v0/v1/v2 there, while
    # RWKV-LM's trainer creates unused ones, so its raw outputs have them. True: keep them too.
    layer0_vres: bool = False

    def __post_init__(self) -> None:
        C = self.n_embd
        if C % self.head_size:
            raise ValueError(f"n_embd {C} is not a multiple of head_size {self.head_size}")

        def width(f: float) -> int:
            return max(32, int(round(f / 32) * 32))

        self.dim_ffn = self.dim_ffn or 4 * C
        self.d_decay = self.d_decay or width(2.5 * C**0.5)
        self.d_aaa = self.d_aaa or width(2.5 * C**0.5)
        self.d_mv = self.d_mv or width(1.7 * C**0.5)
        self.d_gate = self.d_gate or width(5 * C**0.5)

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size


def token_shift(x: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    """x[t-1] for every t, with ``prev`` (B, C) (or zeros) before the first token."""
    first = torch.zeros_like(x[:, :1]) if prev is None else prev[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


class TimeMix(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int, op: str = "auto"):
        super().__init__()
        self.layer_id, self.op = layer_id, op
        self.n_head, self.head_size = cfg.n_head, cfg.head_size
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, C)))
        self.w1 = nn.Parameter(torch.zeros(C, cfg.d_decay))
        self.w2 = nn.Parameter(torch.zeros(cfg.d_decay, C))
        self.a1 = nn.Parameter(torch.zeros(C, cfg.d_aaa))
        self.a2 = nn.Parameter(torch.zeros(cfg.d_aaa, C))
        if layer_id > 0 or cfg.layer0_vres:  # value residual: mixes in layer 0's value from layer 1 on
            self.v0 = nn.Parameter(torch.zeros(1, 1, C))
            self.v1 = nn.Parameter(torch.zeros(C, cfg.d_mv))
            self.v2 = nn.Parameter(torch.zeros(cfg.d_mv, C))
        self.g1 = nn.Parameter(torch.zeros(C, cfg.d_gate))
        self.g2 = nn.Parameter(torch.zeros(cfg.d_gate, C))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)

    def forward(
        self,
        x: torch.Tensor,
        v_first: torch.Tensor | None,
        shift: torch.Tensor | None = None,
        wkv_state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (out, v_first, last x for the next token shift, final WKV state)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = token_shift(x, shift) - x
        xr, xw, xk = x + xx * self.x_r, x + xx * self.x_w, x + xx * self.x_k
        xv, xa, xg = x + xx * self.x_v, x + xx * self.x_a, x + xx * self.x_g

        r = self.receptance(xr)
        w = -F.softplus(-(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)) - 0.5  # log-log decay
        k = self.key(xk)
        v = self.value(xv)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (a - 1) * self.k_a)

        if wkv_state is None and hasattr(self, "time_state"):  # state tuning's learned start
            wkv_state = self.time_state.float().expand(B, H, N, N)
        heads = [t.reshape(B, T, H, N) for t in (r, w, k, v, -kk, kk * a)]
        y, wkv_state = wkv7(*heads, state=wkv_state, op=self.op)

        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        bonus = (r.view(B, T, H, N) * k.view(B, T, H, N) * self.r_k).sum(-1, keepdim=True)
        y = y + (bonus * v.view(B, T, H, N)).view(B, T, C)
        return self.output(y * g), v_first, x[:, -1], wkv_state


class ChannelMix(nn.Module):
    def __init__(self, cfg: RWKV7Config):
        super().__init__()
        self.x_k = nn.Parameter(torch.zeros(1, 1, cfg.n_embd))
        self.key = nn.Linear(cfg.n_embd, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, cfg.n_embd, bias=False)

    def forward(
        self, x: torch.Tensor, shift: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        xx = token_shift(x, shift) - x
        k = torch.relu(self.key(x + xx * self.x_k)) ** 2
        return self.value(k), x[:, -1]


class Block(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int, op: str = "auto"):
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg, layer_id, op)
        self.ffn = ChannelMix(cfg)

    def forward(
        self, x: torch.Tensor, v_first: torch.Tensor | None, state: list | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list]:
        """``state`` is [att shift (B, C), WKV (B, H, N, N), ffn shift (B, C)] or None (zeros)."""
        att_shift, wkv_state, ffn_shift = state if state is not None else (None, None, None)
        if self.layer_id == 0:
            x = self.ln0(x)
        dx, v_first, att_shift, wkv_state = self.att(self.ln1(x), v_first, att_shift, wkv_state)
        x = x + dx
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift)
        return x + dx, v_first, [att_shift, wkv_state, ffn_shift]


class RWKV7(nn.Module):
    version = "x070"
    # Linear layers that PEFT methods adapt, by part (module names inside blocks.<i>.<part>).
    peft_targets = {"att": ("receptance", "key", "value", "output"), "ffn": ("key", "value")}
    # Small per-block tensors grouped as the "time" train part (token-shift mixes, decay, LoRAs).
    time_params = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1", "a2",
                   "v0", "v1", "v2", "g1", "g2", "k_k", "k_a", "r_k")
    # Kept only to give the checkpoint back as it came (layer0_vres): never used, never trained.
    unused_params = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")

    def __init__(self, cfg: RWKV7Config, op: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i, op) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.grad_cp = False

    def train_part(self, name: str) -> str | None:
        """Which ``train_parts`` group (emb, head, ln, time) a parameter name belongs to, if any."""
        leaf = name.rsplit(".", 1)[-1]
        if name in self.unused_params:
            return None
        if name == "emb.weight":
            return "emb"
        if name == "head.weight":
            return "head"
        if any(f"{ln}." in name for ln in ("ln0", "ln1", "ln2", "ln_x", "ln_out")):
            return "ln"
        if name.startswith("blocks.") and leaf in self.time_params:
            return "time"
        return None

    def set_op(self, op: str) -> None:
        for block in self.blocks:
            block.att.op = op

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T), starting from the zero state."""
        return self.forward_state(idx, None)[0]

    def forward_state(self, idx: torch.Tensor, state: list | None) -> tuple[torch.Tensor, list]:
        """Logits and the state after the last token; ``state`` is one list per block or None."""
        x = self.emb(idx)
        v_first = None
        new_state = []
        for i, block in enumerate(self.blocks):
            s = None if state is None else state[i]
            if self.grad_cp and self.training and torch.is_grad_enabled():
                x, v_first, s = torch.utils.checkpoint.checkpoint(
                    block, x, v_first, s, use_reentrant=False
                )
            else:
                x, v_first, s = block(x, v_first, s)
            new_state.append(s)
        return self.head(self.ln_out(x)), new_state


@torch.no_grad()
def init_rwkv7_(model: RWKV7) -> RWKV7:
    """RWKV-LM's initialisation for real training: per-layer ramps and orthogonal/zero inits."""
    cfg = model.cfg
    C, N, L = cfg.n_embd, cfg.head_size, cfg.n_layer

    def ortho(w: torch.Tensor, scale: float) -> None:
        rows, cols = w.shape
        gain = math.sqrt(rows / cols) if rows > cols else 1.0
        nn.init.orthogonal_(w, gain=gain * scale)

    n = torch.arange(C, dtype=torch.float32)
    ddd = (n / C).view(1, 1, C)
    linear = n / (C - 1) - 0.5
    zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = zigzag * zigzag.abs()
    for i, block in enumerate(model.blocks):
        r01 = i / (L - 1) if L > 1 else 0.0
        r10 = 1.0 - i / L
        att, ffn = block.att, block.ffn
        for name, p in (
            ("x_r", 0.2),
            ("x_w", 0.9),
            ("x_k", 0.7),
            ("x_v", 0.7),
            ("x_a", 0.9),
            ("x_g", 0.2),
        ):
            getattr(att, name).copy_(1.0 - ddd.pow(p * r10))
        decay = -6 + 6 * (n / (C - 1)) ** (1 + r01**0.3)
        att.w0.copy_((decay + 0.5 + zigzag * 2.5).view(1, 1, C))
        att.a0.copy_((-0.19 + zigzag * 0.3 + linear * 0.4).view(1, 1, C))
        att.k_k.copy_((0.71 - linear * 0.1).view(1, 1, C))
        att.k_a.fill_(1.02)
        att.r_k.fill_(-0.04)
        pairs = [(att.w1, att.w2), (att.a1, att.a2), (att.g1, att.g2)]
        if hasattr(att, "v0"):
            att.v0.copy_((0.73 - linear * 0.4).view(1, 1, C))
            pairs.append((att.v1, att.v2))
        for lo, hi in pairs:
            lo.zero_()
            ortho(hi, 0.1)
        att.receptance.weight.uniform_(-0.5 / C**0.5, 0.5 / C**0.5)
        att.key.weight.uniform_(-0.05 / C**0.5, 0.05 / C**0.5)
        att.value.weight.uniform_(-0.5 / C**0.5, 0.5 / C**0.5)
        att.output.weight.zero_()
        att.ln_x.weight.copy_(((1 + i) / L) ** 0.7 * torch.ones(C))
        att.ln_x.bias.zero_()
        ffn.x_k.copy_(1.0 - ddd.pow(r10**4))
        ffn.key.weight.uniform_(-0.5 / C**0.5, 0.5 / C**0.5)
        ffn.value.weight.zero_()
        for ln in (block.ln1, block.ln2) + ((block.ln0,) if i == 0 else ()):
            ln.reset_parameters()
    model.ln_out.reset_parameters()
    model.emb.weight.uniform_(-1e-4, 1e-4)
    ortho(model.head.weight, 0.5)
    return model
