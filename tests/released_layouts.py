"""Checkpoints laid out like released RWKV models, written from the published key lists below.

Nothing here calls rwkv_peft: the keys, their file order and their shapes are written out from
the public sources, so a test built on these files checks our loader against what others wrote.

- x070 (RWKV-7 World / G1): RWKV-LM ``RWKV-v7/train_temp/README.md``'s weight table (v0/v1/v2
  "for layer 1+"), in the parameter order of ``RWKV-v7/train_temp/src/model.py`` (Block: ln1, ln2,
  ln0; RWKV_Tmix_x070; RWKV_CMix_x070). Released 0.1B: L12 D768, vocab 65536, low-rank widths
  decay 64, a 64, value 32, gate 128 (``X070_0B1``).
- x070 DeepEmbed (RWKV-7a, e.g. ``rwkv7a-g1b-0.1b-20250819-ctx4096``): x070 plus five ``ffn.`` keys per
  block, shaped as the `rwkv` runtime's x070 loader (RWKV_DE_VERSION=1) and RWKV-LM's
  ``RWKV-v7/rwkv_v7a_demo.py`` use them: ``x @ s1`` (C, D), the token's ``s_emb`` row viewed (D, D)
  with D = 32 hard-coded there, ``s_emb + ln0(emb) @ s_emb_x.T`` so ``s_emb_x`` is (D*D, C), ``@ s2``
  reaching the ffn width (D, F), ``+ s0`` per ffn channel (squeezed by the loader: stored (1, 1, F)
  like the other vectors, or (F); both are written below). Their order among a block's keys is not
  published; they are put after the plain channel mix, in an order unlike the model class's.
- x070 DeepEmbed attention (RWKV-7b, ``rwkv7b-g1b-0.1b-20250822-ctx4096``): RWKV-7a plus ``qkv.`` keys,
  shaped as RWKV-LM's ``RWKV-v7/rwkv_v7b_demo.py`` uses them (its loader transposes ``qq.weight``,
  squeezes the rest): ``x @ qq.T`` of width Q = 256 (layer-normed over 256), ``x @ k1`` (C, K) with
  K = 32 (its KV cache is "12*2*32 numbers per token"), ``@ k2`` (K, Q), ``@ v1`` (C, K), ``@ v2``
  (K, C), ``k_emb`` / ``v_emb`` rows of width Q / C with ``emb @ k_emb_x.T`` (Q, C) and ``emb @
  v_emb_x.T`` (C, C) folded in, token-shift mixes ``x_q`` / ``x_k`` (Q) and ``x_v`` (C), layer norms
  ``lnq`` / ``lnk`` (Q) and ``lnv`` (C).
- x060 (RWKV-6 World / Finch): ``RWKV-v5/src/model.py``'s RWKV_Tmix_x060 / RWKV_CMix_x060.
- x052 (RWKV-5 World / Eagle): RWKV_TimeMix_RWKV5 / RWKV_ChannelMix of the same file, where
  ``time_decay`` and ``time_faaaa`` are (heads, head_size). The `rwkv` runtime squeezes every
  ``.time_`` tensor before use, so it also loads them stored (heads, head_size, 1) ("x052_h_n_1").

Shape letters: C n_embd, H heads, N head size, F ffn width, V vocab; low-rank widths W (decay),
A (a), M (value residual), G (gate); x060: X (token-shift mix), D (decay); x070 DeepEmbed: D (side of
the per-token matrix), E = D*D.
"""

from __future__ import annotations

from pathlib import Path

import torch

# (key inside blocks.<i>., shape) in file order; LAYER0_ONLY / LAYER1_UP say which blocks have it
BLOCK_LNS = [("ln1.weight", "C"), ("ln1.bias", "C"), ("ln2.weight", "C"), ("ln2.bias", "C"),
             ("ln0.weight", "C"), ("ln0.bias", "C")]  # every version's blocks start with these
