"""MiSS (Matrix Shard Sharing): config, the functional math (delta, merge, unmerge) and the layer.

This module is the only place the MiSS formulas live (the list below); the layer's
forward, merging and unmerging all go through the functions below. W is an nn.Linear weight
(out x in), y = x W^T, and every mode starts from a zero adapter so step 0 equals the base.

- balance: M (r, out); dW[o, j] = M[j mod r, o] (a trailing partial shard uses the first in mod r rows).
- mini:    m (r, mini_r); M = m.repeat(1, out // mini_r), then as balance.
- bat_row: D (out/r, r, r); block (a, b) of W: dW_ab = W_ab @ D_a + D_a.
- bat_col: D (in/r, r, r);  dW_ab = W_ab @ D_b + D_b.  (RWKV-PEFT's "bat")
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rwkv_peft.peft.config import Fold, Switchable, as_tuple, check_train_parts, json_fields

MODES = ("balance", "mini", "bat_row", "bat_col")
MODE_ALIASES = {"bone": "balance", "bat": "bat_col"}  # RWKV-PEFT mode names
PEFT_SUFFIXES = {"MISS": {"miss_block": "miss"}, "BONE": {"bone_block": "miss"}}  # BONE: peft's name before MiSS
PEFT_INIT = {True: "balance", False: "balance", "bat": "bat_row", "mini": "mini"}  # peft init_weights -> our mode
_LEGACY_KEYS = {"bone_r": "r", "bone_load": "load", "bone_mode": "mode"}  # RWKV-PEFT's old bone_config


@dataclass
class MissConfig:
    """MiSS settings, as given by ``--miss_config '{"r":64,"mode":"balance"}'``."""

    r: int = 64
    mode: str = "balance"
    mini_r: int = 1
    dropout: float = 0.0
    parts: tuple[str, ...] = ("att", "ffn")
    train_parts: tuple[str, ...] = ()
    load: str = ""

    def __post_init__(self) -> None:
        self.parts, self.train_parts = as_tuple(self.parts), as_tuple(self.train_parts)
        if self.mode not in MODES:
            raise ValueError(f"--miss_config: mode must be one of {'|'.join(MODES)} (or bone|bat), got {self.mode!r}")
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"--miss_config: r must be a positive integer, got {self.r!r}")
        if not isinstance(self.mini_r, int) or self.mini_r < 1:
            raise ValueError(f"--miss_config: mini_r must be a positive integer, got {self.mini_r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--miss_config: dropout must be in [0, 1), got {self.dropout!r}")
        check_train_parts(self.train_parts, "--miss_config")

    @classmethod
    def from_json(cls, text: str) -> MissConfig:
        """Parse the JSON users write for RWKV-PEFT (``bone`` -> balance, ``bat`` -> bat_col, with a note)."""
        raw = json_fields(cls, text, "--miss_config", _LEGACY_KEYS)
        mode = raw.get("mode", "balance")
        if mode in MODE_ALIASES:
            print(f"note: --miss_config mode {mode!r} is RWKV-PEFT's name for {MODE_ALIASES[mode]!r}")
            raw["mode"] = MODE_ALIASES[mode]
        return cls(**raw)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def miss_shape(out_features: int, in_features: int, cfg: MissConfig) -> tuple[int, ...]:
    """Shape of the adapter tensor for an out x in weight."""
    r = cfg.r
    return {
        "balance": (r, out_features),
        "mini": (r, cfg.mini_r),
        "bat_row": (out_features // r, r, r),
        "bat_col": (in_features // r, r, r),
    }[cfg.mode]


def miss_check(out_features: int, in_features: int, cfg: MissConfig, name: str) -> None:
    """Raise a ValueError naming the module and its shape if ``cfg`` cannot adapt it."""
    where = f"--miss_config: module {name} (weight {out_features}x{in_features}, mode {cfg.mode}, r={cfg.r})"
    if cfg.r > in_features:
        raise ValueError(f"{where}: r must be <= in_features {in_features}")
    if cfg.mode == "mini" and out_features % cfg.mini_r:
        raise ValueError(f"{where}: mini_r={cfg.mini_r} must divide out_features {out_features}")
    if cfg.mode.startswith("bat") and (in_features % cfg.r or out_features % cfg.r):
        raise ValueError(f"{where}: r must divide both in_features and out_features")


def _expand_m(adapter: torch.Tensor, out_features: int, mode: str) -> torch.Tensor:
    """The (r, out) shard matrix M of balance/mini."""
    if mode == "mini":
        return adapter.repeat(1, out_features // adapter.shape[1])
    return adapter


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"MiSS mode must be one of {'|'.join(MODES)}, got {mode!r}")


def _blocks(w: torch.Tensor, r: int) -> torch.Tensor:
    """View an (out, in) matrix as blocks [a, i, b, j] = w[a*r + i, b*r + j]."""
    out_features, in_features = w.shape
    return w.view(out_features // r, r, in_features // r, r)


def _bat_delta(w: torch.Tensor, d: torch.Tensor, mode: str, with_base: bool = False) -> torch.Tensor:
    """Bat dW = blockwise W_ab @ D + D, with D = D_a (bat_row) or D_b (bat_col); W + dW if ``with_base``."""
    r = d.shape[-1]
    wb = _blocks(w, r)
    mul = d + torch.eye(r, dtype=d.dtype, device=d.device) if with_base else d
    if mode == "bat_row":
        dw = torch.einsum("aibj,ajk->aibk", wb, mul) + d[:, :, None, :]
    else:
        dw = torch.einsum("aibj,bjk->aibk", wb, mul) + d.permute(1, 0, 2)[None]
    return dw.reshape(w.shape)


def miss_delta(weight: torch.Tensor, adapter: torch.Tensor, mode: str) -> torch.Tensor:
    """dW (fp32, weight's shape) that the adapter adds to ``weight``."""
    _check_mode(mode)
    w, a = weight.float(), adapter.float()
    out_features, in_features = w.shape
    if mode in ("balance", "mini"):
        return _add_shards_(torch.zeros_like(w), a, mode)
    return _bat_delta(w, a, mode)


def _add_shards_(w: torch.Tensor, adapter: torch.Tensor, mode: str, sign: float = 1.0) -> torch.Tensor:
    """w[o, j] += sign * M[j mod r, o] in place (balance/mini): no dW-sized temporary, which keeps merge fast."""
    m = _expand_m(adapter.float(), w.shape[0], mode)
    u = (m.t() if sign == 1.0 else -m.t()).contiguous()  # a transposed view would make the add ~20x slower
    return _add_tiled_(w, u)


def miss_merge(weight: torch.Tensor, adapter: torch.Tensor, mode: str) -> torch.Tensor:
    """W + dW, computed in fp32 and returned in ``weight``'s dtype."""
    return miss_merge_(weight.to(torch.float32, copy=True), adapter, mode).to(weight.dtype)


def miss_merge_(w: torch.Tensor, adapter: torch.Tensor, mode: str) -> torch.Tensor:
    """W + dW into the fp32 ``w`` itself (the merge's own copy of the weight)."""
    _check_mode(mode)
    if mode in ("balance", "mini"):
        return _add_shards_(w, adapter, mode)
    return w.add_(miss_delta(w, adapter, mode))


def miss_unmerge(merged: torch.Tensor, adapter: torch.Tensor, mode: str) -> torch.Tensor:
    """Recover W from W + dW: subtract for balance/mini; Bat solves W_ab (I + D) = W'_ab - D (in fp64)."""
    return miss_unmerge_(merged.to(torch.float32, copy=True), adapter, mode).to(merged.dtype)


def miss_unmerge_(merged: torch.Tensor, adapter: torch.Tensor, mode: str) -> torch.Tensor:
    """``miss_unmerge`` of the fp32 ``merged``, subtracting in place for balance/mini (Bat returns a new tensor)."""
    _check_mode(mode)
    if mode in ("balance", "mini"):
        return _add_shards_(merged, adapter, mode, -1.0)
    d = adapter.double()
    r = d.shape[-1]
    wb = _blocks(merged.double(), r)
    eye = torch.eye(r, dtype=d.dtype, device=d.device)
    if mode == "bat_row":  # rhs[a, b] = W'_ab - D_a; solve X (I + D_a) = rhs
        rhs = wb.permute(0, 2, 1, 3) - d[:, None]
        w = torch.linalg.solve((eye + d)[:, None], rhs, left=False).permute(0, 2, 1, 3)
    else:  # rhs[b, a] = W'_ab - D_b
        rhs = wb.permute(2, 0, 1, 3) - d[:, None]
        w = torch.linalg.solve((eye + d)[:, None], rhs, left=False).permute(1, 2, 0, 3)
    return w.reshape(merged.shape).float()


def miss_mode(config: dict, suffix: str, adapter: torch.Tensor, where: str, cfg_name: str) -> str:
    """The mode of one linear's MiSS tensor: ``config["mode"]`` (adapter_config.json or ``--mode``; RWKV-PEFT's
    names accepted) or, for an RWKV-PEFT ``.disha`` / ``.bone`` tensor without one, its rank."""
    mode = config.get("mode")
    if mode is None and suffix != "miss":
        mode = "balance" if adapter.dim() == 2 else "bat_col"
    if mode is None:
        raise ValueError(f"{where} is a MiSS adapter but no mode is known: no {cfg_name} with \"mode\" beside it "
                         "and no --mode flag")
    mode = MODE_ALIASES.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"{where}: MiSS mode must be one of {'|'.join(MODES)}, got {mode!r}")
    return mode


