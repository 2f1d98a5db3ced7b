"""Training-step cost of MiSS, LoRA and full fine-tuning vs the frozen model's forward+backward, side by side.

    python scripts/bench_train.py [--n_layer 4 --n_embd 256 --ctx_len 256 --micro_bsz 4 --steps 5]
    python scripts/bench_train.py --shape 0.1b          # the released 0.1B shape: L12 D768, vocab 65536, ctx 512
    python scripts/bench_train.py --shape 0.1b --methods miss --head_chunk 0,-1   # plain vs chunked head + loss

Each method lives in its own worker process (same model, data and thread count), so the peak RSS
printed is that method's own; the parent drives one step per worker per round (interleaved rounds, so
a busy neighbour slows all methods alike) and keeps each method's fastest round after a warm-up
step. The frozen row (no parameter gradients at all, only activation gradients) is the floor any
adapter method can reach. ``--profile METHOD`` prints torch.profiler's table of the top costs of one
more step of that method. ``--head_chunk 0,-1`` runs every method with the plain head (all logits at
once) and with the chunked one (auto chunk) side by side and prints their ratios. ``--precision
fp32,bf16`` runs every method both ways as the trainer does (bf16: bf16 model, fp32 master copies of
the trainable tensors for AdamW) and prints bf16 / fp32 step time and peak RSS. Each row also gives
its step time over its matmul time (one profiled step: all ops' self CPU time / that of mm, addmm,
addmm_, bmm): the distance to the matmul floor. Goals: a MiSS step <= 0.75x a full fine-tuning step; the
chunked head's step at least 5% faster than the plain one's; bf16 <= 0.6x fp32 on a CPU with native
bf16; step / matmul time <= 1.25.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing
METHODS = ("frozen", "lora", "miss", "full")
# released RWKV-7 shapes (n_layer, n_embd, vocab) with the bench's batch for a 2-core CPU
SHAPES = {"0.1b": {"n_layer": 12, "n_embd": 768, "vocab_size": 65536, "ctx_len": 512, "micro_bsz": 1, "steps": 3}}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")


def setup(method: str, head_chunk: int, precision: str, a: argparse.Namespace):
    """(step function, trainable count) for one method on a fresh copy of the same model."""
    import time

    import torch

    from rwkv_peft.model import RWKV7Config, init_model
    from rwkv_peft.peft import apply_peft, parse_peft_config
    from rwkv_peft.train import masked_loss

    cfg = RWKV7Config(a.n_layer, a.n_embd, a.vocab_size, a.head_size)
    model = init_model(cfg, seed=0, op=a.op)
    if method == "frozen":
        model.requires_grad_(False)
        model.emb.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    else:
        flags = {"miss": a.miss_config, "lora": a.lora_config}
        apply_peft(model, method, parse_peft_config(method, flags.get(method, "")))
    model.train()
    if precision == "bf16":
        model.bfloat16()
    params = [p for p in model.parameters() if p.requires_grad]
    masters = [p.detach().float().clone().requires_grad_() for p in params] if precision == "bf16" else params
    opt = torch.optim.AdamW(masters, lr=1e-4) if params else None
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, a.vocab_size, (a.micro_bsz, a.ctx_len + 1), generator=g)
    mask = torch.ones(a.micro_bsz, a.ctx_len)

    def step() -> tuple[float, float]:
        """(wall, CPU) seconds of one step; CPU time is less sensitive to neighbours on a shared machine."""
        t0, c0 = time.perf_counter(), time.process_time()
        masked_loss(model, idx[:, :-1], idx[:, 1:], mask, head_chunk).backward()
        if opt is not None:
            if masters is not params:  # bf16: the fp32 masters take the gradients, the bf16 copies the update
                for m, p in zip(masters, params, strict=True):
                    m.grad, p.grad = p.grad.float(), None
            torch.nn.utils.clip_grad_norm_(masters, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if masters is not params:
                with torch.no_grad():
                    for m, p in zip(masters, params, strict=True):
                        p.copy_(m)
        return time.perf_counter() - t0, time.process_time() - c0

    step()  # warm-up: allocators, kernels, optimizer state
    return step, sum(p.numel() for p in params)


def profile_table(step, rows: int) -> str:
    """torch.profiler's table of one step, ops sorted by their own CPU time."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def matmul_share(step) -> float:
    """One profiled step's self CPU time over that of its matrix products (>= 1; 1: nothing but matmuls)."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    return sum(e.self_cpu_time_total for e in events) / max(mm, 1e-9)


def worker(method: str, head_chunk: int, precision: str, a: argparse.Namespace, conn) -> None:
    """One method's process: answers "step" with (wall, CPU) seconds, "profile" with a table, "rss" with MiB,
    "matmul" with step / matmul time."""
    step, trainable = setup(method, head_chunk, precision, a)
    conn.send(trainable)
    answers = {"step": step, "profile": lambda: profile_table(step, a.profile_rows), "rss": rss_mb,
               "matmul": lambda: matmul_share(step)}
    while (cmd := conn.recv()) != "stop":
        conn.send(answers[cmd]())


def parse_args() -> argparse.Namespace:
    from rwkv_peft.cli import ArgumentParser  # stdlib only: the workers' RSS stays what it was

    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), help="a released model shape (sets the defaults below)")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--head_size", type=int, default=64)
    p.add_argument("--vocab_size", type=int, default=65536)
    p.add_argument("--ctx_len", type=int, default=256)
    p.add_argument("--micro_bsz", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="interleaved rounds; each method's fastest is kept")
    p.add_argument("--op", default="auto")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--miss_config", default='{"r":64,"mode":"balance"}')
    p.add_argument("--lora_config", default='{"r":32,"alpha":32}')
    p.add_argument("--profile", default="miss", help="method whose step is profiled ('' for none)")
    p.add_argument("--profile_rows", type=int, default=15)
    p.add_argument("--head_chunk", default="-1",
                   help="tokens per chunk of the head + loss, comma separated to compare (0: plain, -1: auto)")
    p.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp32,bf16 (side by side)")
    shape = p.parse_known_args()[0].shape
    if shape:
        p.set_defaults(**SHAPES[shape])  # explicit flags still win
    a = p.parse_args()
    a.methods = a.methods.split(",")
    a.head_chunk = [int(c) for c in a.head_chunk.split(",")]
    a.precision = a.precision.split(",")
    if set(a.precision) - {"fp32", "bf16"}:
        p.error(f"--precision: expected fp32, bf16 or fp32,bf16, got {','.join(a.precision)}")
    bad = [m for m in a.methods if m not in METHODS] + ([a.profile] if a.profile and a.profile not in a.methods else [])
    if bad:
        p.error(f"--methods/--profile: unknown or unselected method(s) {bad}; choose from {','.join(METHODS)}")
    return a


def main() -> None:
    a = parse_args()
    ctx = mp.get_context("spawn")  # fresh interpreters: each worker's peak RSS is its own
    pipes = {}
    for m in a.methods:
        for hc in a.head_chunk:
            for prec in a.precision:
                here, there = ctx.Pipe()
                ctx.Process(target=worker, args=(m, hc, prec, a, there), daemon=True).start()
                pipes[m, hc, prec] = here
    head = {0: "plain", -1: "auto"}
    rows = {k: {"method": k[0], "head": head.get(k[1], str(k[1])), "precision": k[2], "trainable": pipe.recv(),
                "times": []} for k, pipe in pipes.items()}
    import torch  # after the workers started: only for the thread count printed

    print(f"RWKV-7 L{a.n_layer} D{a.n_embd} vocab {a.vocab_size}, {a.micro_bsz}x{a.ctx_len} tokens/step, "
          f"op {a.op}, {torch.get_num_threads()} threads, best of {a.steps} interleaved rounds, one process per method")
    for _ in range(a.steps):
        for k, pipe in pipes.items():
            pipe.send("step")
            rows[k]["times"].append(pipe.recv())
    table = None
    if a.profile:
        pipes[a.profile, a.head_chunk[-1], a.precision[-1]].send("profile")
        table = pipes[a.profile, a.head_chunk[-1], a.precision[-1]].recv()
    for k, pipe in pipes.items():
        for cmd in ("rss", "matmul"):
            pipe.send(cmd)
            rows[k][cmd] = pipe.recv()
        pipe.send("stop")
    for r in rows.values():  # the fastest round: the least disturbed by other processes
        r["step_s"], r["cpu_s"] = min(t[0] for t in r["times"]), min(t[1] for t in r["times"])
        r["tok_s"] = a.micro_bsz * a.ctx_len / r["step_s"]
    report(a, rows, table)


def report(a: argparse.Namespace, rows: dict, table: str | None) -> None:
    print(f"{'method':<8} {'head':>6} {'prec':>5} {'trainable':>12} {'step s':>8} {'cpu s':>8} {'tok/s':>8} "
          f"{'x full':>7} {'step/mm':>8} {'peak RSS MiB':>13}")
    for (m, hc, prec), r in rows.items():
        full = rows.get(("full", hc, prec))
        rel = f"{r['step_s'] / full['step_s']:>7.2f}" if full else f"{'-':>7}"
        print(f"{m:<8} {r['head']:>6} {prec:>5} {r['trainable']:>12,} {r['step_s']:>8.3f} {r['cpu_s']:>8.3f} "
              f"{r['tok_s']:>8.1f} {rel} {r['matmul']:>8.2f} {r['rss']:>13.0f}")
    for hc in a.head_chunk:
        for prec in a.precision:
            if ("full", hc, prec) in rows and ("miss", hc, prec) in rows:
                ratio = rows["miss", hc, prec]["step_s"] / rows["full", hc, prec]["step_s"]
                print(f"MiSS step / full fine-tuning step ({rows['miss', hc, prec]['head']} head, {prec}) = "
                      f"{ratio:.2f} (goal <= 0.75: {'met' if ratio <= 0.75 else 'NOT met'})")
    for m in a.methods:
        for prec in a.precision:
            for hc in a.head_chunk[1:]:
                r, p = rows[m, hc, prec], rows[m, a.head_chunk[0], prec]
                ratio = r["step_s"] / p["step_s"]
                print(f"{m} {prec}: {r['head']} head / {p['head']} head: step time {ratio:.3f} "
                      f"(goal <= 0.95: {'met' if ratio <= 0.95 else 'NOT met'}), CPU time "
                      f"{r['cpu_s'] / p['cpu_s']:.3f}, peak RSS {r['rss'] / p['rss']:.3f}")
        for hc in a.head_chunk if "bf16" in a.precision and "fp32" in a.precision else ():
            r, p = rows[m, hc, "bf16"], rows[m, hc, "fp32"]
            ratio = r["step_s"] / p["step_s"]
            print(f"{m} ({r['head']} head): bf16 / fp32 step time {ratio:.2f} (goal <= 0.6: "
                  f"{'met' if ratio <= 0.6 else 'NOT met'}), CPU time {r['cpu_s'] / p['cpu_s']:.2f}, peak RSS "
                  f"{r['rss'] / p['rss']:.2f}; step / matmul time fp32 {p['matmul']:.2f}, bf16 {r['matmul']:.2f} "
                  f"(goal <= 1.25)")
    if table is not None:
        print(f"\ntop costs of one {a.profile} step ({rows[a.profile, a.head_chunk[-1], a.precision[-1]]['head']} "
              f"head, {a.precision[-1]}; torch.profiler, sorted by self CPU time):")
        print(table)


if __name__ == "__main__":
    main()