X070_BLOCK = [
    *BLOCK_LNS,
    ("att.x_r", "1 1 C"), ("att.x_w", "1 1 C"), ("att.x_k", "1 1 C"),
    ("att.x_v", "1 1 C"), ("att.x_a", "1 1 C"), ("att.x_g", "1 1 C"),
    ("att.w1", "C W"), ("att.w2", "W C"), ("att.w0", "1 1 C"),
    ("att.a1", "C A"), ("att.a2", "A C"), ("att.a0", "1 1 C"),
    ("att.v1", "C M"), ("att.v2", "M C"), ("att.v0", "1 1 C"),
    ("att.g1", "C G"), ("att.g2", "G C"),
    ("att.k_k", "1 1 C"), ("att.k_a", "1 1 C"), ("att.r_k", "H N"),
    ("att.receptance.weight", "C C"), ("att.key.weight", "C C"),
    ("att.value.weight", "C C"), ("att.output.weight", "C C"),
    ("att.ln_x.weight", "C"), ("att.ln_x.bias", "C"),
    ("ffn.x_k", "1 1 C"), ("ffn.key.weight", "F C"), ("ffn.value.weight", "C F"),
]
X070A_BLOCK = X070_BLOCK + [
    ("ffn.s1", "C D"), ("ffn.s2", "D F"), ("ffn.s0", "1 1 F"),
    ("ffn.s_emb.weight", "V E"), ("ffn.s_emb_x.weight", "E C"),
]
X070A_S0_F = [(k, "F" if k == "ffn.s0" else s) for k, s in X070A_BLOCK]
X070B_BLOCK = X070A_BLOCK + [
    ("qkv.qq.weight", "Q C"), ("qkv.k1", "C K"), ("qkv.k2", "K Q"),
    ("qkv.k_emb.weight", "V Q"), ("qkv.k_emb_x.weight", "Q C"),
    ("qkv.v1", "C K"), ("qkv.v2", "K C"), ("qkv.v_emb.weight", "V C"), ("qkv.v_emb_x.weight", "C C"),
    ("qkv.x_q", "1 1 Q"), ("qkv.x_k", "1 1 Q"), ("qkv.x_v", "1 1 C"),
    ("qkv.lnq.weight", "Q"), ("qkv.lnq.bias", "Q"), ("qkv.lnk.weight", "Q"), ("qkv.lnk.bias", "Q"),
    ("qkv.lnv.weight", "C"), ("qkv.lnv.bias", "C"),
]
X060_BLOCK = [
    *BLOCK_LNS,
    ("att.time_maa_x", "1 1 C"), ("att.time_maa_w", "1 1 C"), ("att.time_maa_k", "1 1 C"),
    ("att.time_maa_v", "1 1 C"), ("att.time_maa_r", "1 1 C"), ("att.time_maa_g", "1 1 C"),
    ("att.time_maa_w1", "C 5X"), ("att.time_maa_w2", "5 X C"),
    ("att.time_decay", "1 1 C"), ("att.time_decay_w1", "C D"), ("att.time_decay_w2", "D C"),
    ("att.time_faaaa", "H N"),
    ("att.receptance.weight", "C C"), ("att.key.weight", "C C"), ("att.value.weight", "C C"),
    ("att.output.weight", "C C"), ("att.gate.weight", "C C"),
    ("att.ln_x.weight", "C"), ("att.ln_x.bias", "C"),
    ("ffn.time_maa_k", "1 1 C"), ("ffn.time_maa_r", "1 1 C"),
    ("ffn.key.weight", "F C"), ("ffn.receptance.weight", "C C"), ("ffn.value.weight", "C F"),
]
X052_BLOCK = [
    *BLOCK_LNS,
    ("att.time_mix_k", "1 1 C"), ("att.time_mix_v", "1 1 C"), ("att.time_mix_r", "1 1 C"),
    ("att.time_mix_g", "1 1 C"), ("att.time_decay", "H N"), ("att.time_faaaa", "H N"),
    ("att.receptance.weight", "C C"), ("att.key.weight", "C C"), ("att.value.weight", "C C"),
    ("att.output.weight", "C C"), ("att.gate.weight", "C C"),
    ("att.ln_x.weight", "C"), ("att.ln_x.bias", "C"),
    ("ffn.time_mix_k", "1 1 C"), ("ffn.time_mix_r", "1 1 C"),
    ("ffn.key.weight", "F C"), ("ffn.receptance.weight", "C C"), ("ffn.value.weight", "C F"),
]
X052_H_N_1 = [(k, "H N 1" if k in ("att.time_decay", "att.time_faaaa") else s) for k, s in X052_BLOCK]
LAYER0_ONLY = {"ln0.weight", "ln0.bias"}
LAYER1_UP = {"att.v0", "att.v1", "att.v2"}  # released x070 files: not in layer 0
HEAD = [("emb.weight", "V C")]
TAIL = [("ln_out.weight", "C"), ("ln_out.bias", "C"), ("head.weight", "V C")]