def miss_peft_refusal(mode: str | None) -> str:
    return ('MiSS mode bat_col (RWKV-PEFT\'s "bat") has no peft equivalent: peft\'s init_weights "bat" is bat_row'
            if mode == "bat_col" else "")


def miss_to_peft(groups: dict[str, dict[str, torch.Tensor]], cfg: dict, where: str) -> dict:
    """peft's MissConfig fields for MiSS tensors of one mode and one r (peft has one of each per adapter)."""
    found = set()
    for linear, tensors in groups.items():
        ((suffix, t),) = tensors.items()
        mode = miss_mode(cfg, suffix, t, f"{where}: {linear}", cfg.get("_source", "adapter_config.json"))
        found.add((mode, t.shape[-1] if mode.startswith("bat") else t.shape[0], t.shape[1] if mode == "mini" else 1))
    if len(found) > 1:
        raise ValueError(f"{where}: a peft MissConfig has one mode and one r, the adapter has {sorted(found)}")
    ((mode, r, mini_r),) = found
    if miss_peft_refusal(mode):
        raise ValueError(f"{where}: {miss_peft_refusal(mode)}")
    init = next(k for k, v in PEFT_INIT.items() if v == mode)
    return {"r": r, "mini_r": mini_r, "init_weights": init, "miss_dropout": 0.0}


