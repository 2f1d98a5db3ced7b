"""GRPO rollout throughput: the batched recurrent decoder (``rwkv_peft.rl.rollout``) vs the `rwkv` runtime.

    python scripts/bench_rollout.py [--n_layer 12 --n_embd 768] [--prompts 4 --group 8] [--prompt 64] [--new 64]

One x070 base (init_model, World vocab) is written once to --dir. Ours samples --group completions
of each of --prompts prompts, all of a step's tokens in one batched forward call. The runtime then
generates the same tokens: each prompt is read once, its state copied to each completion, and every
completion's tokens are fed one call per token (the runtime decodes one sequence at a time); the
log-probs of the sampled tokens under the runtime's logits are compared with ours. Best of --rounds;
prints completions/s for both and the ratio (> 1: ours is faster).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import add_size_flags, add_threads_flag, random_base, set_threads  # noqa: E402

from rwkv_peft.cli import ArgumentParser  # noqa: E402
from rwkv_peft.data.tokenizer import get_tokenizer  # noqa: E402
from rwkv_peft.decoder import load_for_generation  # noqa: E402
from rwkv_peft.rl.rollout import rollout  # noqa: E402
from rwkv_peft.runtime import _runtime_env, load_runtime  # noqa: E402


@torch.no_grad()
def runtime_logps(runtime, r, temperature: float) -> torch.Tensor:
    """The runtime feeding each completion of ``r`` token by token; log-probs of those tokens (B, L)."""
    out = torch.zeros_like(r.logps)
    with _runtime_env():
        for p0 in range(0, len(r.prompts), r.group_size):
            logits0, state0 = runtime.forward(r.prompts[p0], None)
            for b in range(p0, p0 + r.group_size):
                logits, state = logits0, [s.clone() for s in state0]
                for t in range(int(r.lengths[b])):
                    tok = int(r.tokens[b, t])
                    out[b, t] = torch.log_softmax(logits.float() / temperature, -1)[tok]
                    logits, state = runtime.forward([tok], state)
    return out


def main() -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    add_size_flags(p, 12, 768)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="max new tokens per completion")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=2)
    add_threads_flag(p)
    p.add_argument("--dir", default="/tmp/bench_generate")
    a = p.parse_args()
    set_threads(a.threads)
    base = random_base(a.dir, a.n_layer, a.n_embd)
    ids = get_tokenizer("world").encode((ROOT / "README.md").read_text())
    prompts = [ids[i * 997 : i * 997 + a.prompt] for i in range(a.prompts)]
    model = load_for_generation(str(base))
    runtime = load_runtime(base, "x070")
    best_ours = best_rt = float("inf")
    for r_i in range(a.rounds):
        t0 = time.perf_counter()
        r = rollout(model, prompts, a.group, a.new, a.temperature, rng=torch.Generator().manual_seed(r_i))
        t1 = time.perf_counter()
        theirs = runtime_logps(runtime, r, a.temperature)
        best_ours, best_rt = min(best_ours, t1 - t0), min(best_rt, time.perf_counter() - t1)
    n = len(r.prompts)
    diff = float(((theirs - r.logps) * r.mask).abs().max())
    print(f"x070 L{a.n_layer} D{a.n_embd} cpu fp32, {torch.get_num_threads()} threads, {a.prompts} prompts x "
          f"{a.group} completions, prompt {a.prompt} tokens, {int(r.lengths.sum())} new tokens, best of {a.rounds}")
    print(f"  ours (batched)    {n / best_ours:7.2f} completions/s  {r.lengths.sum() / best_ours:8.1f} tok/s")
    print(f"  runtime (1 seq)   {n / best_rt:7.2f} completions/s  {r.lengths.sum() / best_rt:8.1f} tok/s")
    print(f"  ours/runtime: {best_rt / best_ours:.2f}x; max |log-prob difference| {diff:.2e}")


if __name__ == "__main__":
    main()
