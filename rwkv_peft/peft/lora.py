"""LoRA and PiSSA baselines: y = x W^T + s * (x A^T) B^T with s = alpha / r.

PiSSA starts A, B from a randomised low-rank SVD of W and keeps the residual W - s * B0 A0 frozen
in ``weight``; B0, A0 stay as buffers (saved with the adapter) so a merge from the original base
is W - s * B0 A0 + s * B A with no SVD at merge time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rwkv_peft.peft.config import Fold, Switchable, as_tuple, check_train_parts, json_fields

PISSA_BUFFERS = ("pissa_A0", "pissa_B0")  # PiSSA's initial factors, saved with the adapter
PEFT_SUFFIXES = {"LORA": {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B",
                          "lora_magnitude_vector": "lora_magnitude_vector"}}  # DoRA's magnitude included
_PEFT_PLAIN_INIT = (True, False, None, "gaussian")  # other init_lora_weights (pissa, olora, ...) change the base

# RWKV-PEFT's lora_config / pissa_config key names
_LEGACY_KEYS = {
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_load": "load",
    "pissa_r": "r",
    "pissa_load": "load",
    "svd_niter": "pissa_niter",
}


@dataclass
class LoraConfig:
    """LoRA / PiSSA settings, as given by ``--lora_config '{"r":32,"alpha":32}'``."""

    r: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    parts: tuple[str, ...] = ("att", "ffn")
    train_parts: tuple[str, ...] = ()
    load: str = ""
    pissa: bool = False
    pissa_niter: int = 4

    def __post_init__(self) -> None:
        self.parts, self.train_parts = as_tuple(self.parts), as_tuple(self.train_parts)
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"--lora_config: r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"--lora_config: alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora_config: dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.pissa_niter, int) or self.pissa_niter < 0:
            raise ValueError(f"--lora_config: pissa_niter must be an integer >= 0, got {self.pissa_niter!r}")
        check_train_parts(self.train_parts, "--lora_config")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @classmethod
    def from_json(cls, text: str, pissa: bool = False) -> LoraConfig:
        """Parse ``--lora_config`` JSON (RWKV-PEFT's ``lora_r``/``pissa_r``/``svd_niter`` keys accepted)."""
        raw = json_fields(cls, text, "--lora_config", _LEGACY_KEYS)
        raw.setdefault("pissa", pissa)
        return cls(**raw)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """dW = s * B A in fp32; used by the layer's merge and by rwkv_peft.merge alike."""
    return scale * (lora_b.float() @ lora_a.float())


def lora_factors(weight: torch.Tensor, tensors: dict[str, torch.Tensor], config: dict, where: str, cfg_name: str,
                 extra: dict[str, tuple[int, ...]] | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(lora_A, lora_B, alpha / r) of one linear's adapter, every tensor's shape checked against the weight.

    ``extra``: the shapes of further tensors the method saves beside A and B (PiSSA's, DoRA's);
    alpha comes from ``config`` (adapter_config.json or ``--lora_alpha``).
    """
    if "lora_A" not in tensors or "lora_B" not in tensors:
        raise ValueError(f"{where}: needs both .lora_A and .lora_B, found {sorted(tensors)}")
    out_f, in_f = weight.shape
    r = tensors["lora_A"].shape[0]
    expect = {"lora_A": (r, in_f), "lora_B": (out_f, r)} | (extra or {})
    for s, t in tensors.items():
        if tuple(t.shape) != expect[s]:
            raise ValueError(f"{where}.{s}: shape {tuple(t.shape)} does not fit weight {out_f}x{in_f} "
                             f"(expected {expect[s]} for r={r})")
    if config.get("r") not in (None, r):
        raise ValueError(f"{where}: {cfg_name} says r={config['r']} but lora_A has r={r}")
    if config.get("alpha") is None:
        raise ValueError(f"{where}: LoRA needs alpha: no {cfg_name} with \"alpha\" and no --lora_alpha flag")
    return tensors["lora_A"], tensors["lora_B"], float(config["alpha"]) / r


def lora_fold(weight: torch.Tensor, tensors: dict[str, torch.Tensor], config: dict, where: str,
              cfg_name: str) -> Fold:
    """Check one linear's LoRA (or PiSSA: with its initial factors) tensors; merge adds s B A (- s B0 A0)."""
    pissa = [s for s in PISSA_BUFFERS if s in tensors]
    if len(pissa) == 1:
        raise ValueError(f"{where}: needs both .pissa_A0 and .pissa_B0, found {sorted(tensors)}")
    if config.get("method") == "pissa" and not pissa:
        raise ValueError(f"{where}: PiSSA adapter without .pissa_A0/.pissa_B0 (the initial factors)")
    out_f, in_f = weight.shape
    r = tensors["lora_A"].shape[0] if "lora_A" in tensors else 0
    a, b, scale = lora_factors(weight, tensors, config, where, cfg_name,
                               {"pissa_A0": (r, in_f), "pissa_B0": (out_f, r)})

    def delta() -> torch.Tensor:
        d = lora_delta(a, b, scale)
        return d - lora_delta(tensors["pissa_A0"], tensors["pissa_B0"], scale) if pissa else d  # trained on W - s B0 A0

    spec = {"r": a.shape[0], "alpha": config["alpha"]}
    return Fold("pissa" if pissa else "lora", spec, lambda w: w.add_(delta()), lambda w: w.sub_(delta()))


def lora_to_peft(groups: dict[str, dict[str, torch.Tensor]], cfg: dict, where: str, dora: bool = False) -> dict:
    """peft's LoraConfig fields (scale lora_alpha / r, as ours) for LoRA or DoRA tensors of one r."""
    ranks = {t["lora_A"].shape[0] for t in groups.values() if "lora_A" in t}
    if len(ranks) != 1:
        raise ValueError(f"{where}: a peft LoraConfig has one r, the adapter has {sorted(ranks)}")
    if cfg.get("alpha") is None:
        raise ValueError(f"{where}: LoRA needs alpha: no adapter_config.json with \"alpha\" and no --lora_alpha flag")
    alpha = float(cfg["alpha"])
    return {"r": ranks.pop(), "lora_alpha": int(alpha) if alpha.is_integer() else alpha, "use_dora": dora,
            "use_rslora": False, "lora_dropout": 0.0, "init_lora_weights": True, "fan_in_fan_out": False}


def lora_from_peft(raw: dict, r: int, where: str, method: str, dora: bool) -> dict | None:
    """adapter_config.json's fields (ours: the scale is alpha / r) from peft's LoraConfig; None when its
    use_dora is not ``dora`` (the other method's folder)."""
    if bool(raw.get("use_dora")) != dora:
        return None
    if raw.get("init_lora_weights", True) not in _PEFT_PLAIN_INIT:
        raise ValueError(f"{where}: init_lora_weights={raw['init_lora_weights']!r} trains against a changed base "
                         "model; save it with peft's path_initial_model_for_weight_conversion (a plain LoRA)")
    alpha = raw.get("lora_alpha", 8)
    if raw.get("use_rslora"):  # peft scales by alpha / sqrt(r); ours is alpha / r
        alpha = alpha * math.sqrt(r)
    return {"method": method, "r": r, "alpha": alpha}


def pissa_factors(weight: torch.Tensor, r: int, scale: float, niter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) with s * B0 A0 = the rank-r part of W from a randomised SVD (fixed seed, so reproducible)."""
    w = weight.float()
    q = min(r + 8, *w.shape)  # a little oversampling makes the leading r directions accurate
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(w, q=q, niter=niter)
    root = (s[:r] / scale).sqrt()
    # contiguous: DeepSpeed broadcasts parameters as byte views, which a transposed layout refuses
    return (root[:, None] * v[:, :r].t()).contiguous(), (u[:, :r] * root[None, :]).contiguous()


class LoraLinear(Switchable, nn.Module):
    """A frozen nn.Linear weight plus ``lora_A`` (r, in) and ``lora_B`` (out, r)."""

    def __init__(self, base: nn.Linear, cfg: LoraConfig, name: str = "linear", pissa: bool = False):
        super().__init__()
        if base.bias is not None:
            raise ValueError(f"--lora_config: module {name} has a bias; LoRA here targets bias-free linears")
        out_features, in_features = base.weight.shape
        if cfg.r > min(out_features, in_features):
            raise ValueError(
                f"--lora_config: module {name} (weight {out_features}x{in_features}): r={cfg.r} must be "
                f"<= min(out, in) = {min(out_features, in_features)}"
            )
        self.r, self.scale, self.pissa = cfg.r, cfg.scale, pissa
        w = base.weight
        kw = {"dtype": w.dtype, "device": w.device}
        if pissa:
            if w.device.type != "meta" and not bool(w.detach().any()):
                raise ValueError(
                    f"--peft pissa: module {name}: its weight is all zeros (a freshly initialised base, not a "
                    "pre-trained one?): PiSSA starts from its principal components, which are zero, so neither it "
                    "nor what feeds it gets a gradient; fine-tune a pre-trained base, or use --peft lora / miss"
                )
            a0, b0 = pissa_factors(w.detach(), cfg.r, cfg.scale, cfg.pissa_niter)
            self.weight = nn.Parameter((w.detach().float() - lora_delta(a0, b0, cfg.scale)).to(w.dtype))
            self.register_buffer("pissa_A0", a0.to(**kw, copy=True))  # not aliased with lora_A
            self.register_buffer("pissa_B0", b0.to(**kw, copy=True))
            self.lora_A = nn.Parameter(a0.to(**kw))
            self.lora_B = nn.Parameter(b0.to(**kw))
        else:
            self.weight = w
            self.lora_A = nn.Parameter(torch.empty(cfg.r, in_features, **kw))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear / peft
            self.lora_B = nn.Parameter(torch.zeros(out_features, cfg.r, **kw))
        self.weight.requires_grad_(False)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter_off:
            return self.base_forward(x)
        return F.linear(x, self.weight) + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base linear's output: PiSSA's residual weight plus its initial factors, else the weight."""
        y = F.linear(x, self.weight)
        if self.pissa:
            y = y + self.scale * F.linear(F.linear(x, self.pissa_A0), self.pissa_B0)
        return y

    @torch.no_grad()
    def load_buffers(self, saved: dict[str, torch.Tensor]) -> None:
        """Adopt saved PiSSA factors: the residual becomes W - s * B0 A0 for the loaded B0, A0."""
        a0, b0 = saved["pissa_A0"].to(self.pissa_A0), saved["pissa_B0"].to(self.pissa_B0)
        w = self.weight.float() + lora_delta(self.pissa_A0, self.pissa_B0, self.scale)
        self.weight.copy_(w - lora_delta(a0, b0, self.scale))
        self.pissa_A0.copy_(a0)
        self.pissa_B0.copy_(b0)

    def merged_weight(self) -> torch.Tensor:
        return (self.weight.float() + lora_delta(self.lora_A.detach(), self.lora_B.detach(), self.scale)).to(
            self.weight.dtype
        )

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, pissa={self.pissa}"