def miss_from_peft(raw: dict, r: int, where: str) -> dict:
    """adapter_config.json's fields from peft's MissConfig (or its older BoneConfig, which had no mini)."""
    kind, init = raw["peft_type"], raw.get("init_weights", True)
    known = {k: v for k, v in PEFT_INIT.items() if kind == "MISS" or k != "mini"}
    mode = known.get(init) if isinstance(init, (bool, str)) else None
    if mode is None:
        raise ValueError(f"{where}: init_weights {init!r} is not a {kind} variant (one of "
                         f"{', '.join(json.dumps(k) for k in known)})")
    return {"method": "miss", "mode": mode, "r": r, "mini_r": raw.get("mini_r", 1) if mode == "mini" else None}


def miss_fold(weight: torch.Tensor, tensors: dict[str, torch.Tensor], config: dict, where: str,
              cfg_name: str) -> Fold:
    """Check one linear's MiSS tensor (``.miss``, or RWKV-PEFT's ``.disha`` / ``.bone``) against its weight.

    The mode comes from ``config["mode"]`` (adapter_config.json or ``--mode``); without one, an
    RWKV-PEFT tensor's rank says it (2-D r x out is balance, 3-D (in/r) x r x r is bat_col).
    """
    if len(tensors) != 1:
        raise ValueError(f"{where}: one MiSS tensor per linear, found {sorted(tensors)}")
    ((suffix, adapter),) = tensors.items()
    where = f"{where}.{suffix}"
    mode = miss_mode(config, suffix, adapter, where, cfg_name)
    out_f, in_f = weight.shape
    want_dim = 3 if mode.startswith("bat") else 2
    if adapter.dim() != want_dim:
        raise ValueError(f"{where}: mode {mode} needs a {want_dim}-D tensor, got shape {tuple(adapter.shape)} "
                         f"(for weight {out_f}x{in_f})")
    cfg = MissConfig(r=adapter.shape[-1] if want_dim == 3 else adapter.shape[0], mode=mode,
                     mini_r=adapter.shape[1] if mode == "mini" else 1)
    try:
        miss_check(out_f, in_f, cfg, where)
    except ValueError as e:
        raise ValueError(str(e).removeprefix("--miss_config: module ")) from None
    expected = miss_shape(out_f, in_f, cfg)
    if tuple(adapter.shape) != expected:
        raise ValueError(f"{where}: shape {tuple(adapter.shape)} does not fit weight {out_f}x{in_f} "
                         f"in mode {mode} (expected {expected})")
    spec = {"mode": mode, "r": cfg.r} | ({"mini_r": cfg.mini_r} if mode == "mini" else {})
    return Fold("miss", spec, lambda w: miss_merge_(w, adapter, mode), lambda w: miss_unmerge_(w, adapter, mode))


