"""Decoding speed of rwkv_peft.generate vs the official `rwkv` runtime on the same checkpoint (CPU fp32).

    python scripts/bench_generate.py [--n_layer 12 --n_embd 768] [--prompt 512] [--new 64] [--rounds 3]

One x070 base (rwkv_peft.tools.init_model, World vocab) is written once to --dir. Per round, in
one process and interleaved (the machine may be shared): ours reads the prompt in one forward
call, then decodes greedily one token per call (``Decoder``); the runtime does the same with
``model.forward``. Best of ``--rounds``. Prints tokens/s for prompt and decode and ours/runtime
ratios (> 1: ours is faster), and checks both produced the same greedy tokens.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rwkv_peft.data.tokenizer import get_tokenizer  # noqa: E402
from rwkv_peft.generate import Decoder, Sampling, load_for_generation  # noqa: E402
from rwkv_peft.runtime import load_runtime, runtime_generate  # noqa: E402


def ours(model, tok, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    """(prompt seconds, seconds for ``new`` one-token forward calls, greedy tokens)."""
    dec = Decoder(model, tok)
    t0 = time.perf_counter()
    dec.feed(prompt)
    t1 = time.perf_counter()
    g = dec.generate(new + 1, Sampling(temperature=0), stop=(), stop_tokens=())
    return t1 - t0, time.perf_counter() - t1, g.tokens[:new]


def theirs(runtime, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    """The same for the runtime (its generate feeds every generated token: ``new`` calls)."""
    t0 = time.perf_counter()
    runtime_generate(runtime, prompt, 0)
    t1 = time.perf_counter()
    toks = runtime_generate(runtime, prompt, new)
    return t1 - t0, time.perf_counter() - t1 - (t1 - t0), toks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="generated tokens")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--dir", default="/tmp/bench_generate")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    base = d / f"base_L{a.n_layer}_D{a.n_embd}.pth"
    if not base.is_file():
        subprocess.run([sys.executable, "-m", "rwkv_peft.tools.init_model", "--n_layer", str(a.n_layer), "--n_embd",
                        str(a.n_embd), "--vocab_size", "65536", "--dtype", "fp32", "--out", str(base)],
                       cwd=ROOT, check=True)
    tok = get_tokenizer("world")
    text = (ROOT / "README.md").read_text()
    prompt = (tok.encode(text) * (a.prompt // 1000 + 1))[: a.prompt]
    model = load_for_generation(str(base))
    runtime = load_runtime(base, "x070")
    runs = {"ours": lambda: ours(model, tok, prompt, a.new), "runtime": lambda: theirs(runtime, prompt, a.new)}
    best = {name: [float("inf")] * 2 for name in runs}
    tokens = {}
    for r in range(a.rounds):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            t_prompt, t_new, tokens[name] = runs[name]()
            best[name] = [min(best[name][0], t_prompt), min(best[name][1], t_new)]
    print(f"x070 L{a.n_layer} D{a.n_embd} cpu fp32, {torch.get_num_threads()} threads, prompt {a.prompt} tokens, "
          f"{a.new} new, best of {a.rounds}")
    for name, (tp, tn) in best.items():
        print(f"  {name:8s} prompt {a.prompt / tp:8.1f} tok/s   decode {a.new / tn:7.1f} tok/s")
    (op, on), (rp, rn) = best["ours"], best["runtime"]
    same = tokens["ours"] == tokens["runtime"]
    print(f"  ours/runtime speed: prompt {rp / op:.2f}x, decode {rn / on:.2f}x; same greedy tokens: {same}")


if __name__ == "__main__":
    main()
