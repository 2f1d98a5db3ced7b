"""Speed and saved-for-backward memory of MiSS layers vs the frozen base and LoRA, measured side by side.

One fp32 CPU linear per shape, forward + backward with the weight frozen and the input requiring
grad (as inside a network). All variants run round-robin in the same process, so machine load
hits them alike: every variant run sits between two base runs and is timed against their mean
(wall and process CPU time, the latter less disturbed by other processes); medians over rounds.

    python scripts/bench_miss.py [--tokens 4096] [--r 64] [--reps 5] [--threads N]
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from bench_common import add_threads_flag, set_threads
from torch import nn

from rwkv_peft.cli import ArgumentParser
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


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> tuple[int, bool]:
    """(bytes kept for backward beyond the layer's parameters, whether one of them is an out x in matrix)."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    storages: dict[int, int] = {}
    full = False

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal full
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
            full = full or sorted(t.shape[-2:]) == sorted(layer.weight.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    del y
    return sum(storages.values()), full


def timed(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> tuple[float, float]:
    """(wall s, process CPU s) of one forward + backward."""
    w0, c0 = time.perf_counter(), time.process_time()
    step(layer, x, gy)
    return time.perf_counter() - w0, time.process_time() - c0


def bench(layers: dict[str, nn.Module], x: torch.Tensor, gy: torch.Tensor, reps: int) -> dict[str, tuple]:
    """Per variant: (median wall s, median wall ratio to the base, median CPU ratio to the base).

    Each round runs base, v1, base, v2, ..., base (variant order rotated each round); a variant's time
    is divided by the mean of the two base runs around it, so swings of machine load largely cancel.
    """
    base, *others = layers
    for layer in layers.values():  # warm-up
        step(layer, x, gy)
    walls: dict[str, list[float]] = {n: [] for n in layers}
    ratios: dict[str, list[tuple[float, float]]] = {n: [(1.0, 1.0)] for n in layers}
    for rep in range(reps):
        prev = timed(layers[base], x, gy)
        walls[base].append(prev[0])
        for name in others[rep % len(others) :] + others[: rep % len(others)]:
            cur, nxt = timed(layers[name], x, gy), timed(layers[base], x, gy)
            walls[name].append(cur[0])
            walls[base].append(nxt[0])
            ratios[name].append((2 * cur[0] / (prev[0] + nxt[0]), 2 * cur[1] / (prev[1] + nxt[1])))
            prev = nxt
    out = {}
    for n in layers:
        rs = ratios[n][1:] or ratios[n]
        out[n] = (statistics.median(walls[n]), statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
    return out


def main() -> None:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    add_threads_flag(ap)
    args = ap.parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, tokens={args.tokens}, r={args.r}")
    for title, (out_features, in_features) in SHAPES.items():
        layers = variants(out_features, in_features, args.r)
        x = torch.randn(args.tokens, in_features, requires_grad=True)
        gy = torch.randn(args.tokens, out_features)
        res = bench(layers, x, gy, args.reps)
        bal = res["balance"][2]
        lora = next(n for n in layers if n.startswith("lora"))
        print(f"\n{title} (weight {out_features}x{in_features}), fwd+bwd, {args.reps} rounds, "
              f"ratios = median over rounds of time / mean of the base runs just before and after")
        print(f"{'variant':26s} {'wall ms':>8s} {'x base':>7s} {'x base':>7s} {'x balance':>9s} "
              f"{'params':>9s} {'saved MiB':>9s} {'out x in saved':>14s}")
        print(f"{'':26s} {'median':>8s} {'wall':>7s} {'cpu':>7s} {'cpu':>9s}")
        for name, layer in layers.items():
            (wall, r_wall, r_cpu), (extra, has_full) = res[name], saved_bytes(layer, x)
            n_params = sum(p.numel() for p in layer.parameters() if p.requires_grad)
            print(f"{name:26s} {1e3 * wall:8.1f} {r_wall:7.3f} {r_cpu:7.3f} {r_cpu / bal:9.3f} {n_params:9d} "
                  f"{extra / 2**20:9.2f} {'yes' if has_full else 'no':>14s}")
        over = (bal - 1) / max(res[lora][2] - 1, 1e-9)
        bal_saved = saved_bytes(layers["balance"], x)[0]
        print(f"goals (cpu): balance/base {bal:.3f} (<= 1.05); bat_row/balance {res['bat_row'][2] / bal:.3f}, "
              f"bat_col/balance {res['bat_col'][2] / bal:.3f} (<= 1.15); balance saved {bal_saved} B "
              f"(<= tokens*r*4 = {args.tokens * args.r * 4} B); MiSS/LoRA overhead {over:.2f} (<= 0.7)")


if __name__ == "__main__":
    main()
