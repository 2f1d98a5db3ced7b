"""DPO's step vs SFT's at the same shape: the free reference (adapter switched off) should cost <= 1.3x.

    python scripts/bench_dpo.py [--n_layer 4 --n_embd 256 --vocab_size 65536 --ctx_len 256 --pairs 2 --steps 5]

Both run the objectives the trainer runs (``--objective lm`` on 2 x pairs sequences, ``--objective dpo``
on ``pairs`` pairs, i.e. the same 2 x pairs sequences of ctx_len tokens) on the same MiSS-adapted model
with AdamW, each in its own worker process, so the peak RSS (CPU) or peak allocated CUDA memory is that
objective's own; rounds interleave the workers (a busy neighbour slows both alike) and each keeps its
fastest step after a warm-up. The weights in memory are counted too: DPO holds no second copy.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing

from bench_common import add_size_flags  # noqa: E402


def worker(objective: str, a: argparse.Namespace, conn) -> None:
    import time

    import torch

    from rwkv_peft.model import VERSIONS, init_model
    from rwkv_peft.peft import apply_peft, parse_peft_config
    from rwkv_peft.train.config import TrainConfig
    from rwkv_peft.train.objectives import Context, get_objective, objective_options

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = init_model(VERSIONS["x070"].config(a.n_layer, a.n_embd, a.vocab_size, 64), seed=0, op=a.op).to(device)
    apply_peft(model, "miss", parse_peft_config("miss", '{"r":32}'))
    model.grad_cp = bool(a.grad_cp)  # per-block recompute in backward: a reference forward weighs less
    with torch.no_grad():  # a trained adapter: the reference pass differs from the policy's
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 1e-3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cfg = TrainConfig(objective=objective, data_type="preference" if objective == "dpo" else "chat",
                      head_chunk=a.head_chunk)
    obj = get_objective(objective).build(Context(model, model, cfg, objective_options(objective, {}), device))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, a.vocab_size, (2 * a.pairs, a.ctx_len + 1), generator=g).to(device)
    mask = torch.ones(2 * a.pairs, a.ctx_len, device=device)
    mask[:, : a.ctx_len // 4] = 0  # a prompt
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "mask": mask}
    if objective == "dpo":  # (pairs, 2, T): chosen, rejected
        batch = {k: v.view(2, a.pairs, -1).transpose(0, 1) for k, v in batch.items()}
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    while conn.recv():
        t0 = time.perf_counter()
        loss, _ = obj.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        conn.send((time.perf_counter() - t0, peak, weights / 2**20))


def main() -> None:
    from rwkv_peft.cli import ArgumentParser  # stdlib only: the workers' peak memory stays what it was

    ap = ArgumentParser(description=__doc__.splitlines()[0])
    add_size_flags(ap, 4, 256)
    ap.add_argument("--vocab_size", type=int, default=65536)
    ap.add_argument("--ctx_len", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=2, help="DPO pairs per step; SFT gets twice as many sequences")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--head_chunk", type=int, default=-1)
    ap.add_argument("--grad_cp", type=int, default=0)
    ap.add_argument("--op", default="auto")
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    workers = {}
    for name in ("lm", "dpo"):
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(name, a, theirs), daemon=True)
        proc.start()
        workers[name] = (proc, mine)
    best = {name: (float("inf"), 0.0, 0.0) for name in workers}
    for step in range(a.steps + 1):  # step 0 warms up
        for name, (_, conn) in workers.items():
            conn.send(True)
            dt, peak, weights = conn.recv()
            if step:
                best[name] = (min(best[name][0], dt), peak, weights)
    for _, conn in workers.values():
        conn.send(False)
    print(f"shape: L{a.n_layer} D{a.n_embd} vocab {a.vocab_size}, {2 * a.pairs} x {a.ctx_len} tokens per step, "
          "MiSS r=32")
    for name, (dt, peak, weights) in best.items():
        label = "SFT (lm)" if name == "lm" else "DPO"
        print(f"{label:9s} step {dt * 1000:8.1f} ms  peak memory {peak:8.1f} MiB  weights+buffers {weights:7.1f} MiB")
    (t_sft, m_sft, w_sft), (t_dpo, m_dpo, w_dpo) = best["lm"], best["dpo"]
    print(f"DPO / SFT: step time {t_dpo / t_sft:.2f}x (goal <= 1.3x), peak memory {m_dpo / m_sft:.2f}x, "
          f"weights {w_dpo / w_sft:.2f}x")


if __name__ == "__main__":
    main()
