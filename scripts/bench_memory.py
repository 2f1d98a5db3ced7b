"""Peak memory of one MiSS training step: plain vs infctx, full-precision vs int8 vs nf4 base, plain vs chunked head.

Every configuration runs in its own subprocess, so one cannot inherit another's memory. On CPU
the number is the process's peak resident set (Linux VmHWM) during the step, after the
high-water mark is reset (/proc/self/clear_refs) once the model is built, quantized and its
spare heap handed back: that is model + optimizer + activations, plus the fixed cost of the
interpreter and libraries, which is measured just before the model is built and reported apart.
The children run with glibc's MALLOC_MMAP_THRESHOLD_=65536, so every tensor of 64 KiB or more is
its own mapping and leaves the resident set when freed; with the default (adaptive) threshold,
freed chunk-sized tensors stay in the heap and the peak RSS would measure fragmentation.
On CUDA it is torch.cuda.max_memory_allocated over the step. Ratios are taken over the memory
above that fixed cost, against the full-precision plain step with the plain head. The loss is the
trainer's (masked mean cross-entropy + L2Wrap); ``--head_chunk 0,-1`` compares the plain head (every
logit at once, as before the chunked head) with the chunked one (auto chunk).

    python scripts/bench_memory.py [--ctx_len 4096] [--chunk_ctx 512] [--precision fp32|bf16]
        [--n_layer 6] [--n_embd 512] [--vocab 8192] [--device cpu|cuda] [--head_chunk 0,-1]
    python scripts/bench_memory.py --n_layer 12 --n_embd 768 --vocab 65536 --bases full   # the 0.1B shape
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys

BASES = ("full", "int8", "nf4")
MODES = ("plain", "infctx")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_one(args: argparse.Namespace) -> dict:
    """One configuration in this process: build, adapt, quantize, then measure a training step."""
    import torch

    import rwkv_peft.quant as quant
    from rwkv_peft.model import RWKV7Config, init_model
    from rwkv_peft.peft.inject import apply_peft, parse_peft_config
    from rwkv_peft.train.loss import infctx_loss, masked_loss

    if args.base != "full":
        quant._bnb()  # library import belongs to the fixed cost, not to the model
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    fixed_kib = _rss_kib("VmRSS")

    model = init_model(RWKV7Config(args.n_layer, args.n_embd, args.vocab, 64), seed=0, op=args.op)
    apply_peft(model, "miss", parse_peft_config("miss", json.dumps({"r": args.r, "mode": "balance"})))
    model.to(dtype)
    if args.base != "full":
        quant.quantize_base(model, args.base)
    model.to(args.device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, args.vocab, (1, args.ctx_len + 1), generator=g).to(args.device)
    x, y, mask = idx[:, :-1], idx[:, 1:], torch.ones(1, args.ctx_len, device=args.device)

    def step() -> float:
        if args.mode == "infctx":
            loss = infctx_loss(model, x, y, mask, args.chunk_ctx, args.hc)
        else:
            loss = masked_loss(model, x, y, mask, args.hc)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    with torch.no_grad():  # load the WKV kernel and other lazy state outside the measured step
        model(x[:, :2])
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed fp32 init / pre-quantization pages to the OS
    resting_kib = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
    loss = step()
    out = {"loss": loss, "fixed_mib": fixed_kib / 1024}
    if cuda:
        out |= {"resting_mib": start_bytes / 2**20, "peak_mib": torch.cuda.max_memory_allocated() / 2**20}
        out["fixed_mib"] = 0.0
    else:
        out |= {"resting_mib": resting_kib / 1024, "peak_mib": _rss_kib("VmHWM") / 1024}
    return out


def main() -> None:
    from rwkv_peft.cli import ArgumentParser  # stdlib only: the children's resting RSS stays what it was

    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ctx_len", type=int, default=4096)
    p.add_argument("--chunk_ctx", type=int, default=512)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="compute/adapter dtype; the 'full' base is stored in it")
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--n_embd", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--r", type=int, default=64, help="MiSS rank")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--op", default="auto", help="WKV op (auto: the compiled kernel for the device)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bases", default=",".join(BASES), help=f"comma-separated subset of {','.join(BASES)}")
    p.add_argument("--head_chunk", default="0,-1",
                   help="tokens per chunk of the head + loss, comma separated (0: plain, -1: auto)")
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--hc", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.base:  # child
        print(json.dumps(run_one(args)))
        return

    bases = args.bases.split(",")
    bad = [b for b in bases if b not in BASES]
    if bad:
        p.error(f"--bases: expected a subset of {','.join(BASES)}, got {bad}")
    heads = [int(c) for c in args.head_chunk.split(",")]
    print(f"MiSS (balance, r={args.r}) step, RWKV-7 L{args.n_layer} D{args.n_embd} vocab {args.vocab}, "
          f"ctx_len {args.ctx_len}, {args.precision} compute, {args.device}, op={args.op}; "
          f"infctx chunk {args.chunk_ctx}")
    results = {}
    for mode in MODES:
        for base in bases:
            for hc in heads:
                cmd = [sys.executable, __file__, *sys.argv[1:], "--base", base, "--mode", mode, "--hc", str(hc)]
                env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode:
                    sys.exit(f"{mode}/{base}/head_chunk {hc} failed:\n{proc.stderr[-2000:]}")
                results[mode, base, hc] = json.loads(proc.stdout.strip().splitlines()[-1])

    def step_mib(r: dict) -> float:
        return r["peak_mib"] - r["fixed_mib"]

    ref = step_mib(results["plain", bases[0], heads[0]])
    label = {"full": args.precision}
    head = {0: "plain", -1: "auto"}
    print(f"{'config':>34} {'fixed':>6} {'model+opt':>10} {'step peak':>10} {'ratio':>6} {'loss':>7}   (MiB)")
    for (mode, base, hc), r in results.items():
        name = f"{label.get(base, base)} base, {mode}, {head.get(hc, hc)} head"
        print(f"{name:>34} {r['fixed_mib']:6.0f} {r['resting_mib'] - r['fixed_mib']:10.0f} {step_mib(r):10.0f} "
              f"{step_mib(r) / ref:6.3f} {r['loss']:7.4f}")
    print(f"fixed: interpreter + libraries before the model; model+opt: resting above fixed; step peak: peak above "
          f"fixed; ratio: step peak / that of the {label.get(bases[0], bases[0])} plain step, "
          f"{head.get(heads[0], heads[0])} head")
    for base in bases:
        for hc in heads:
            print(f"infctx/plain, {label.get(base, base)} base, {head.get(hc, hc)} head: "
                  f"{step_mib(results['infctx', base, hc]) / step_mib(results['plain', base, hc]):.3f}")
    for mode in MODES:
        for base in bases[1:]:
            for hc in heads:
                print(f"{base}/{label.get(bases[0], bases[0])} base, {mode}, {head.get(hc, hc)} head: "
                      f"{step_mib(results[mode, base, hc]) / step_mib(results[mode, bases[0], hc]):.3f}")
    for mode in MODES:
        for base in bases:
            for hc in heads[1:]:
                print(f"{head.get(hc, hc)}/{head.get(heads[0], heads[0])} head, {mode}, {label.get(base, base)} base: "
                      f"{step_mib(results[mode, base, hc]) / step_mib(results[mode, base, heads[0]]):.3f}")


if __name__ == "__main__":
    main()
