"""The embedded demo data set: templated arithmetic word problems in GSM8K format.

    python -m rwkv_peft.data.demo --out demo.jsonl --n 3000 --seed 0

Each line is {"question": ..., "answer": ...}; the answer is a short worked solution with
GSM8K's calculator annotations and ends in "#### N". Small numbers and a handful of
templates keep it learnable by a tiny model within minutes, with no download.

    python -m rwkv_peft.data.demo --out pairs.jsonl --n 2000 --preference

writes preference pairs of the same problems instead (TRL's conversational form, for
--data_type preference): the chosen answer is the worked solution, the rejected one computes
with the wrong operations (adds where it should subtract, ...), so its numbers are wrong.
``--prompts`` writes them as prompts for GRPO (--data_type prompts), the solution kept for the reward:
{"prompt": [{"role": "user", "content": question}], "answer": solution}.
"""

from __future__ import annotations

import json
import random
import re
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


WRONG_OP = {"+": "-", "-": "+", "*": "+", "/": "*"}
STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = <<\d+[-+*/]\d+=-?\d+>>-?\d+")


def _wrong(answer: str) -> str:
    """The worked solution with every calculation done with the wrong operation (+ for -, - for +, + for *,
    * for /), and the final answer the last wrong result."""
    last = []

    def swap(m: re.Match) -> str:
        a, op, b = int(m[1]), WRONG_OP[m[2]], int(m[3])
        last.append({"+": a + b, "-": a - b, "*": a * b}[op])
        return f"{a} {op} {b} = <<{a}{op}{b}={last[-1]}>>{last[-1]}"

    work = STEP.sub(swap, answer.rsplit("#### ", 1)[0])
    return f"{work}#### {last[-1]}"


def preference_pairs(n: int, seed: int = 0) -> list[dict]:
    """n pairs: {"prompt": [user question], "chosen": [the solution], "rejected": [a solution that computes
    with the wrong operations]}, the same for the same seed everywhere."""
    return [{"prompt": [{"role": "user", "content": p["question"]}],
             "chosen": [{"role": "assistant", "content": p["answer"]}],
             "rejected": [{"role": "assistant", "content": _wrong(p["answer"])}]} for p in generate(n, seed)]


def prompt_records(n: int, seed: int = 0) -> list[dict]:
    """n GRPO prompts: {"prompt": [user question], "answer": the worked solution ending in '#### N'}."""
    return [{"prompt": [{"role": "user", "content": p["question"]}], "answer": p["answer"]} for p in generate(n, seed)]


def write_demo(path: str, n: int = 3000, seed: int = 0, preference: bool = False, prompts: bool = False) -> None:
    """Write the demo set (or its preference pairs, or its GRPO prompts) as jsonl (temp file, then rename)."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    out = Path(path)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: output directory does not exist (--out {path})")
    records = preference_pairs(n, seed) if preference else prompt_records(n, seed) if prompts else generate(n, seed)
    with files.atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description="Write the embedded GSM8K-style demo set.")
    ap.add_argument("--out", required=True, help="output jsonl path")
    ap.add_argument("--n", type=int, default=3000, help="number of problems")
    ap.add_argument("--seed", type=int, default=0)
    kind = ap.add_mutually_exclusive_group()
    kind.add_argument("--preference", action="store_true", help="write preference pairs (--data_type preference)")
    kind.add_argument("--prompts", action="store_true", help="write prompts for GRPO (--data_type prompts)")
    args = ap.parse_args(argv)
    write_demo(args.out, args.n, args.seed, args.preference, args.prompts)
    what = "preference pairs" if args.preference else "prompts" if args.prompts else "problems"
    print(f"wrote {args.n} {what} to {args.out}")


if __name__ == "__main__":
    main()
