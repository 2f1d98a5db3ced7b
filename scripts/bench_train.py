"""Training-step cost of MiSS vs full fine-tuning vs the frozen model's forward+backward, side by side.

    python scripts/bench_train.py [--n_layer 4 --n_embd 256 --ctx_len 256 --micro_bsz 4 --steps 5]

One process, same model, data and threads for all three; each row is the fastest of --steps interleaved
rounds after a warm-up step. The frozen row (no parameter gradients at all, only activation gradients) is
the floor any adapter method can reach. Goal: a MiSS step <= 0.75x a full fine-tuning step.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from rwkv_peft.model import RWKV7Config, init_model  # noqa: E402
from rwkv_peft.peft import apply_peft, parse_peft_config  # noqa: E402
from rwkv_peft.train import masked_loss  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup(method: str, a: argparse.Namespace):
    """(step function, trainable count) for one method on a fresh copy of the same model."""
    cfg = RWKV7Config(a.n_layer, a.n_embd, a.vocab_size, a.head_size)
    model = init_model(cfg, seed=0, op=a.op)
    if method == "frozen":
        model.requires_grad_(False)
        model.emb.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    else:
        apply_peft(model, method, parse_peft_config(method, a.miss_config if method == "miss" else ""))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, a.vocab_size, (a.micro_bsz, a.ctx_len + 1), generator=g)
    mask = torch.ones(a.micro_bsz, a.ctx_len)

    def step() -> float:
        t0 = time.perf_counter()
        masked_loss(model(idx[:, :-1]), idx[:, 1:], mask).backward()
        if opt is not None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step()  # warm-up: allocators, kernels, optimizer state
    return step, sum(p.numel() for p in params)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--head_size", type=int, default=64)
    p.add_argument("--vocab_size", type=int, default=65536)
    p.add_argument("--ctx_len", type=int, default=256)
    p.add_argument("--micro_bsz", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--op", default="auto")
    p.add_argument("--miss_config", default='{"r":64,"mode":"balance"}')
    a = p.parse_args()
    print(f"RWKV-7 L{a.n_layer} D{a.n_embd} vocab {a.vocab_size}, {a.micro_bsz}x{a.ctx_len} tokens/step, "
          f"op {a.op}, {torch.get_num_threads()} threads, best of {a.steps} interleaved rounds")
    methods = ("frozen", "miss", "full")
    rows = {}
    for m in methods:  # peak RSS only grows: cheapest first, each row shows the peak so far
        rows[m] = dict(zip(("step", "trainable"), setup(m, a), strict=True), method=m, times=[], rss_mb=rss_mb())
    for _ in range(a.steps):  # interleaved rounds, so a busy neighbour slows all methods alike
        for m in methods:
            rows[m]["times"].append(rows[m]["step"]())
    for r in rows.values():  # the fastest round: the least disturbed by other processes
        r["step_s"] = min(r["times"])
        r["tok_s"] = a.micro_bsz * a.ctx_len / r["step_s"]
    full = rows["full"]["step_s"]
    print(f"{'method':<8} {'trainable':>12} {'step s':>8} {'tok/s':>8} {'x full':>7} {'peak RSS MiB':>13}")
    for r in rows.values():
        print(f"{r['method']:<8} {r['trainable']:>12,} {r['step_s']:>8.3f} {r['tok_s']:>8.0f} "
              f"{r['step_s'] / full:>7.2f} {r['rss_mb']:>13.0f}")
    ratio = rows["miss"]["step_s"] / full
    print(f"MiSS step / full fine-tuning step = {ratio:.2f} (goal <= 0.75: {'met' if ratio <= 0.75 else 'NOT met'})")


if __name__ == "__main__":
    main()