# name: (version, block key list, dims, layer-0 v0/v1/v2 present)
LAYOUTS = {
    "x070_released": ("x070", X070_BLOCK, dict(L=2, C=128, H=2, N=64, F=512, V=300, W=32, A=48, M=16, G=64), False),
    "x070_layer0_v": ("x070", X070_BLOCK, dict(L=2, C=128, H=2, N=64, F=512, V=300, W=32, A=48, M=16, G=64), True),
    "x070_n32_released": ("x070", X070_BLOCK, dict(L=3, C=96, H=3, N=32, F=320, V=257, W=16, A=32, M=8, G=40), False),
    "x070_n32_layer0_v": ("x070", X070_BLOCK, dict(L=3, C=96, H=3, N=32, F=320, V=257, W=16, A=32, M=8, G=40), True),
    "x070a_deepembed": ("x070", X070A_BLOCK, dict(L=2, C=128, H=2, N=64, F=512, V=300, W=32, A=48, M=16, G=64,
                                                  D=32, E=1024), False),
    "x070a_n32_s0_f": ("x070", X070A_S0_F, dict(L=3, C=96, H=3, N=32, F=320, V=257, W=16, A=32, M=8, G=40,
                                                D=32, E=1024), False),
    "x060_world": ("x060", X060_BLOCK, dict(L=2, C=128, H=2, N=64, F=448, V=300, X=32, D=64), False),
    "x052_world": ("x052", X052_BLOCK, dict(L=2, C=128, H=2, N=64, F=448, V=300), False),
    "x052_h_n_1": ("x052", X052_H_N_1, dict(L=2, C=128, H=2, N=64, F=448, V=300), False),
}
# RWKV-7b (no pip runtime runs it; tests/test_rwkv7b.py has the reference): Q = 256, K = 32 as in the demo
X070B_LAYOUTS = {
    "x070b_dea": ("x070", X070B_BLOCK, dict(LAYOUTS["x070a_deepembed"][2], Q=256, K=32), False),
    "x070b_n32": ("x070", X070B_BLOCK, dict(LAYOUTS["x070a_n32_s0_f"][2], Q=256, K=32), False),
}
X070_0B1 = ("x070", X070_BLOCK, dict(L=12, C=768, H=12, N=64, F=3072, V=65536, W=64, A=64, M=32, G=128), False)


def shape_of(rule: str, dims: dict[str, int]) -> tuple[int, ...]:
    """``"C 5X"`` -> (dims["C"], 5 * dims["X"])."""
    out = []
    for tok in rule.split():
        num = tok.rstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
        letter = tok[len(num):]
        out.append(int(num or 1) * (dims[letter] if letter else 1))
    return tuple(out)


def key_shapes(layout: tuple) -> dict[str, tuple[int, ...]]:
    """Every key of a layout and its shape, in file order."""
    _, block, dims, layer0_v = layout
    keys = [(k, shape_of(s, dims)) for k, s in HEAD]
    for i in range(dims["L"]):
        for k, s in block:
            if (k in LAYER0_ONLY and i > 0) or (k in LAYER1_UP and i == 0 and not layer0_v):
                continue
            keys.append((f"blocks.{i}.{k}", shape_of(s, dims)))
    keys += [(k, shape_of(s, dims)) for k, s in TAIL]
    return dict(keys)


def _value(key: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Values in the ranges trained models have, so every tensor moves the logits."""
    leaf = key.rsplit(".", 2)[-2] if key.endswith((".weight", ".bias")) else key.rsplit(".", 1)[-1]
    if leaf == "s_emb":  # DeepEmbed: unit-scale per-token matrices, a gate ((x @ s1) @ E) @ s2 + s0 near 1
        return torch.randn(shape, generator=g)
    if leaf in ("s1", "s2"):
        return torch.randn(shape, generator=g) / shape[0] ** 0.5 * 0.5
    if leaf == "s0":
        return 1 + torch.randn(shape, generator=g) * 0.1
    if key.endswith(".bias"):
        return torch.randn(shape, generator=g) * 0.1
    if key.endswith(".weight") and leaf.startswith("ln"):
        return 1 + torch.randn(shape, generator=g) * 0.1
    if key.endswith(".weight"):  # emb, head, linears: unit-scale outputs
        return torch.randn(shape, generator=g) / shape[-1] ** 0.5 * (1.0 if leaf != "emb" else 4.0)
    if leaf in ("w0", "time_decay"):  # log-log decay: slow to fast
        return torch.rand(shape, generator=g) * -5 - 0.5
    if leaf.startswith(("x_", "time_maa_", "time_mix_")) and len(shape) == 3 and shape[0] == 1:
        return torch.rand(shape, generator=g)  # token-shift mixes lie in [0, 1]
    return torch.randn(shape, generator=g) * 0.3  # low-rank paths, bonus, k_k, k_a, a0, v0, r_k


def write_checkpoint(layout: tuple, path: Path, dtype: torch.dtype, seed: int = 0) -> dict[str, tuple[int, ...]]:
    """A .pth in ``layout`` with plausible random values; returns its keys and shapes."""
    g = torch.Generator().manual_seed(seed)
    shapes = key_shapes(layout)
    torch.save({k: _value(k, s, g).to(dtype) for k, s in shapes.items()}, path)
    return shapes
