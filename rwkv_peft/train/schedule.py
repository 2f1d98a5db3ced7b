"""Learning-rate schedules as pure functions of the optimizer step, so resuming needs only the step."""

from __future__ import annotations

import math


def lr_at(step: int, total: int, lr_init: float, lr_final: float, warmup: int = 0,
          schedule: str = "cos", decay_frac: float = 0.2) -> float:
    """LR for optimizer step ``step`` (0-based) of ``total``.

    Warmup rises linearly from lr_init/10 over ``warmup`` steps (RWKV-LM's style), then
    ``cos``: cosine from lr_init to lr_final over the remaining steps;
    ``wsd``: constant lr_init, then a linear decay to lr_final over the last ``decay_frac`` of the run;
    ``const``: lr_init throughout.
    """
    if warmup and step < warmup:
        return lr_init * (0.1 + 0.9 * step / warmup)
    if schedule == "const":
        return lr_init
    span = max(total - warmup, 1)
    t = min(max(step - warmup, 0) / max(span - 1, 1), 1.0)
    if schedule == "cos":
        return lr_final + (lr_init - lr_final) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "wsd":
        start = 1.0 - decay_frac
        if t <= start or decay_frac == 0:
            return lr_init
        return lr_init + (lr_final - lr_init) * (t - start) / decay_frac
    raise ValueError(f"--lr_schedule: expected cos|wsd|const, got {schedule!r}")
