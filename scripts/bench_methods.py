"""Small-scale reproduction of the MiSS method comparison: pre-train a tiny RWKV-7, fine-tune it with every method.

    python scripts/bench_methods.py --text TEXT.txt --sft GSM8K.jsonl [--quick] [--out results/bench_methods]

1. Pre-train a freshly initialised RWKV-7 on the plain-text corpus (full training through our trainer).
2. Fine-tune that base on the SFT set (split into train / held-out by --seed) with MiSS balance, bat_row,
   bat_col, mini, LoRA, PiSSA and full fine-tuning: same steps, same lr grid, trainable parameters matched
   to MiSS balance where the method allows. Identical base weights (file hash, and every fresh adapter scores
   the base's held-out loss) and identical data (hash of every sample each run drew) are asserted.
3. Report held-out loss over steps, final held-out loss, greedy exact match of `#### N`, step time, peak
   memory and trainable parameters: results.json, table.md and two PNGs in --out.

Each training run is a forked child calling the trainer's main(argv) (no re-import per run; its peak RSS
is measured alone); the parent does no torch compute until every run has finished.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import resource
import sys
import time
import traceback
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked runs tokenize too

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rwkv_peft.data import DEFAULT_SFT_TEMPLATE, DocDataset, GetDataset, render_sft  # noqa: E402
from rwkv_peft.peft.registry import METHODS as REGISTRY  # noqa: E402
from rwkv_peft.peft.registry import saved_buffers  # noqa: E402

WORLD_VOCAB = 65536
END = "<|end|>"  # id 0 of a trained BPE, RWKV's end-of-document token


@dataclass(frozen=True)
class Setting:
    """Sizes of one benchmark run; the presets below, each field overridable by its flag."""

    vocab: int  # 65536: the World tokenizer; smaller: a byte-level BPE trained on the training text
    n_layer: int
    n_embd: int
    ctx_len: int
    micro_bsz: int
    pretrain_steps: int
    pretrain_lr: float
    ft_steps: int
    eval_every: int
    lrs: tuple[float, ...]
    miss_r: int
    mini_r: int
    n_heldout: int
    n_gen: int
    max_new_tokens: int
    n_sft_train: int  # 0: all the rest after the held-out split
    text_chars: int  # 0: the whole corpus
    threads: int  # torch threads in each run (0: torch's default); 1 is fastest for tiny models on a busy CPU


PRESETS = {
    "full": Setting(4096, 2, 128, 192, 4, 600, 3e-3, 100, 20, (1e-3, 3e-3, 1e-2), 16, 8, 64, 32, 160, 0, 0, 1),
    "quick": Setting(1024, 2, 64, 128, 4, 80, 3e-3, 40, 10, (3e-3,), 8, 8, 24, 8, 64, 2000, 300_000, 1),
    "tiny": Setting(320, 1, 64, 64, 2, 4, 3e-3, 4, 2, (3e-3,), 8, 8, 4, 2, 8, 64, 20_000, 1),
}
MISS_MODES = ("balance", "bat_row", "bat_col", "mini")
# MiSS's modes, every registered method that can be matched to a parameter budget, and full fine-tuning
METHODS = (*(f"miss_{m}" for m in MISS_MODES), *(n for n, m in REGISTRY.items() if m.matched), "full")


# ---------------------------------------------------------------- data


def split_sft(path: Path, n_heldout: int, n_train: int, seed: int, out: Path) -> tuple[Path, Path, list[dict]]:
    """Shuffle the SFT records by seed: the first n_heldout are held out, the next n_train (0: all) train."""
    if not path.is_file():
        raise FileNotFoundError(f"--sft {path}: SFT jsonl file not found")
    records = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                r = json.loads(line)
                if not isinstance(r.get("question"), str) or "####" not in str(r.get("answer", "")):
                    raise ValueError(f"--sft {path}:{lineno}: expected question/answer strings, answer ending '#### N'")
                records.append(r)
    if len(records) < n_heldout + 2:
        raise ValueError(f"--sft {path}: {len(records)} records, need more than --n_heldout {n_heldout} + 1")
    order = np.random.default_rng(seed).permutation(len(records))
    held = [records[i] for i in order[:n_heldout]]
    rest = order[n_heldout:] if not n_train else order[n_heldout : n_heldout + n_train]
    files = out / "sft_train.jsonl", out / "sft_heldout.jsonl"
    for file, rows in zip(files, ([records[i] for i in rest], held), strict=True):
        atomic_write(file, "".join(json.dumps(r) + "\n" for r in rows))
    return files[0], files[1], held


def text_chunks(path: Path, max_chars: int) -> list[str]:
    """The corpus as documents (blank-line separated paragraphs, merged up to ~2000 characters)."""
    if not path.is_file():
        raise FileNotFoundError(f"--text {path}: plain-text corpus not found")
    text = path.read_text(encoding="utf-8")[: max_chars or None]
    docs, cur = [], ""
    for para in text.split("\n\n"):
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= 2000:
            docs.append(cur)
            cur = ""
    if cur:
        docs.append(cur)
    if not docs:
        raise ValueError(f"--text {path}: no text")
    return docs


def train_bpe(texts: list[str], vocab: int, out: Path) -> Path:
    """A byte-level BPE with ``vocab`` ids (0 = end of document), trained on training text only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[END], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if tok.token_to_id(END) != 0 or tok.get_vocab_size() > vocab:
        raise RuntimeError(f"BPE: expected {END} at id 0 and <= {vocab} ids")
    path = out / "tokenizer.json"
    tok.save(str(path))
    return path


