"""RWKV-7 "Goose" (x070): its mixers, config (read from a checkpoint) and init; the rest is in base.py.

RWKV-7a (DeepEmbed) files are x070 with five more tensors per block in the channel mix: ``ffn.s_emb``
(a D*D matrix per token id), ``ffn.s_emb_x`` (adds the token's ln0 embedding, projected, to that
matrix), ``ffn.s1`` / ``ffn.s2`` / ``ffn.s0``: the key is scaled by ``((x @ s1) @ E_token) @ s2 + s0``.
The `rwkv` runtime (RWKV_DE_VERSION=1) folds ``ln0(emb) @ s_emb_x.T`` into ``s_emb`` at load time; here
the same sum is formed per token, so the stored tensors stay as they came (and trainable).
RWKV-7b adds DeepEmbed attention (``blocks.<i>.qkv.*``, rwkv7b.py) to RWKV-7a.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rwkv_peft.model import base, rwkv7b
from rwkv_peft.model.checkpoint import block_count, tensor_shape
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
    deepembed: int = 0  # RWKV-7a: side D of the per-token D x D DeepEmbed matrix (released: 32); 0: none
    dea_q: int = 0  # RWKV-7b: DeepEmbed attention's query/key width (released: 256); 0: none
    dea_k: int = 0  # RWKV-7b: the width of its low-rank key and value paths k1 / v1 (released: 32)

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


def config_from_state_dict(sd: Mapping[str, torch.Tensor], name: str = "checkpoint") -> RWKV7Config:
    """Architecture of an x070 checkpoint, read from its tensor shapes.

    Each low-rank width is read from the first layer that has its tensor: released files have no
    ``blocks.0.att.v0/v1/v2`` (layer 0 has no value residual), and their widths differ per path.
    """
    vocab_size, n_embd = tensor_shape(sd, "emb.weight", name)
    n_layer = block_count(sd)
    n_head, head_size = tensor_shape(sd, "blocks.0.att.r_k", name)
    if n_head * head_size != n_embd:
        raise ValueError(
            f"{name}: blocks.0.att.r_k is {n_head}x{head_size}, expected heads x head_size = {n_embd}"
        )

    def width(leaf: str) -> int:  # 0 (the default) when no layer has it: check_state_dict says so
        keys = (f"blocks.{i}.att.{leaf}" for i in range(n_layer))
        return next((sd[k].shape[-1] for k in keys if k in sd), 0)

    dea = any(k.startswith("blocks.") and ".qkv." in k for k in sd)  # RWKV-7b
    return RWKV7Config(
        n_layer=n_layer,
        n_embd=n_embd,
        vocab_size=vocab_size,
        head_size=head_size,
        dim_ffn=tensor_shape(sd, "blocks.0.ffn.key.weight", name)[0],
        d_decay=width("w1"),
        d_aaa=width("a1"),
        d_mv=width("v1"),
        d_gate=width("g1"),
        layer0_vres=any(f"blocks.0.att.{v}" in sd for v in ("v0", "v1", "v2")),
        deepembed=deepembed_side(sd, n_layer, name),
        dea_q=tensor_shape(sd, "blocks.0.qkv.qq.weight", name)[0] if dea else 0,
        dea_k=tensor_shape(sd, "blocks.0.qkv.k1", name)[-1] if dea else 0,
    )


DEEPEMBED = ("s_emb", "s_emb_x", "s0", "s1", "s2")  # module / parameter names inside blocks.<i>.ffn


def deepembed_side(sd: Mapping[str, torch.Tensor], n_layer: int, name: str) -> int:
    """D of a DeepEmbed file (0 for plain x070): from the first ``ffn.s1`` (C, D), else ``ffn.s_emb`` (V, D*D).

    Any one DeepEmbed tensor makes the model DeepEmbed, so a file missing some of them gets
    check_state_dict's one error listing them (as one whose shapes disagree with this D).
    """
    for i in range(n_layer):
        if f"blocks.{i}.ffn.s1" in sd:
            return sd[f"blocks.{i}.ffn.s1"].shape[-1]
    for i in range(n_layer):
        if f"blocks.{i}.ffn.s_emb.weight" in sd:
            width = sd[f"blocks.{i}.ffn.s_emb.weight"].shape[-1]
            side = math.isqrt(width)
            if side * side != width:
                raise ValueError(f"{name}: blocks.{i}.ffn.s_emb.weight has width {width}, expected D*D (32*32)")
            return side
    prefixes = tuple(f".ffn.{n}" for n in DEEPEMBED)
    found = next((k for k in sd if k.startswith("blocks.") and k.removesuffix(".weight").endswith(prefixes)), None)
    if found is not None:
        raise ValueError(f"{name}: {found} without blocks.N.ffn.s1 or ffn.s_emb.weight to read DeepEmbed's size from")
    return 0


class TimeMix(base.TimeMix):
    def __init__(self, cfg: RWKV7Config, layer_id: int, op: str = "auto"):
        super().__init__(cfg, layer_id, op)
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

    def mix(
        self, x: torch.Tensor, prev: torch.Tensor, v_first: torch.Tensor | None, wkv_state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = prev - x
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

        heads = [t.reshape(B, T, H, N) for t in (r, w, k, v, -kk, kk * a)]
        y, wkv_state = wkv7(*heads, state=wkv_state, op=self.op)

        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        bonus = (r.view(B, T, H, N) * k.view(B, T, H, N) * self.r_k).sum(-1, keepdim=True)
        y = y + (bonus * v.view(B, T, H, N)).view(B, T, C)
        return self.output(y * g), v_first, wkv_state


class ChannelMix(base.ChannelMix):
    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        C, F_, D = cfg.n_embd, cfg.dim_ffn, cfg.deepembed
        self.x_k = nn.Parameter(torch.zeros(1, 1, C))
        self.key = nn.Linear(C, F_, bias=False)
        self.value = nn.Linear(F_, C, bias=False)
        self.deepembed = D
        if D:
            self.s_emb = nn.Embedding(cfg.vocab_size, D * D)
            self.s_emb_x = nn.Linear(C, D * D, bias=False)
            self.s0 = nn.Parameter(torch.zeros(1, 1, F_))
            self.s1 = nn.Parameter(torch.zeros(C, D))
            self.s2 = nn.Parameter(torch.zeros(D, F_))

    def forward(
        self, x: torch.Tensor, shift: torch.Tensor | None = None, tokens: base.Tokens | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mix(x, base.token_shift(x, shift), tokens), x[:, -1]

    def mix(self, x: torch.Tensor, prev: torch.Tensor, tokens: base.Tokens | None = None) -> torch.Tensor:
        k = torch.relu(self.key(x + (prev - x) * self.x_k)) ** 2
        if self.deepembed:
            k = k * self.deepembed_gate(x, tokens)
        return self.value(k)

    def deepembed_gate(self, x: torch.Tensor, tokens: base.Tokens | None) -> torch.Tensor:
        """RWKV-7a's per-token scale of the key: ``((x @ s1) @ E) @ s2 + s0``, E the token's D x D matrix
        ``s_emb[id] + s_emb_x(ln0(emb[id]))`` (what the runtime's folded ``s_emb`` row holds)."""
        if tokens is None:
            raise ValueError("a DeepEmbed channel mix needs the token ids and embeddings (tokens)")
        idx, x0 = tokens
        B, T, _ = x.shape
        D = self.deepembed
        E = (self.s_emb(idx) + self.s_emb_x(x0)).view(B, T, D, D)
        ss = ((x @ self.s1).view(B, T, 1, D) @ E).view(B, T, D)
        return ss @ self.s2 + self.s0


class RWKV7(base.RWKV):
    version = "x070"
    time_mix, channel_mix = TimeMix, ChannelMix
    peft_targets = {"att": ("receptance", "key", "value", "output"), "ffn": ("key", "value")}
    time_params = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1", "a2",
                   "v0", "v1", "v2", "g1", "g2", "k_k", "k_a", "r_k")
    # Layer 0's value-residual tensors some files carry (layer0_vres).
    unused_params = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")

    @classmethod
    def block_class(cls, cfg: RWKV7Config) -> type[base.Block]:
        return rwkv7b.Block if cfg.dea_q else base.Block

    def train_part(self, name: str) -> str | None:
        """As base, plus ``deepembed``: RWKV-7a's ``blocks.<i>.ffn.{s_emb,s_emb_x,s0,s1,s2}`` and all of
        RWKV-7b's ``blocks.<i>.qkv.*``."""
        parts = name.split(".")
        if len(parts) > 3 and parts[0] == "blocks" and (
            (parts[2] == "ffn" and parts[3] in DEEPEMBED) or parts[2] == "qkv"
        ):
            return "deepembed"
        return super().train_part(name)


