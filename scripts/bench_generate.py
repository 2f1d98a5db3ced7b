"""Decoding speed of rwkv_peft.generate vs the official `rwkv` runtime on the same checkpoint, against
the machine's memory bandwidth, and batched decoding.

    python scripts/bench_generate.py [--n_layer 12 --n_embd 768] [--prompt 512] [--new 64] [--rounds 3]
                                     [--batches 1,4,16] [--threads 0]

One x070 base (rwkv_peft.tools.init_model, World vocab) is written once to --dir. Per round, in one
process and interleaved (the machine may be shared), each contender reads the prompt in one call and
then decodes greedily one token per call: ours with the compiled decode step (``Decoder``: fp32
weights, and the model loaded in bf16), ours through ``forward_state`` (the step it replaced), the
runtime (``cpu fp32``). Best of ``--rounds``. A decode step reads every weight once, so the floor is
bytes per token / memory bandwidth; the bandwidth is measured here as the best rate of a sum over a
1 GiB fp32 buffer with the same threads. Batched: tokens/s of all sequences together when
``Decoder.steps`` decodes B sequences at once (each weight read once per step for all of them).
Prints tokens/s, ratios to the runtime (> 1: ours is faster), bytes/s and the fraction of the
bandwidth, and checks that ours and the runtime produce the same greedy tokens.
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
from rwkv_peft.decoder import Decoder  # noqa: E402
from rwkv_peft.model import load_model  # noqa: E402
from rwkv_peft.runtime import _runtime_env, load_runtime  # noqa: E402


def ours(model, prompt: list[int], new: int, fused: bool = True) -> tuple[float, float, list[int]]:
    """(prompt seconds, seconds for ``new`` one-token steps, greedy tokens); ``fused=False``: forward_state."""
    dec = Decoder(model)
    if not fused:
        dec.stepper = None
    t0 = time.perf_counter()
    dec.feed(prompt)
    t1 = time.perf_counter()
    steps = dec.steps(lambda logits: logits.argmax(-1).tolist())
    toks = [next(steps)[0] for _ in range(new + 1)]  # the last pick reads the new-th token
    return t1 - t0, time.perf_counter() - t1, toks[:new]


def theirs(runtime, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    """The same for the runtime: the prompt in one ``forward`` call, then ``new`` one-token calls."""
    toks = []
    with _runtime_env():  # the package's flags, as runtime_generate sets them
        t0 = time.perf_counter()
        out, state = runtime.forward(list(prompt), None)
        t1 = time.perf_counter()
        for _ in range(new):
            toks.append(int(out.float().reshape(-1).argmax()))
            out, state = runtime.forward([toks[-1]], state)
    return t1 - t0, time.perf_counter() - t1, toks


def batched(model, prompt: list[int], new: int, batch: int) -> tuple[float, float, list[int]]:
    """(0, seconds for ``new`` steps of ``batch`` sequences at once, tokens of the first): as ``ours``."""
    dec = Decoder(model)
    dec.feed_each([prompt] * batch)
    steps = dec.steps(lambda logits: logits.argmax(-1).tolist())
    next(steps)
    t0 = time.perf_counter()
    toks = [next(steps)[0] for _ in range(new)]
    return 0.0, time.perf_counter() - t0, toks


def bandwidth(buf: torch.Tensor) -> tuple[float, float, None]:
    """(0, seconds to read ``buf`` once, None): a sum over it."""
    t0 = time.perf_counter()
    buf.sum()
    return 0.0, time.perf_counter() - t0, None


def step_bytes(model) -> int:
    """Bytes a decode step reads: every matrix and vector of the compiled step, the head, one embedding row."""
    st = Decoder(model).stepper
    tensors = [t for block in st.blocks for t in block if t is not None] + [st.head, *st.ln_out]
    return sum(t.numel() * t.element_size() for t in tensors) + st.emb[0].numel() * st.emb.element_size()


def main() -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    add_size_flags(p, 12, 768)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="generated tokens")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", default="1,4,16", help="sequences decoded at once, comma separated")
    add_threads_flag(p)
    p.add_argument("--dir", default="/tmp/bench_generate")
    a = p.parse_args()
    set_threads(a.threads)
    base = random_base(a.dir, a.n_layer, a.n_embd, "--output_std", "0.02")
    tok = get_tokenizer("world")
    prompt = (tok.encode((ROOT / "README.md").read_text()) * (a.prompt // 1000 + 1))[: a.prompt]
    fp32, bf16 = load_model(str(base)).eval(), load_model(str(base), dtype=torch.bfloat16).eval()
    runtime = load_runtime(base, "x070")
    buf = torch.ones(2**28)
    batches = [int(b) for b in a.batches.split(",")]
    runs = {"runtime fp32": lambda: theirs(runtime, prompt, a.new),
            "ours fp32": lambda: ours(fp32, prompt, a.new),
            "ours fp32 forward_state": lambda: ours(fp32, prompt, a.new, fused=False),
            "ours bf16": lambda: ours(bf16, prompt, a.new),
            "bandwidth": lambda: bandwidth(buf)}
    for b in batches:
        for name, model in (("fp32", fp32), ("bf16", bf16)):
            runs[f"batch {b:2d} {name}"] = lambda model=model, b=b: batched(model, prompt[:16], a.new, b)
    best = {name: [float("inf")] * 2 for name in runs}
    tokens = {}
    for r in range(a.rounds):
        for name in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            t_prompt, t_new, tokens[name] = runs[name]()
            best[name] = [min(best[name][0], t_prompt), min(best[name][1], t_new)]
    report(a, best, tokens, {"fp32": step_bytes(fp32), "bf16": step_bytes(bf16)}, batches, buf)


def report(a, best: dict, tokens: dict, nbytes: dict, batches: list[int], buf: torch.Tensor) -> None:
    gbs = buf.numel() * buf.element_size() / best["bandwidth"][1] / 1e9
    print(f"x070 L{a.n_layer} D{a.n_embd} cpu, {torch.get_num_threads()} threads, prompt {a.prompt} tokens, "
          f"{a.new} new, best of {a.rounds}; memory bandwidth (sum over 1 GiB) {gbs:.1f} GB/s")
    rp, rn = best["runtime fp32"]
    for name in ("runtime fp32", "ours fp32", "ours fp32 forward_state", "ours bf16"):
        tp, tn = best[name]
        size = nbytes["bf16" if "bf16" in name else "fp32"]
        print(f"  {name:24s} prompt {a.prompt / tp:8.1f} tok/s ({rp / tp:4.2f}x runtime)   decode "
              f"{a.new / tn:6.1f} tok/s ({rn / tn:4.2f}x runtime), {size * a.new / tn / 1e9:5.1f} GB/s = "
              f"{size * a.new / tn / 1e9 / gbs:4.0%} of bandwidth ({size / 1e6:.0f} MB per token)")
    for b in batches:
        row = [f"{name} {b * a.new / best[f'batch {b:2d} {name}'][1]:7.1f}" for name in ("fp32", "bf16")]
        print(f"  batched decode, {b:2d} sequences: tokens/s " + ", ".join(row))
    same = tokens["ours fp32"] == tokens["runtime fp32"] == tokens["ours fp32 forward_state"]
    print(f"  same greedy tokens as the runtime: fp32 {same}, bf16 {tokens['ours bf16'] == tokens['runtime fp32']} "
          f"(bf16 rounds the weights: it may part ways)")


if __name__ == "__main__":
    main()
