"""RWKV-7b: x070 with DeepEmbed attention (DEA), a small softmax attention beside the time mix.

Each block gets ``blocks.<i>.qkv``: queries ``x @ qq.T`` (width Q, 256 in the released model); keys
``((x @ k1) @ k2) * E_k`` and values ``tanh((x @ v1) @ v2) * E_v``, where ``E_k`` / ``E_v`` are the
token's rows of ``k_emb`` / ``v_emb`` plus its ln0 embedding through ``k_emb_x`` / ``v_emb_x`` (as
RWKV-7a's ``s_emb``); each token-shifted (``x_q``, ``x_k``, ``x_v``) and layer-normed, then
``softmax(64 tanh(q k^T / 1024))`` over the causal context. ``x`` is the block's input (the residual
stream), and the result is added to it beside the time mix's. The channel mix is RWKV-7a's.
Reference: RWKV-LM's ``RWKV-v7/rwkv_v7b_demo.py`` (there is no pip runtime for it).

The recurrent state of a 7b block extends x070's three tensors with the attention's: the previous
token's raw q, k and v (for the token shifts), every earlier token's final keys and values, and which
of those entries are real (a batch of contexts of different lengths is stacked left-padded).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from rwkv_peft.model import base

if TYPE_CHECKING:
    from rwkv_peft.model.rwkv7 import RWKV7Config

SOFTCAP, SCALE = 64.0, 1.0 / 1024.0  # the demo's constants: scores = SOFTCAP * tanh(q k^T * SCALE)


class DeepEmbedAttention(nn.Module):
    def __init__(self, cfg: RWKV7Config):
        super().__init__()
        C, Q, K, V = cfg.n_embd, cfg.dea_q, cfg.dea_k, cfg.vocab_size
        self.qq = nn.Linear(C, Q, bias=False)
        self.k1 = nn.Parameter(torch.zeros(C, K))
        self.k2 = nn.Parameter(torch.zeros(K, Q))
        self.k_emb = nn.Embedding(V, Q)
        self.k_emb_x = nn.Linear(C, Q, bias=False)
        self.v1 = nn.Parameter(torch.zeros(C, K))
        self.v2 = nn.Parameter(torch.zeros(K, C))
        self.v_emb = nn.Embedding(V, C)
        self.v_emb_x = nn.Linear(C, C, bias=False)
        self.x_q = nn.Parameter(torch.zeros(1, 1, Q))
        self.x_k = nn.Parameter(torch.zeros(1, 1, Q))
        self.x_v = nn.Parameter(torch.zeros(1, 1, C))
        self.lnq = nn.LayerNorm(Q)
        self.lnk = nn.LayerNorm(Q)
        self.lnv = nn.LayerNorm(C)

    def forward(self, x: torch.Tensor, tokens: base.Tokens, cache: list | None) -> tuple[torch.Tensor, list]:
        """Attention output (B, T, C) for the residual stream ``x`` and the cache after it: ``[q, k, v of the
        last token (raw), keys (B, t, Q), values (B, t, C), valid (B, t)]`` (None: no earlier token). ``valid``
        marks real entries, so caches of different lengths can be stacked left-padded (batched decoding)."""
        idx, x0 = tokens
        B, T, _ = x.shape
        q = self.qq(x)
        k = (x @ self.k1) @ self.k2 * (self.k_emb(idx) + self.k_emb_x(x0))
        v = torch.tanh((x @ self.v1) @ self.v2) * (self.v_emb(idx) + self.v_emb_x(x0))
        q_prev, k_prev, v_prev, keys, values, valid = cache if cache else (None,) * 6
        qs = self.lnq(q + (base.token_shift(q, q_prev) - q) * self.x_q)
        ks = self.lnk(k + (base.token_shift(k, k_prev) - k) * self.x_k)
        vs = self.lnv(v + (base.token_shift(v, v_prev) - v) * self.x_v)
        new = torch.ones(B, T, dtype=torch.bool, device=x.device)
        if keys is not None:
            ks, vs = torch.cat([keys.to(ks.dtype), ks], 1), torch.cat([values.to(vs.dtype), vs], 1)
            new = torch.cat([valid, new], 1)
        t = ks.shape[1]
        scores = SOFTCAP * torch.tanh((qs @ ks.mT) * SCALE)
        hidden = torch.ones(T, t, dtype=torch.bool, device=x.device).triu(t - T + 1) | ~new[:, None, :]
        out = scores.masked_fill(hidden, float("-inf")).softmax(-1) @ vs
        return out, [q[:, -1], k[:, -1], v[:, -1], ks, vs, new]


class Block(base.Block):
    """An x070 block with DeepEmbed attention on its input, added beside the time mix's output."""

    def __init__(self, cfg: RWKV7Config, layer_id: int, time_mix: type, channel_mix: type, op: str):
        super().__init__(cfg, layer_id, time_mix, channel_mix, op)
        self.qkv = DeepEmbedAttention(cfg)

    def forward(
        self, x: torch.Tensor, v_first: torch.Tensor | None, state: list | None = None,
        tokens: base.Tokens | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list]:
        att_shift, wkv_state, ffn_shift, *cache = state if state is not None else (None, None, None)
        if tokens is None:
            raise ValueError("an RWKV-7b block needs the token ids and embeddings (tokens)")
        dea, cache = self.qkv(x, tokens, cache)
        dx, v_first, att_shift, wkv_state = self.att(self.ln1(x), v_first, att_shift, wkv_state)
        x = x + dx + dea
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift, tokens)
        return x + dx, v_first, [att_shift, wkv_state, ffn_shift, *cache]


@torch.no_grad()
def init_dea_(dea: DeepEmbedAttention, n_embd: int) -> None:
    """Our choice (RWKV-LM's 7b trainer is unpublished): a small random attention whose output (``lnv``'s
    weight) starts at zero."""
    s = 0.5 / n_embd**0.5
    for w in (dea.qq.weight, dea.k1, dea.k2, dea.v1, dea.v2):
        w.uniform_(-s, s)
    for e in (dea.k_emb.weight, dea.v_emb.weight):
        e.fill_(1.0)
    for w in (dea.k_emb_x.weight, dea.v_emb_x.weight):
        w.zero_()
    for mix in (dea.x_q, dea.x_k, dea.x_v):
        mix.fill_(0.5)
    for ln in (dea.lnq, dea.lnk, dea.lnv):
        ln.reset_parameters()
    dea.lnv.weight.zero_()  # the attention adds nothing at first