def _shard_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    """s = pad(x).view(..., in/r, r).sum(-2): the r-wide shards of x summed."""
    pad = (-x.shape[-1]) % r
    if pad:
        x = F.pad(x, (0, pad))
    return x.unflatten(-1, (-1, r)).sum(-2)


def _add_tiled_(t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """t[..., j] += u[..., j mod w] in place (w = u's width; a trailing partial group uses u's first columns)."""
    n, w = t.shape[-1], u.shape[-1]
    full = n - n % w
    t[..., :full].unflatten(-1, (-1, w)).add_(u.unsqueeze(-2))
    if full < n:
        t[..., full:].add_(u[..., : n - full])
    return t


class ShardSum(torch.autograd.Function):
    """The shard sums of x; linear, so backward saves nothing (the gradient is tiled back)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, r: int) -> torch.Tensor:
        ctx.n = x.shape[-1]
        return _shard_sum(x, r)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _add_tiled_(g.new_zeros(*g.shape[:-1], ctx.n), g), None


class ShardLinear(torch.autograd.Function):
    """balance/mini: y = x W^T + tile(s @ m) with s the r-wide shard sums of x (m: (r, out) or mini's (r, mini_r)).

    Backward needs only s (tokens x r), W and m: dL/dx = g W + tile(g_m m^T), dL/dm = s^T g_m, where
    g_m is g summed over mini's repeats (g itself for balance). x is not saved.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        r, width = m.shape
        x2 = x.reshape(-1, x.shape[-1])
        s = _shard_sum(x2, r)
        y = x2 @ weight.t()
        if width == weight.shape[0]:
            y.addmm_(s, m)  # y + s m in one pass; a zero m adds exact zeros, so step 0 is bit-identical
        else:
            _add_tiled_(y, s @ m)
        ctx.save_for_backward(s, weight, m)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        s, weight, m = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        width = m.shape[1]
        gz = g2 if width == g2.shape[1] else g2.unflatten(-1, (-1, width)).sum(-2)
        gx = gm = None
        if ctx.needs_input_grad[0]:
            gx = _add_tiled_(g2 @ weight, gz @ m.t()).view(*g.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[2]:
            gm = s.t() @ gz
        return gx, None, gm


class BatRowLinear(torch.autograd.Function):
    """y = x (W + dW)^T (or x dW^T without ``with_base``) for bat_row, rebuilding the out x in
    matrix in backward instead of keeping it alive."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, d: torch.Tensor, with_base: bool = True) -> torch.Tensor:
        ctx.save_for_backward(x, weight, d)
        ctx.with_base = with_base
        return F.linear(x, _bat_delta(weight, d, "bat_row", with_base))

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, d = ctx.saved_tensors
        gx = gw = gd = None
        if ctx.needs_input_grad[0]:
            gx = g @ _bat_delta(weight, d, "bat_row", ctx.with_base)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gm = (g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])).to(d.dtype)  # dL/d(matrix)
            gb = _blocks(gm, d.shape[-1])
            if ctx.needs_input_grad[2]:
                gd = torch.einsum("aibj,aibk->ajk", _blocks(weight, d.shape[-1]), gb) + gb.sum(2)
            if ctx.needs_input_grad[1]:
                gw = torch.einsum("aibk,ajk->aibj", gb, d).reshape(gm.shape)
                gw = gw + gm if ctx.with_base else gw
        return gx, gw, gd, None


class BatColLinear(torch.autograd.Function):
    """bat_col without any out x in tensor: with p_b = x_b D_b^T, y = (x + p) W^T + tile(sum_b p_b).

    Backward needs x (for dL/dD), W and D: g_p = (g W)_b + sum over row blocks of g, dL/dx = g W + g_p D,
    dL/dD_b = g_p,b^T x_b.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        nb, r, _ = d.shape
        x2 = x.reshape(-1, x.shape[-1])
        p = torch.bmm(x2.view(-1, nb, r).transpose(0, 1), d.transpose(1, 2))  # (nb, tokens, r)
        z = x2.clone()
        z.view(-1, nb, r).add_(p.transpose(0, 1))
        y = _add_tiled_(z @ weight.t(), p.sum(0))
        ctx.save_for_backward(x2, weight, d)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        x2, weight, d = ctx.saved_tensors
        nb, r, _ = d.shape
        g2 = g.reshape(-1, g.shape[-1])
        gx = g2 @ weight
        gp = (gx.view(-1, nb, r) + g2.unflatten(-1, (-1, r)).sum(-2).unsqueeze(1)).transpose(0, 1)  # (nb, tokens, r)
        gd = torch.bmm(gp.transpose(1, 2), x2.view(-1, nb, r).transpose(0, 1)) if ctx.needs_input_grad[2] else None
        gx.view(-1, nb, r).add_(torch.bmm(gp, d).transpose(0, 1))
        return gx.view(*g.shape[:-1], weight.shape[1]), None, gd


def miss_linear(
    x: torch.Tensor, weight: torch.Tensor, adapter: torch.Tensor, mode: str, dropout: nn.Module | None = None
) -> torch.Tensor:
    """y = x W^T + dropout(x) dW^T without forming dW (balance/mini/bat_col) or keeping it (bat_row).

    balance/mini save only the r-wide shard sums for backward; bat_col transforms x blockwise
    ((x + x_b D_b^T) W^T plus the shard-tiled sum of x_b D_b^T), so no out x in tensor exists at all;
    bat_row builds W + dW in forward and again in backward (one matmul without dropout).
    """
    xa = dropout(x) if dropout is not None and dropout.training else x
    adapter = adapter.to(x.dtype)
    out_features = weight.shape[0]
    if mode in ("balance", "mini"):
        if xa is x and isinstance(weight, torch.Tensor) and not weight.requires_grad:  # quant.QuantWeight: F.linear
            return ShardLinear.apply(x, weight, adapter)
        m = _expand_m(adapter, out_features, mode)
        return F.linear(x, weight) + ShardSum.apply(xa, m.shape[0]) @ m
    if mode == "bat_col":
        if xa is x and isinstance(weight, torch.Tensor) and not weight.requires_grad:
            return BatColLinear.apply(x, weight, adapter)
        r = adapter.shape[-1]
        xb = xa.unflatten(-1, (-1, r))
        p = torch.einsum("...bj,bij->...bi", xb, adapter)  # p_b = x_b D_b^T
        y = F.linear(x + p.reshape(x.shape), weight)
        return (y.view(*y.shape[:-1], -1, r) + p.sum(-2, keepdim=True)).view(y.shape)
    if mode == "bat_row":
        if xa is x:
            return BatRowLinear.apply(x, weight, adapter)
        return F.linear(x, weight) + BatRowLinear.apply(xa, weight, adapter, False)
    _check_mode(mode)
    raise AssertionError


def miss_quant(layer: nn.Module) -> str:
    """Why this MiSS layer cannot keep a quantized base weight ('' if it can)."""
    if getattr(layer, "mode", None) == "bat_row":
        return "MiSS bat_row, whose forward needs the dense base weight; use balance, mini or bat_col with --quant"
    return ""


class MissLinear(Switchable, nn.Module):
    """A frozen nn.Linear weight plus a MiSS adapter ``miss``; parameter names stay checkpoint keys."""

    def __init__(self, base: nn.Linear, cfg: MissConfig, name: str = "linear"):
        super().__init__()
        if base.bias is not None:
            raise ValueError(f"--miss_config: module {name} has a bias; MiSS targets bias-free linears")
        self.out_features, self.in_features = base.weight.shape
        miss_check(self.out_features, self.in_features, cfg, name)
        self.mode, self.r = cfg.mode, cfg.r
        self.weight = base.weight
        self.weight.requires_grad_(False)
        shape = miss_shape(self.out_features, self.in_features, cfg)
        self.miss = nn.Parameter(torch.zeros(shape, dtype=self.weight.dtype, device=self.weight.device))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_off:
            return F.linear(x, self.weight)
        return miss_linear(x, self.weight, self.miss, self.mode, self.dropout)

    def merged_weight(self) -> torch.Tensor:
        return miss_merge(self.weight, self.miss.detach(), self.mode)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, mode={self.mode}, r={self.r}"
