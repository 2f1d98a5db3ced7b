"""The embedded demo data set: templated arithmetic word problems in GSM8K format.

    python -m rwkv_peft.data.demo --out demo.jsonl --n 3000 --seed 0

Each line is {"question": ..., "answer": ...}; the answer is a short worked solution with
GSM8K's calculator annotations and ends in "#### N". Small numbers and a handful of
templates keep it learnable by a tiny model within minutes, with no download.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from rwkv_peft import files
from rwkv_peft.cli import ArgumentParser

NAMES = [("Tom", "He"), ("Anna", "She"), ("Ben", "He"), ("Lily", "She"), ("Sam", "He"),
         ("Mia", "She"), ("Leo", "He"), ("Zoe", "She"), ("Max", "He"), ("Emma", "She")]
ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "shells", "cards"]
GOODS = ["notebook", "toy car", "sandwich", "ticket", "plant", "ball"]


def _problem(rng: random.Random) -> tuple[str, str]:
    (name, he), (friend, _) = rng.sample(NAMES, 2)
    item, good = rng.choice(ITEMS), rng.choice(GOODS)
    a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 9)
    kind = rng.randrange(8)
    if kind == 0:
        s = a + b
        q = f"{name} has {a} {item}. {he} gets {b} more. How many {item} does {name} have now?"
        w = f"{name} has {a} + {b} = <<{a}+{b}={s}>>{s} {item} now."
    elif kind == 1:
        a, b = max(a, b) + c, min(a, b)
        s = a - b
        q = (f"{name} had {a} {item} and gave {b} of them to {friend}. "
             f"How many {item} does {name} have left?")
        w = f"{name} has {a} - {b} = <<{a}-{b}={s}>>{s} {item} left."
    elif kind == 2:
        s = a * c
        q = (f"{name} buys {a} bags of {item}. Each bag holds {c} {item}. "
             f"How many {item} does {name} buy?")
        w = f"{name} buys {a} * {c} = <<{a}*{c}={s}>>{s} {item}."
    elif kind == 3:
        t, s = a * c, a
        q = (f"{name} shares {t} {item} equally among {c} friends. "
             f"How many {item} does each friend get?")
        w = f"Each friend gets {t} / {c} = <<{t}/{c}={s}>>{s} {item}."
    elif kind == 4:
        t = a + b
        c = rng.randint(1, t - 1)
        s = t - c
        q = (f"{name} has {a} {item} and finds {b} more. Then {he.lower()} gives {c} to "
             f"{friend}. How many {item} does {name} have now?")
        w = (f"After finding more, {name} has {a} + {b} = <<{a}+{b}={t}>>{t} {item}.\n"
             f"After giving some away, {he.lower()} has {t} - {c} = <<{t}-{c}={s}>>{s} {item}.")
    elif kind == 5:
        s = a * c
        q = f"A {good} costs ${a}. {name} buys {c} of them. How many dollars does {name} spend?"
        w = f"{name} spends {c} * {a} = <<{c}*{a}={s}>>{s} dollars."
    elif kind == 6:
        s = a * c
        q = f"{name} reads {a} pages every day. How many pages does {name} read in {c} days?"
        w = f"In {c} days {name} reads {a} * {c} = <<{a}*{c}={s}>>{s} pages."
    else:
        s = a + b
        q = f"{name} is {a} years old. {friend} is {b} years older. How old is {friend}?"
        w = f"{friend} is {a} + {b} = <<{a}+{b}={s}>>{s} years old."
    return q, f"{w}\n#### {s}"


def generate(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n problems, the same for the same seed on every platform (random.Random)."""
    rng = random.Random(seed)
    return [dict(zip(("question", "answer"), _problem(rng), strict=True)) for _ in range(n)]


def write_demo(path: str, n: int = 3000, seed: int = 0) -> None:
    """Write the demo set as jsonl (temp file, then rename)."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    out = Path(path)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: output directory does not exist (--out {path})")
    with files.atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in generate(n, seed):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description="Write the embedded GSM8K-style demo set.")
    ap.add_argument("--out", required=True, help="output jsonl path")
    ap.add_argument("--n", type=int, default=3000, help="number of problems")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    write_demo(args.out, args.n, args.seed)
    print(f"wrote {args.n} problems to {args.out}")


if __name__ == "__main__":
    main()