def _ortho(w: torch.Tensor, scale: float) -> None:
    rows, cols = w.shape
    gain = math.sqrt(rows / cols) if rows > cols else 1.0
    nn.init.orthogonal_(w, gain=gain * scale)


@torch.no_grad()
def init_rwkv7_(model: RWKV7) -> RWKV7:
    """RWKV-LM's initialisation for real training: per-layer ramps and orthogonal/zero inits."""
    C, N = model.cfg.n_embd, model.cfg.head_size
    n = torch.arange(C, dtype=torch.float32)
    zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    ramps = (n, zigzag * zigzag.abs())
    for i, block in enumerate(model.blocks):
        _init_block_(block, i, model.cfg, ramps)
    model.ln_out.reset_parameters()
    model.emb.weight.uniform_(-1e-4, 1e-4)
    _ortho(model.head.weight, 0.5)
    return model


def _init_block_(block: nn.Module, i: int, cfg: RWKV7Config, ramps: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Block ``i`` of ``init_rwkv7_``; ``ramps``: the channel index and the per-head zigzag."""
    C, L = cfg.n_embd, cfg.n_layer
    n, zigzag = ramps
    ddd = (n / C).view(1, 1, C)
    linear = n / (C - 1) - 0.5
    r01 = i / (L - 1) if L > 1 else 0.0
    r10 = 1.0 - i / L
    att, ffn = block.att, block.ffn
    for name, p in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
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
        _ortho(hi, 0.1)
    att.receptance.weight.uniform_(-0.5 / C**0.5, 0.5 / C**0.5)
    att.key.weight.uniform_(-0.05 / C**0.5, 0.05 / C**0.5)
    att.value.weight.uniform_(-0.5 / C**0.5, 0.5 / C**0.5)
    att.output.weight.zero_()
    att.ln_x.weight.copy_(((1 + i) / L) ** 0.7 * torch.ones(C))
    att.ln_x.bias.zero_()
    ffn.x_k.copy_(1.0 - ddd.pow(r10**4))
    ffn.key.weight.uniform_(-0.5 / C**0.5, 0.5 / C**0.5)
    ffn.value.weight.zero_()
    if cfg.deepembed:  # our choice (RWKV-LM's 7a trainer is unpublished): the gate starts at 1, E random
        D = cfg.deepembed
        ffn.s0.fill_(1.0)
        ffn.s1.uniform_(-0.5 / C**0.5, 0.5 / C**0.5)
        ffn.s2.zero_()
        ffn.s_emb.weight.uniform_(-1 / D**0.5, 1 / D**0.5)
        ffn.s_emb_x.weight.zero_()
    if cfg.dea_q:
        rwkv7b.init_dea_(block.qkv, C)
    for ln in (block.ln1, block.ln2) + ((block.ln0,) if i == 0 else ()):
        ln.reset_parameters()
