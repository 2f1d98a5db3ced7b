"""Speed and saved-for-backward memory of MiSS layers vs the frozen base and LoRA, measured side by side.

One fp32 CPU linear per shape, forward + backward with the weight frozen and the input requiring
grad (as inside a network). All variants run round-robin in the same process, so machine load
hits them alike; times are medians over repetitions, printed as ratios.

    python scripts/bench_miss.py [--tokens 4096] [--r 64] [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from rwkv_peft.peft.lora import LoraConfig, LoraLinear
from rwkv_peft.peft.miss import MissConfig, MissLinear, _bat_delta

SHAPES = {"att 2048x2048": (2048, 2048), "ffn 2048->7168": (7168, 2048)}  # (out, in)


class NaiveBat(nn.Module):
    """Reference point: Bat through plain autograd on W + dW (what peft does), keeping out x in tensors."""

    def __init__(self, layer: MissLinear):
        super().__init__()
        self.weight, self.miss = layer.weight, layer.miss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight + _bat_delta(self.weight, self.miss, "bat_col"))


def variants(out_features: int, in_features: int, r: int) -> dict[str, nn.Module]:
    """The base and each adapter around the same frozen weight, adapters set to small random values."""
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(in_features, out_features, bias=False)
    base.weight.requires_grad_(False)
    lora_r = max(1, round(r * out_features / (in_features + out_features)))  # balance's parameter count
    layers: dict[str, nn.Module] = {"frozen base": base}
    for mode in ("balance", "mini", "bat_row", "bat_col"):
        layers[mode] = MissLinear(base, MissConfig(r=r, mode=mode, mini_r=r))
    layers["bat_col (naive autograd)"] = NaiveBat(layers["bat_col"])
    layers[f"lora r={lora_r}"] = LoraLinear(base, LoraConfig(r=lora_r, alpha=lora_r))
    base.weight.requires_grad_(False)
    with torch.no_grad():
        for layer in layers.values():
            for p in layer.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return layers


def step(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> None:
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    layer(x).backward(gy)


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(bytes kept for backward beyond the layer's parameters, largest such tensor's numel)."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    storages: dict[int, int] = {}
    largest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
            largest = max(largest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    del y
    return sum(storages.values()), largest


def bench(layers: dict[str, nn.Module], x: torch.Tensor, gy: torch.Tensor, reps: int) -> dict[str, float]:
    names = list(layers)
    for name in names:  # warm-up
        step(layers[name], x, gy)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotate the order each round
            t0 = time.perf_counter()
            step(layers[name], x, gy)
            times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(ts) for n, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, tokens={args.tokens}, r={args.r}")
    for title, (out_features, in_features) in SHAPES.items():
        layers = variants(out_features, in_features, args.r)
        x = torch.randn(args.tokens, in_features, requires_grad=True)
        gy = torch.randn(args.tokens, out_features)
        med = bench(layers, x, gy, args.reps)
        t_base, t_bal = med["frozen base"], med["balance"]
        lora = next(n for n in layers if n.startswith("lora"))
        print(f"\n{title} (weight {out_features}x{in_features}), fwd+bwd median of {args.reps}")
        print(f"{'variant':26s} {'ms':>8s} {'x base':>7s} {'x balance':>9s} {'params':>9s} "
              f"{'saved MiB':>9s} {'out x in saved':>14s}")
        for name, layer in layers.items():
            extra, largest = saved_bytes(layer, x)
            n_params = sum(p.numel() for p in layer.parameters() if p.requires_grad)
            full = "yes" if largest >= out_features * in_features else "no"
            print(f"{name:26s} {1e3 * med[name]:8.1f} {med[name] / t_base:7.3f} {med[name] / t_bal:9.3f} "
                  f"{n_params:9d} {extra / 2**20:9.2f} {full:>14s}")
        over = (t_bal - t_base) / max(med[lora] - t_base, 1e-9)
        bal_saved = saved_bytes(layers["balance"], x)[0]
        print(f"goals: balance/base {t_bal / t_base:.3f} (<= 1.05); "
              f"bat_row/balance {med['bat_row'] / t_bal:.3f}, bat_col/balance {med['bat_col'] / t_bal:.3f} (<= 1.15); "
              f"balance saved {bal_saved} B vs tokens*r*4 = {args.tokens * args.r * 4} B; "
              f"MiSS/LoRA overhead {over:.2f} (<= 0.7)")


if __name__ == "__main__":
    main()
