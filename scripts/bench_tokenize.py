"""Tokens/s of make_binidx (World vocab) vs the `rwkv` package's pure-Python tokenizer.

    python scripts/bench_tokenize.py /work/shared/data/tinyshakespeare.txt

A .txt file is split into documents at blank lines; a .jsonl file is read as is (--field).
Both sides tokenize the same documents in the same run, alternating, best of --repeat
(the machine may be shared); make_binidx is timed end to end (JSON parsing, tokenizing,
writing .bin/.idx), rwkv only on tokenizing, and the tokens are checked equal.
Goal: ratio >= 10.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time

import numpy as np
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

from rwkv_peft.cli import ArgumentParser
from rwkv_peft.data.binidx import BinIdx
from rwkv_peft.data.make_binidx import make_binidx
from rwkv_peft.data.tokenizer import get_tokenizer, world_vocab_path


def read_docs(path: str, field: str) -> list[str]:
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line)[field] for line in f if line.strip()]
    with open(path, encoding="utf-8") as f:
        return [d for d in f.read().split("\n\n") if d]


def main() -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("text", help="a .txt or .jsonl file")
    ap.add_argument("--field", default="text", help="jsonl field with the text")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    args = ap.parse_args()
    docs = read_docs(args.text, args.field)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    print(f"{args.text}: {len(docs)} documents, {n_bytes / 1e6:.2f} MB")

    t = time.perf_counter()
    ref = TRIE_TOKENIZER(world_vocab_path())
    t_ref_load = time.perf_counter() - t
    t = time.perf_counter()
    ours = get_tokenizer("world")
    t_load = time.perf_counter() - t
    # rwkv's trie is ~10^6 Python objects; keep the garbage collector from re-scanning it
    # (and so charging it to whichever side happens to allocate) during the timed runs
    gc.freeze()
    t_ref = t_ours = t_list = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        src, prefix = os.path.join(tmp, "in.jsonl"), os.path.join(tmp, "out")
        with open(src, "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        for _ in range(args.repeat):
            t = time.perf_counter()
            ref_ids = [ref.encode(d) for d in docs]
            t_ref = min(t_ref, time.perf_counter() - t)
            t = time.perf_counter()
            make_binidx(src, prefix, "world", progress=False)
            t_ours = min(t_ours, time.perf_counter() - t)
            t = time.perf_counter()
            for d in docs:
                ours.encode(d)
            t_list = min(t_list, time.perf_counter() - t)
        n_tok = sum(len(x) for x in ref_ids)
        got = BinIdx(prefix)
        want = np.concatenate([np.array(x + [0], dtype=np.int64) for x in ref_ids])
        same = len(got) == len(docs) and np.array_equal(got.tokens.astype(np.int64), want)
        del got

    print(f"vocab load: rwkv {t_ref_load:.2f} s, ours {t_load:.2f} s "
          f"(C trie: {ours.compiled})")
    print(f"rwkv TRIE_TOKENIZER.encode      : {n_tok / t_ref:12,.0f} tokens/s")
    print(f"rwkv_peft encode (list per doc) : {n_tok / t_list:12,.0f} tokens/s  "
          f"ratio {t_ref / t_list:.1f}x")
    print(f"rwkv_peft make_binidx end to end: {n_tok / t_ours:12,.0f} tokens/s  "
          f"ratio {t_ref / t_ours:.1f}x")
    print(f"tokens identical to rwkv: {same}")


if __name__ == "__main__":
    main()