def prepare_data(args: argparse.Namespace, s: Setting, out: Path) -> dict:
    """Split the SFT set, pick/train the tokenizer, tokenize the corpus into binidx."""
    from rwkv_peft.data.make_binidx import make_binidx

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    train, held, held_records = split_sft(args.sft, s.n_heldout, s.n_sft_train, args.seed, data)
    docs = text_chunks(args.text, s.text_chars)
    if s.vocab == WORLD_VOCAB:
        tokenizer = "world"
    else:
        sft_text = [f"{r['question']}\n{r['answer']}" for r in map(json.loads, train.read_text().splitlines())]
        tokenizer = str(train_bpe(docs + sft_text, s.vocab, data))
    corpus = data / "corpus.jsonl"
    atomic_write(corpus, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    stats = make_binidx(str(corpus), str(data / "corpus"), tokenizer, progress=False)
    return {"sft_train": train, "sft_heldout": held, "heldout_records": held_records, "tokenizer": tokenizer,
            "corpus": data / "corpus", "corpus_tokens": stats.tokens}


# ---------------------------------------------------------------- methods at matched parameters


def target_shapes(base_sd: dict, n_layer: int) -> list[tuple[int, int]]:
    """(out, in) of every linear MiSS/LoRA adapt, from the base checkpoint's tensors."""
    from rwkv_peft.model import RWKV7

    return [tuple(base_sd[f"blocks.{i}.{part}.{name}.weight"].shape)
            for i in range(n_layer) for part, names in RWKV7.peft_targets.items() for name in names]


def method_specs(shapes: list[tuple[int, int]], s: Setting, n_total: int) -> list[dict]:
    """Each method's trainer flags and analytic trainable-parameter count, matched to MiSS balance at r.

    Bat (row/col) has r*out / r*in parameters per linear like balance; the other registered methods get
    the config their registry record matches to balance's count (LoRA/PiSSA/DoRA: the nearest rank);
    mini is the small variant (r*mini_r per linear) by design.
    """
    r = s.miss_r
    bad = [(o, i) for o, i in shapes if o % r or i % r or o % s.mini_r]
    if bad:
        raise ValueError(f"--miss_r {r} / --mini_r {s.mini_r}: must divide every adapted shape, not {bad[0]}")
    specs = [(f"miss_{mode}", "miss", {"r": r, "mode": mode} | ({"mini_r": s.mini_r} if mode == "mini" else {}))
             for mode in MISS_MODES]
    balance = _params("miss", specs[0][2], shapes)
    specs += [(name, name, m.matched(shapes, balance)) for name, m in REGISTRY.items() if m.matched]
    out = [{"name": n, "peft": p, "config": c, "params_expected": _params(p, c, shapes)} for n, p, c in specs]
    return out + [{"name": "full", "peft": "full", "config": {}, "params_expected": n_total}]


def _params(method: str, config: dict, shapes: list[tuple[int, int]]) -> int:
    m = REGISTRY[method]
    return m.params(m.parse(json.dumps(config)), shapes)


def peft_flags(spec: dict) -> list[str]:
    config = json.dumps(spec["config"])
    return [REGISTRY[spec["peft"]].flag, config] if spec["config"] else []


# ---------------------------------------------------------------- running the trainer


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _record_samples(path: Path) -> None:
    """Make every sample the trainer draws append (epoch, index, sha1 of its token ids) to ``path``."""
    for cls in (DocDataset, GetDataset):
        original = cls.__getitem__

        def getitem(self, i, _original=original):
            item = _original(self, i)
            digest = hashlib.sha1(item["input_ids"].numpy().tobytes() + item["mask"].numpy().tobytes()).hexdigest()
            with open(path, "a") as f:
                f.write(f"{self.epoch} {i} {digest}\n")
            return item

        cls.__getitem__ = getitem


def run_forked(module: str, argv: list[str], run_dir: Path, threads: int = 0) -> dict:
    """Run ``module.main(argv)`` in a forked child (log in run_dir/stdout.log); wall time and memory.

    The parent must not have run torch ops before: a fork after OpenMP was used can deadlock the child.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    log, samples, mem = run_dir / "stdout.log", run_dir / "samples.txt", run_dir / "memory.json"
    samples.unlink(missing_ok=True)
    (run_dir / "argv.json").write_text(json.dumps(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            start = _rss_kb("VmRSS")
            if threads:
                import torch

                torch.set_num_threads(threads)
            _record_samples(samples)
            sys.modules[module].main(argv)
            mem.write_text(json.dumps({"rss_start_kb": start, "hwm_kb": _rss_kb("VmHWM")}))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise RuntimeError(f"trainer run in {run_dir} failed (exit {os.waitstatus_to_exitcode(status)}):\n{tail}")
    m = json.loads(mem.read_text())
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024, "peak_over_start_mb": (m["hwm_kb"] - m["rss_start_kb"]) / 1024}


def common_flags(s: Setting, tokenizer: str, seed: int) -> list[str]:
    flags = ["--ctx_len", str(s.ctx_len), "--micro_bsz", str(s.micro_bsz), "--epoch_save", "1",
             "--random_seed", str(seed), "--accelerator", "cpu", "--strategy", "deepspeed_stage_1",
             "--precision", "fp32", "--progress", "0"]
    return flags + ([] if tokenizer == "world" else ["--tokenizer", tokenizer])


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "train_log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the trainer wrote no train_log.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_seconds(log: list[dict], tokens_per_step: int) -> float | None:
    """Median step time from the trainer's log (its per-step tokens/s), skipping the first (warm-up) step."""
    ts = [tokens_per_step / r["tok_s"] for r in log if isinstance(r.get("tok_s"), (int, float)) and r["tok_s"] > 0]
    if not ts:
        ts = [r["step_time"] for r in log if isinstance(r.get("step_time"), (int, float))]
    return float(np.median(ts[1:] if len(ts) > 1 else ts)) if ts else None


def sample_digest(path: Path, epochs: int, per_epoch: int) -> tuple[str, str]:
    """(hash of all samples drawn in the run's epochs, hash of the first batch): the data-order fingerprint."""
    rows = {}
    for line in path.read_text().splitlines():
        e, i, d = line.split()
        if int(e) < epochs and int(i) < per_epoch:
            rows[(int(e), int(i))] = d
    if len(rows) != epochs * per_epoch:
        raise RuntimeError(f"{path}: {len(rows)} distinct samples drawn, expected {epochs} x {per_epoch}")
    ordered = [rows[k] for k in sorted(rows)]
    return hashlib.sha256("".join(ordered).encode()).hexdigest(), ordered[0]


def latest_checkpoint(run_dir: Path) -> Path:
    found = sorted((p for p in run_dir.glob("rwkv-*.pth") if p.stem[5:].isdigit()), key=lambda p: int(p.stem[5:]))
    if not found:
        raise FileNotFoundError(f"{run_dir}: no rwkv-<epoch>.pth written")
    return found[-1]


# ---------------------------------------------------------------- evaluation


def load_adapted(base: Path, spec: dict, adapter: Path | None):
    from rwkv_peft.model import load_model
    from rwkv_peft.peft import apply_peft, load_adapter, parse_peft_config

    model = load_model(str(base), dtype=None)
    apply_peft(model, spec["peft"], parse_peft_config(spec["peft"], json.dumps(spec["config"])))
    if adapter is not None:
        load_adapter(model, adapter)
    return model.float().eval()


def adapter_params(path: Path) -> int:
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sum(v.numel() for k, v in sd.items() if k.rpartition(".")[2] not in saved_buffers())


def generate_answers(model, tokenizer: str, records: list[dict], s: Setting) -> list[str]:
    from rwkv_peft.data import get_tokenizer
    from rwkv_peft.eval import greedy_generate

    tok = get_tokenizer(tokenizer)
    prompts = [tok.encode(render_sft(DEFAULT_SFT_TEMPLATE, ("question", "answer"), r["question"], "")[0])
               for r in records]
    return [tok.decode(ids) for ids in greedy_generate(model, prompts, s.max_new_tokens)]


# ---------------------------------------------------------------- report


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def write_report(res: dict, out: Path) -> None:
    """table.md, results.json and the two plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["methods"]
    base = res["base"]["heldout_loss"]
    lrs = res["setting"]["lrs"]
    head = ("| method | config | trainable params | lr | held-out loss @ first eval | final held-out loss | vs base | "
            "exact match | step time (ms) | peak RSS over start (MB) | "
            + " | ".join(f"final loss @ lr {lr:g}" for lr in lrs) + " |")
    lines = [head, "|" + "---|" * (10 + len(lrs))]
    for r in rows:
        cfg = json.dumps(r["config"]).replace("|", "/") if r["config"] else "-"
        step = f"{r['step_ms']:.0f}" if r["step_ms"] is not None else "n/a"
        by_lr = " | ".join(f"{r['final_loss_by_lr'][str(lr)]:.4f}" for lr in lrs)
        lines.append(f"| {r['name']} | `{cfg}` | {fmt_params(r['trainable_params'])} | {r['lr']:g} | "
                     f"{r['curve'][1][1]:.4f} | {r['final_heldout_loss']:.4f} | "
                     f"{r['final_heldout_loss'] - base:+.4f} | "
                     f"{r['exact_match']:.1%} ({r['exact_hits']}/{r['n_gen']}) | {step} | "
                     f"{r['peak_over_start_mb']:.0f} | {by_lr} |")
    lines.append(f"| base (no fine-tuning) | - | 0 | - | - | {base:.4f} | +0.0000 | "
                 f"{res['base']['exact_match']:.1%} | - | - |" + " - |" * len(lrs))
    atomic_write(out / "table.md", "\n".join(lines) + "\n")
    atomic_write(out / "results.json", json.dumps(res, indent=1) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in rows:
        steps, losses = zip(*r["curve"], strict=True)
        label = f"{r['name']} ({fmt_params(r['trainable_params'])}, lr {r['lr']:g})"
        for ax, first in zip(axes, (0, 1), strict=True):  # right: without step 0, to see the adapters apart
            ax.plot(steps[first:], losses[first:], marker="o", ms=3, label=label)
    for ax, title in zip(axes, ("from the base (step 0)", "zoom: after the first evaluation"), strict=True):
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("held-out loss (answer tokens)")
        ax.set_title(f"Held-out loss vs step, {title}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "heldout_loss_vs_step.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r, marker in zip(rows, "osD^vPX*", strict=False):  # matched methods share an x: tell them by marker
        ax.scatter(r["trainable_params"], r["final_heldout_loss"], marker=marker, s=40, alpha=0.8,
                   label=f"{r['name']}: {r['final_heldout_loss']:.3f} ({fmt_params(r['trainable_params'])})")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("final held-out loss")
    ax.set_title(f"Final held-out loss vs trainable parameters (base: {base:.3f})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "final_loss_vs_params.png", dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Setting]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", type=Path, required=True, help="plain-text corpus for pre-training the base")
    p.add_argument("--sft", type=Path, required=True, help="jsonl with question/answer ('#### N') records")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_methods")
    p.add_argument("--preset", choices=list(PRESETS), default="full")
    p.add_argument("--quick", action="store_true", help="same as --preset quick (CPU, a few minutes)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {','.join(METHODS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trainer", default="rwkv_peft.train", help="module whose main(argv) is the trainer CLI")
    for f in fields(Setting):
        kind = float if f.name in ("pretrain_lr",) else int
        if f.name == "lrs":
            p.add_argument("--lrs", type=lambda t: tuple(float(x) for x in t.split(",")), help="comma list")
        else:
            p.add_argument(f"--{f.name}", type=kind, help=f"override the preset's {f.name}")
    a = p.parse_args(argv)
    s = PRESETS["quick" if a.quick else a.preset]
    s = replace(s, **{f.name: getattr(a, f.name) for f in fields(Setting) if getattr(a, f.name) is not None})
    a.methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in a.methods if m not in METHODS]
    if unknown or not a.methods:
        p.error(f"--methods: unknown {unknown}; expected a comma list from {','.join(METHODS)}")
    if s.ft_steps % s.eval_every or s.pretrain_steps < 1 or s.ft_steps < 1:
        p.error("--ft_steps must be a positive multiple of --eval_every, --pretrain_steps positive")
    if s.n_embd % 64:
        p.error("--n_embd must be a multiple of the head size 64")
    return a, s


def main(argv: list[str] | None = None) -> dict:
    a, s = parse_args(argv)
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    for module in (a.trainer, "rwkv_peft.tools.init_model"):
        importlib.import_module(module)  # once, here: every forked run reuses it
    if a.trainer == "rwkv_peft.train":
        importlib.import_module("rwkv_peft.train.loop").import_deepspeed(False)  # its CPU setup, once
        # lazy imports each run would pay again (~10 s on a busy 2-core machine): deepspeed's optimizer
        # check pulls in torch inductor, the trainer's loss plot pulls in pyplot
        importlib.import_module("deepspeed.runtime.zero.muon.muon_optimizer")
    import matplotlib

    matplotlib.use("Agg")
    importlib.import_module("matplotlib.pyplot")
    import torch

    from rwkv_peft.ops.build import load_cpu

    with torch.device("meta"):  # load_model builds on meta: pay its one-time lazy imports here (no compute)
        torch.nn.Embedding(2, 2)

    try:
        load_cpu()  # build/open the CPU kernel once (no compute), not in every run
    except Exception as e:  # runs fall back to the torch op, as the model's "auto" does
        print(f"note: CPU WKV kernel unavailable ({e})")
    print(f"setting: {asdict(s)}", flush=True)
    data = prepare_data(a, s, out)
    print(f"data: corpus {data['corpus_tokens']} tokens, tokenizer {data['tokenizer']}", flush=True)

    # 1. pre-train the base: full training of a fresh model on the corpus
    init = out / "init.pth"
    init_argv = ["--n_layer", str(s.n_layer), "--n_embd", str(s.n_embd), "--vocab_size", str(s.vocab),
                 "--dtype", "fp32", "--seed", str(a.seed), "--out", str(init)]
    run_forked("rwkv_peft.tools.init_model", init_argv, out / "runs" / "init", s.threads)
    pre_epochs = max(1, math.ceil(s.pretrain_steps / 100))
    pre_steps = math.ceil(s.pretrain_steps / pre_epochs)
    pre_dir = out / "runs" / "pretrain"
    pre = run_forked(a.trainer, ["--load_model", str(init), "--proj_dir", str(pre_dir), "--data_file",
                                  str(data["corpus"]), "--data_type", "binidx", "--dataload", "get", "--peft", "full",
                                  "--epoch_steps", str(pre_steps), "--epoch_count", str(pre_epochs),
                                  "--lr_init", str(s.pretrain_lr), "--lr_final", str(s.pretrain_lr / 10)]
                      + common_flags(s, data["tokenizer"], a.seed), pre_dir, s.threads)
    base = out / "base.pth"
    os.replace(latest_checkpoint(pre_dir), base)
    base_hash = sha256(base)
    pre_log = read_log(pre_dir)
    print(f"pre-trained base: {pre_epochs * pre_steps} steps, {pre['wall_s']:.0f}s, final train loss "
          f"{pre_log[-1].get('loss')}, sha256 {base_hash[:12]}", flush=True)

    # 2. fine-tune with every method and lr, same base file and data
    from rwkv_peft.model import config_from_state_dict, read_state_dict

    base_sd = read_state_dict(base)
    arch = config_from_state_dict(base_sd, str(base))
    specs = [sp for sp in method_specs(target_shapes(base_sd, arch.n_layer), s,
                                       sum(v.numel() for v in base_sd.values())) if sp["name"] in a.methods]
    del base_sd
    epochs = s.ft_steps // s.eval_every
    runs: dict[str, dict[float, dict]] = {}
    for sp in specs:
        for lr in s.lrs:
            if sha256(base) != base_hash:
                raise RuntimeError(f"{base} changed during the benchmark")
            run_dir = out / "runs" / f"{sp['name']}_lr{lr:g}"
            stats = run_forked(a.trainer, ["--load_model", str(base), "--proj_dir", str(run_dir), "--data_file",
                                            str(data["sft_train"]), "--data_type", "sft", "--peft", sp["peft"],
                                            *peft_flags(sp), "--epoch_steps", str(s.eval_every), "--epoch_count",
                                            str(epochs), "--lr_init", str(lr), "--lr_final", str(lr / 10)]
                                + common_flags(s, data["tokenizer"], a.seed), run_dir, s.threads)
            log = read_log(run_dir)
            stats["data_hash"], stats["first_sample"] = sample_digest(run_dir / "samples.txt", epochs,
                                                                      s.eval_every * s.micro_bsz)
            stats["step_s"] = step_seconds(log, s.ctx_len * s.micro_bsz)
            losses = [r["loss"] for r in log if isinstance(r.get("loss"), (int, float))]
            stats["train_loss_tail"] = float(np.mean(losses[-max(1, len(losses) // 4):]))
            runs.setdefault(sp["name"], {})[lr] = stats
            print(f"{sp['name']} lr {lr:g}: {stats['wall_s']:.0f}s, train loss (last quarter) "
                  f"{stats['train_loss_tail']:.4f}", flush=True)
    hashes = {(st["data_hash"], st["first_sample"]) for per in runs.values() for st in per.values()}
    if len(hashes) != 1:
        raise RuntimeError(f"runs drew different data: {len(hashes)} distinct sample fingerprints")

    # 3. evaluate: held-out loss curves (lr chosen by training loss, never by held-out loss), exact match
    from rwkv_peft.data import load_sft
    if s.threads:
        torch.set_num_threads(s.threads)
    from rwkv_peft.eval import exact_match, heldout_loss

    docs, starts, _ = load_sft(str(data["sft_heldout"]), s.vocab, s.ctx_len, data["tokenizer"])
    ds = DocDataset(docs, lambda *_: None, s.ctx_len, len(docs), a.seed, loss_start=starts)
    held = [ds[i] for i in range(len(docs))]
    gen_records = data["heldout_records"][: s.n_gen]
    golds = [r["answer"] for r in gen_records]
    base_model = load_adapted(base, {"peft": "full", "config": {}}, None)
    base_loss = heldout_loss(base_model, held)
    base_em = exact_match(generate_answers(base_model, data["tokenizer"], gen_records, s), golds)
    del base_model
    results = []
    for sp in specs:
        fresh = heldout_loss(load_adapted(base, sp, None), held)
        if not math.isclose(fresh, base_loss, rel_tol=1e-4):
            raise RuntimeError(f"{sp['name']}: a fresh adapter scores {fresh:.6f}, the base {base_loss:.6f}")
        per = runs[sp["name"]]
        lr = min(per, key=lambda k: per[k]["train_loss_tail"])
        run_dir = out / "runs" / f"{sp['name']}_lr{lr:g}"
        curve = [(0, base_loss)]
        for e in range(epochs):
            loss = heldout_loss(load_adapted(base, sp, run_dir / f"rwkv-{e}.pth"), held)
            curve.append(((e + 1) * s.eval_every, loss))
        final_by_lr = {str(k): (curve[-1][1] if k == lr else heldout_loss(
            load_adapted(base, sp, out / "runs" / f"{sp['name']}_lr{k:g}" / f"rwkv-{epochs - 1}.pth"), held))
            for k in per}
        final = load_adapted(base, sp, run_dir / f"rwkv-{epochs - 1}.pth")
        answers = generate_answers(final, data["tokenizer"], gen_records, s)
        em = exact_match(answers, golds)
        n_params = adapter_params(run_dir / f"rwkv-{epochs - 1}.pth")
        if n_params != sp["params_expected"]:
            raise RuntimeError(f"{sp['name']}: adapter has {n_params} parameters, expected {sp['params_expected']}")
        st = per[lr]
        results.append({
            "name": sp["name"], "peft": sp["peft"], "config": sp["config"], "trainable_params": n_params,
            "lr": lr, "curve": curve, "final_heldout_loss": curve[-1][1], "final_loss_by_lr": final_by_lr,
            "train_loss_tail_by_lr": {str(k): v["train_loss_tail"] for k, v in per.items()},
            "exact_match": em, "exact_hits": round(em * len(golds)), "n_gen": len(golds),
            "sample_answer": answers[0] if answers else "",
            "step_ms": None if st["step_s"] is None else 1000 * st["step_s"],
            "run_wall_s": st["wall_s"], "peak_rss_mb": st["peak_rss_mb"],
            "peak_over_start_mb": st["peak_over_start_mb"],
        })
        print(f"{sp['name']}: lr {lr:g}, held-out {curve[-1][1]:.4f} (base {base_loss:.4f}), EM {em:.1%}", flush=True)
    res = {
        "setting": asdict(s), "seed": a.seed, "text": str(a.text), "sft": str(a.sft), "tokenizer": data["tokenizer"],
        "torch_threads": torch.get_num_threads(), "corpus_tokens": data["corpus_tokens"],
        "n_heldout": len(held), "base": {"sha256": base_hash, "heldout_loss": base_loss, "exact_match": base_em,
                                         "pretrain_steps": pre_epochs * pre_steps, "pretrain_wall_s": pre["wall_s"],
                                         "pretrain_final_train_loss": pre_log[-1].get("loss")},
        "identical": {"base_sha256": base_hash, "data_hash": next(iter(hashes))[0],
                      "first_sample_sha1": next(iter(hashes))[1], "fresh_adapter_equals_base_loss": True},
        "methods": results, "wall_s": time.perf_counter() - t_start,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    write_report(res, out)
    print((out / "table.md").read_text())
    print(f"wrote {out}/results.json, table.md, heldout_loss_vs_step.png, final_loss_vs_params.png "
          f"in {res['wall_s']:.0f}s", flush=True)
    return res


if __name__ == "__main__":
    main()
