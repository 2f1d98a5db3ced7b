"""Small-scale reproduction of the MiSS method comparison, strong enough to decide: seeds, tuned lrs, paired tests.

    python scripts/bench_methods.py --text TEXT.txt --sft GSM8K.jsonl [--quick] [--out DIR] [--cache DIR]
    python scripts/bench_methods.py --report DIR/results.json      # tables, plots and verdicts again

1. Base: a fresh RWKV-7 pre-trained by our trainer on the plain text plus the SFT *training* records as plain
   text (question, worked answer), so it knows the domain's tokens before fine-tuning; cached by a content hash
   of everything that determines it (--cache, outside the repository).
2. Fine-tuning on the SFT set (held-out split fixed by --split_seed) with MiSS balance, bat_row, bat_col, mini,
   LoRA, PiSSA and full fine-tuning at matched trainable parameters. Each method's lr grid grows (x3 down or up)
   until its best lr (by training loss, never held-out loss) is interior; then --seeds seeds (adapter init and
   data order) at that lr. Identical base (file hash; every fresh adapter scores the base's held-out loss) and
   identical samples per seed (every sample each run drew is fingerprinted) are asserted.
3. Held-out loss per sample at every evaluation step, greedy exact match, a paired test per claim, and time per
   step / peak memory from a separate side-by-side run (methods interleaved round by round).

Every run is a forked child (training through the trainer's train(), evaluation through heldout_loss and
rwkv_peft.scoring), so the parent never computes with torch and each child's memory is its own. A finished run
leaves result.json / eval.json beside its outputs and is not redone when the benchmark is started again with
the same --out.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked runs tokenize too

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rwkv_peft import files  # noqa: E402
from rwkv_peft.cli import ArgumentParser  # noqa: E402
from rwkv_peft.data import DEFAULT_SFT_TEMPLATE, render_sft  # noqa: E402
from rwkv_peft.peft.registry import METHODS as REGISTRY  # noqa: E402
from rwkv_peft.peft.registry import saved_buffers  # noqa: E402

WORLD_VOCAB = 65536
END = "<|end|>"  # id 0 of a trained BPE, RWKV's end-of-document token


@dataclass(frozen=True)
class Setting:
    """Sizes of one benchmark; the presets below, each field overridable by its flag."""

    vocab: int  # 65536: the World tokenizer; smaller: a byte-level BPE trained on the training text
    n_layer: int
    n_embd: int
    ctx_len: int
    micro_bsz: int
    pretrain_steps: int
    pretrain_lr: float
    ft_steps: int
    eval_every: int
    lrs: tuple[float, ...]  # the adapters' starting lr grid
    full_lrs: tuple[float, ...]  # full fine-tuning's starting lr grid
    max_grid: int  # most lrs one method's grid may grow to
    seeds: int  # training seeds per method at its chosen lr (adapter init + data order)
    miss_r: int
    mini_r: int
    n_heldout: int
    n_gen: int
    max_new_tokens: int
    n_sft_train: int  # 0: all the rest after the held-out split
    text_chars: int  # 0: the whole corpus
    threads: int  # torch threads in each run (0: torch's default); 1 is fastest for tiny models on a busy CPU
    time_steps: int  # steps per run of the side-by-side timing
    time_rounds: int  # interleaved rounds of the side-by-side timing


PRESETS = {
    "full": Setting(4096, 4, 256, 192, 4, 600, 3e-3, 40, 20, (3e-3, 1e-2, 3e-2), (3e-4, 1e-3, 3e-3), 6, 3,
                    16, 16, 64, 32, 128, 0, 0, 1, 8, 2),
    "quick": Setting(1024, 2, 64, 128, 4, 60, 3e-3, 20, 10, (3e-3, 1e-2), (1e-3, 3e-3), 3, 2,
                     8, 8, 24, 8, 48, 2000, 300_000, 1, 4, 1),
    "tiny": Setting(320, 1, 64, 64, 2, 4, 3e-3, 4, 2, (1e-3, 3e-3), (1e-3, 3e-3), 3, 2,
                    8, 8, 4, 2, 8, 64, 20_000, 1, 3, 1),
}
MISS_MODES = ("balance", "bat_row", "bat_col", "mini")
# MiSS's modes, every registered method that can be matched to a parameter budget, and full fine-tuning
METHODS = (*(f"miss_{m}" for m in MISS_MODES), *(n for n, m in REGISTRY.items() if m.matched), "full")
# the claims' methods first (a run cut short still decides the main ones), full fine-tuning last
RUN_ORDER = ("miss_balance", "lora", "pissa", "miss_bat_row", "miss_mini", "miss_bat_col")
# (claim, method, reference, what is compared): the claim is "method's held-out loss is below reference's"
CLAIMS = (
    ("MiSS beats LoRA at equal parameters", "miss_balance", "lora", "final"),
    ("MiSS converges faster than LoRA (first evaluation)", "miss_balance", "lora", "first"),
    ("MiSS beats PiSSA at equal parameters", "miss_balance", "pissa", "final"),
    ("Bat beats balance (bat_row, peft's \"bat\")", "miss_bat_row", "miss_balance", "final"),
    ("Bat beats balance (bat_col, RWKV-PEFT's \"bat\")", "miss_bat_col", "miss_balance", "final"),
    ("mini at ~4 % of balance's parameters stays below balance (paper: 38.0 % vs 48.7 %)", "miss_balance",
     "miss_mini", "final"),
    ("MiSS beats DoRA at about equal parameters (DoRA adds a magnitude per output)", "miss_balance", "dora",
     "final"),
)
ALPHA = 0.05


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
    paths = out / "sft_train.jsonl", out / "sft_heldout.jsonl"
    for path, rows in zip(paths, ([records[i] for i in rest], held), strict=True):
        files.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return paths[0], paths[1], held


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
    with files.atomic_path(path) as tmp:  # another benchmark process sharing --out may be reading it
        tok.save(str(tmp))
    return path


def prepare_data(args: argparse.Namespace, s: Setting, out: Path) -> dict:
    """Split the SFT set; the pre-training corpus = the text plus the SFT training records; tokenizer; binidx."""
    from rwkv_peft.data.make_binidx import make_binidx

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    train, held, held_records = split_sft(args.sft, s.n_heldout, s.n_sft_train, args.split_seed, data)
    sft_text = [f"{r['question']}\n{r['answer']}" for r in map(json.loads, train.read_text().splitlines())]
    docs = text_chunks(args.text, s.text_chars) + sft_text  # never a held-out record
    tokenizer = "world" if s.vocab == WORLD_VOCAB else str(train_bpe(docs, s.vocab, data))
    corpus = data / "corpus.jsonl"
    files.write_text(corpus, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    stats = make_binidx(str(corpus), str(data / "corpus"), tokenizer, progress=False)
    return {"sft_train": train, "sft_heldout": held, "heldout_records": held_records, "tokenizer": tokenizer,
            "corpus": data / "corpus", "corpus_tokens": stats.tokens, "n_text_docs": len(docs) - len(sft_text),
            "n_sft_docs": len(sft_text)}


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


# ---------------------------------------------------------------- forked runs


def sha256_of(*paths: Path, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for path in paths:
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


def fork_call(fn: Callable[[], dict], run_dir: Path, threads: int) -> dict:
    """``fn()`` in a forked child (stdout/stderr to run_dir/stdout.log); its result plus wall time and memory.

    The parent must not have run torch ops before: a fork after OpenMP was used can deadlock the child.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    log, ret = run_dir / "stdout.log", run_dir / f"child.{os.getpid()}.json"  # one per benchmark process
    ret.unlink(missing_ok=True)
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
            result = fn()
            result["peak_over_start_mb"] = (_rss_kb("VmHWM") - start) / 1024
            files.write_text(ret, json.dumps(result))
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
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise RuntimeError(f"run in {run_dir} failed (exit {code}):\n{tail}")
    result = json.loads(ret.read_text())
    ret.unlink()
    return {**result, "wall_s": time.perf_counter() - t0, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def cached(run_dir: Path, name: str, key: dict, compute: Callable[[], dict]) -> dict:
    """run_dir/name if it was written for the same key (a finished run), else compute() and write it."""
    path = run_dir / name
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("key") == key:
            return old
    result = {**compute(), "key": key}
    files.write_text(path, json.dumps(result))
    return result


class RecordingDataset:
    """The trainer's dataset, unchanged, fingerprinting every sample it hands out (epoch, index, sha1)."""

    def __init__(self, ds, path: Path):
        self.ds, self.path = ds, path
        path.unlink(missing_ok=True)

    def set_epoch(self, epoch: int) -> None:
        self.ds.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        item = self.ds[i]
        digest = hashlib.sha1(item["input_ids"].numpy().tobytes() + item["mask"].numpy().tobytes()).hexdigest()
        with open(self.path, "a") as f:
            f.write(f"{self.ds.epoch} {i} {digest}\n")
        return item


def train_run(argv: list[str], run_dir: Path) -> Callable[[], dict]:
    """The trainer on argv, its data set wrapped in a RecordingDataset (samples.txt in run_dir)."""

    def run() -> dict:
        from rwkv_peft.data import build_dataset
        from rwkv_peft.model import config_from_state_dict, read_state_dict
        from rwkv_peft.train.config import parse_args
        from rwkv_peft.train.recipe import train

        cfg = parse_args(argv)
        vocab = config_from_state_dict(read_state_dict(cfg.load_model), cfg.load_model).vocab_size
        ds = build_dataset(cfg.data_file, cfg.data_type, cfg.dataload, cfg.ctx_len, vocab,
                           cfg.epoch_steps * cfg.accumulate_grad_batches * cfg.micro_bsz, cfg.random_seed,
                           tokenizer=cfg.tokenizer, sft_field=cfg.sft_field, sft_template=cfg.sft_template or None,
                           magic_prime=cfg.magic_prime)
        train(cfg, dataset=RecordingDataset(ds, run_dir / "samples.txt"))
        return {}

    return run


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
    return float(np.median(ts[1:] if len(ts) > 1 else ts)) if ts else None


def sample_digest(path: Path, epochs: int, per_epoch: int) -> tuple[str, str]:
    """(hash of all samples drawn in the run's epochs, hash of the first sample): the data-order fingerprint."""
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


# ---------------------------------------------------------------- base (cached by content hash)


def pretrained_base(a: argparse.Namespace, s: Setting, data: dict, out: Path) -> tuple[Path, str, dict]:
    """The pre-trained base: from --cache if a run with the same inputs finished before, else trained now."""
    recipe = {k: getattr(s, k) for k in ("vocab", "n_layer", "n_embd", "ctx_len", "micro_bsz", "pretrain_steps",
                                         "pretrain_lr")}
    corpus = Path(str(data["corpus"]))
    tok = [Path(data["tokenizer"])] if data["tokenizer"] != "world" else []
    key = sha256_of(corpus.with_suffix(".bin"), corpus.with_suffix(".idx"), *tok,
                    extra=json.dumps({**recipe, "seed": a.base_seed}, sort_keys=True))[:16]
    cache = a.cache.resolve() / key
    base, meta = cache / "base.pth", cache / "base.json"
    if base.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        if sha256_of(base) == info["sha256"]:
            print(f"base: cached {base} (sha256 {info['sha256'][:12]})", flush=True)
            return base, info["sha256"], info
    work = out / "runs" / "pretrain"
    shutil.rmtree(work, ignore_errors=True)
    init = work / "init.pth"
    init_argv = ["--n_layer", str(s.n_layer), "--n_embd", str(s.n_embd), "--vocab_size", str(s.vocab),
                 "--dtype", "fp32", "--seed", str(a.base_seed), "--out", str(init)]
    init_main = importlib.import_module("rwkv_peft.tools.init_model").main
    fork_call(lambda: init_main(init_argv) or {}, work / "init", s.threads)
    epochs = max(1, math.ceil(s.pretrain_steps / 100))
    steps = math.ceil(s.pretrain_steps / epochs)
    argv = ["--load_model", str(init), "--proj_dir", str(work), "--data_file", str(corpus), "--data_type", "binidx",
            "--dataload", "get", "--peft", "full", "--epoch_steps", str(steps), "--epoch_count", str(epochs),
            "--lr_init", str(s.pretrain_lr), "--lr_final", str(s.pretrain_lr / 10)]
    st = fork_call(train_run(argv + common_flags(s, data["tokenizer"], a.base_seed), work), work, s.threads)
    log = read_log(work)
    info = {"sha256": sha256_of(latest_checkpoint(work)), "recipe": recipe, "steps": epochs * steps,
            "tokens": epochs * steps * s.ctx_len * s.micro_bsz, "wall_s": st["wall_s"],
            "final_train_loss": log[-1].get("loss"), "cache_key": key,
            "train_loss_curve": [(r["step"], r["loss"]) for r in log if isinstance(r.get("loss"), (int, float))]}
    cache.mkdir(parents=True, exist_ok=True)
    files.copy_file(latest_checkpoint(work), base)
    files.write_text(meta, json.dumps(info))
    print(f"base: pre-trained {info['steps']} steps in {st['wall_s']:.0f}s, final train loss "
          f"{info['final_train_loss']:.3f}, cached {base}", flush=True)
    return base, info["sha256"], info


# ---------------------------------------------------------------- fine-tuning: adaptive lr grid, then seeds


def lr_key(lr: float) -> str:
    return f"{lr:.3g}"


def fine_tune(a, s: Setting, data: dict, base: Path, base_hash: str, sp: dict, lr: float, seed: int,
              out: Path) -> dict:
    """One fine-tuning run (cached); its training-loss tail, samples fingerprint and log step time.

    A run the trainer stops for NaN/inf losses is recorded as diverged, not fatal; any other failure is.
    """
    if sha256_of(base) != base_hash:
        raise RuntimeError(f"{base} changed during the benchmark")
    run_dir = out / "runs" / sp["name"] / f"lr{lr_key(lr)}_s{seed}"
    epochs = s.ft_steps // s.eval_every
    argv = ["--load_model", str(base), "--proj_dir", str(run_dir), "--data_file", str(data["sft_train"]),
            "--data_type", "sft", "--peft", sp["peft"], *peft_flags(sp), "--epoch_steps", str(s.eval_every),
            "--epoch_count", str(epochs), "--lr_init", str(lr), "--lr_final", str(lr / 10)]
    argv += common_flags(s, data["tokenizer"], seed)

    fresh = []

    def compute() -> dict:
        fresh.append(True)
        for old in run_dir.glob("rwkv-*.pth"):
            old.unlink()
        try:
            st = fork_call(train_run(argv, run_dir), run_dir, s.threads)
        except RuntimeError:
            if "NaN/inf" not in (run_dir / "stdout.log").read_text(errors="replace"):
                raise
            print(f"  {sp['name']} lr {lr:g} seed {seed}: stopped on NaN/inf losses (diverged)", flush=True)
            return {"diverged": True, "train_loss_tail": math.inf}
        log = read_log(run_dir)
        losses = [r["loss"] for r in log if isinstance(r.get("loss"), (int, float))]
        data_hash, first = sample_digest(run_dir / "samples.txt", epochs, s.eval_every * s.micro_bsz)
        tail = float(np.mean(losses[-max(1, len(losses) // 4):])) if losses else math.inf
        return {"diverged": not math.isfinite(tail), "train_loss_tail": tail, "data_hash": data_hash,
                "first_sample": first, "log_step_s": step_seconds(log, s.ctx_len * s.micro_bsz),
                "wall_s": st["wall_s"], "train_loss_curve": [(r["step"], r["loss"]) for r in log if "loss" in r]}

    res = cached(run_dir, "result.json", {"argv": argv, "base": base_hash}, compute)
    print(f"  {sp['name']} lr {lr:g} seed {seed}: train loss (last quarter) {res['train_loss_tail']:.4f}"
          f"{'' if fresh else ' (finished before)'}", flush=True)
    return {**res, "run_dir": str(run_dir), "lr": lr, "seed": seed}


def tune_lr(a, s: Setting, data: dict, base: Path, base_hash: str, sp: dict, out: Path) -> dict:
    """Grow the grid x3 past an edge winner until the best lr (by training loss, seed 0) is interior."""
    grid = sorted(s.full_lrs if sp["peft"] == "full" else s.lrs)
    runs: dict[str, dict] = {}
    while True:
        for lr in grid:
            if lr_key(lr) not in runs:
                runs[lr_key(lr)] = fine_tune(a, s, data, base, base_hash, sp, lr, 0, out)
        best = min(grid, key=lambda x: runs[lr_key(x)]["train_loss_tail"])
        low, high = best == grid[0], best == grid[-1]
        if not (low or high) or len(grid) >= s.max_grid:
            break
        grid = ([float(lr_key(grid[0] / 3))] if low else []) + grid + ([float(lr_key(grid[-1] * 3))] if high else [])
    status = "interior" if not (low or high) else f"at the {'lower' if low else 'upper'} edge (grid cap {s.max_grid})"
    print(f"{sp['name']}: grid {[float(lr_key(x)) for x in grid]}, chosen lr {best:g} ({status})", flush=True)
    return {"grid": grid, "lr": best, "status": status, "runs": runs}


# ---------------------------------------------------------------- evaluation (forked, cached per run)


def heldout_samples(data: dict, s: Setting) -> list[dict]:
    from rwkv_peft.data import DocDataset, load_sft

    docs, starts, _ = load_sft(str(data["sft_heldout"]), s.vocab, s.ctx_len, data["tokenizer"])
    ds = DocDataset(docs, lambda *_: None, s.ctx_len, len(docs), 0, loss_start=starts)
    return [ds[i] for i in range(len(docs))]  # DocDataset's first epoch visits every document once


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
    from rwkv_peft.scoring import greedy_generate

    tok = get_tokenizer(tokenizer)
    prompts = [tok.encode(render_sft(DEFAULT_SFT_TEMPLATE, ("question", "answer"), r["question"], "")[0])
               for r in records]
    return [tok.decode(ids) for ids in greedy_generate(model, prompts, s.max_new_tokens)]


def evaluate_base(data: dict, s: Setting, base: Path, base_hash: str, out: Path) -> dict:
    """The base's per-sample held-out losses and greedy answers."""

    def compute() -> dict:
        from rwkv_peft.train.loss import heldout_sums

        model = load_adapted(base, {"peft": "full", "config": {}}, None)
        sums, counts = heldout_sums(model, heldout_samples(data, s))
        answers = generate_answers(model, data["tokenizer"], data["heldout_records"][: s.n_gen], s)
        return {"sums": sums, "counts": counts, "answers": answers}

    run_dir = out / "runs" / "base_eval"
    key = {"base": base_hash, "n_gen": s.n_gen, "n_heldout": s.n_heldout}
    return cached(run_dir, "eval.json", key, lambda: fork_call(compute, run_dir, s.threads))


def check_fresh_adapter(data: dict, s: Setting, base: Path, base_hash: str, sp: dict, base_loss: float,
                        out: Path) -> None:
    """A freshly initialised adapter (PiSSA's residual included) must score the base's held-out loss."""

    def compute() -> dict:
        from rwkv_peft.train.loss import heldout_loss

        return {"loss": heldout_loss(load_adapted(base, sp, None), heldout_samples(data, s))}

    run_dir = out / "runs" / sp["name"]
    key = {"base": base_hash, "config": sp["config"], "n_heldout": s.n_heldout}
    fresh = cached(run_dir, "fresh.json", key, lambda: fork_call(compute, run_dir / "fresh", s.threads))["loss"]
    if not math.isclose(fresh, base_loss, rel_tol=1e-4):
        raise RuntimeError(f"{sp['name']}: a fresh adapter scores {fresh:.6f}, the base {base_loss:.6f}")


def evaluate_run(data: dict, s: Setting, sp: dict, run: dict, base: Path, base_hash: str) -> dict:
    """Per-sample held-out loss sums of every checkpoint of a run, and the final one's greedy answers."""
    run_dir = Path(run["run_dir"])
    epochs = s.ft_steps // s.eval_every

    def compute() -> dict:
        from rwkv_peft.train.loss import heldout_sums

        held = heldout_samples(data, s)
        sums = {str((e + 1) * s.eval_every): heldout_sums(load_adapted(base, sp, run_dir / f"rwkv-{e}.pth"), held)[0]
                for e in range(epochs)}
        final = run_dir / f"rwkv-{epochs - 1}.pth"
        answers = generate_answers(load_adapted(base, sp, final), data["tokenizer"],
                                   data["heldout_records"][: s.n_gen], s)
        return {"sums": sums, "answers": answers, "trainable_params": adapter_params(final)}

    key = {"train": run["key"], "base": base_hash, "n_gen": s.n_gen, "n_heldout": s.n_heldout}
    res = cached(run_dir, "eval.json", key, lambda: fork_call(compute, run_dir / "eval", s.threads))
    if res["trainable_params"] != sp["params_expected"]:
        raise RuntimeError(f"{sp['name']}: adapter has {res['trainable_params']} parameters, "
                           f"expected {sp['params_expected']}")
    return res


# ---------------------------------------------------------------- side-by-side timing


def time_methods(s: Setting, data: dict, base: Path, base_hash: str, specs: list[dict], out: Path) -> dict:
    """Each method's median step time and peak memory over --time_rounds interleaved rounds of short runs (cached).

    Every method runs at the middle lr of its starting grid: the lr does not change what a step costs, and the
    timing then needs no tuned lr (it can run beside the training processes with --timing_only).
    """
    names = [sp["name"] for sp in specs]
    key = {"base": base_hash, "methods": names, "steps": s.time_steps, "rounds": s.time_rounds, "threads": s.threads}
    path = out / "timing" / "timing.json"
    if path.is_file():  # a timing of more methods than these serves too: one run timed them side by side
        old = json.loads(path.read_text())
        if {**old["key"], "methods": names} == key and set(names) <= set(old["key"]["methods"]):
            return {n: old[n] for n in names}
    res = cached(out / "timing", "timing.json", key, lambda: _time_methods(s, data, base, specs, out))
    return {n: res[n] for n in names}


def _time_methods(s: Setting, data: dict, base: Path, specs: list[dict], out: Path) -> dict:
    per: dict[str, dict[str, list]] = {sp["name"]: {"step_s": [], "peak_over_start_mb": []} for sp in specs}
    lrs = {sp["name"]: sorted(s.full_lrs if sp["peft"] == "full" else s.lrs)[len(s.lrs) // 2] for sp in specs}
    for r in range(s.time_rounds):
        for sp in (specs if r % 2 == 0 else specs[::-1]):  # alternate the order: no method always runs first
            run_dir = out / "timing" / f"{sp['name']}_r{r}"
            shutil.rmtree(run_dir, ignore_errors=True)
            argv = ["--load_model", str(base), "--proj_dir", str(run_dir), "--data_file", str(data["sft_train"]),
                    "--data_type", "sft", "--peft", sp["peft"], *peft_flags(sp), "--epoch_steps", str(s.time_steps),
                    "--epoch_count", "1", "--lr_init", str(lrs[sp["name"]]), "--lr_final",
                    str(lrs[sp["name"]])] + common_flags(s, data["tokenizer"], 0)
            st = fork_call(train_run(argv, run_dir), run_dir, s.threads)
            per[sp["name"]]["step_s"].append(step_seconds(read_log(run_dir), s.ctx_len * s.micro_bsz))
            per[sp["name"]]["peak_over_start_mb"].append(st["peak_over_start_mb"])
            shutil.rmtree(run_dir, ignore_errors=True)
    return {name: {"step_ms": 1000 * float(np.median(v["step_s"])), "step_ms_rounds": [1000 * x for x in v["step_s"]],
                   "peak_over_start_mb": float(np.max(v["peak_over_start_mb"]))} for name, v in per.items()}


# ---------------------------------------------------------------- statistics and verdicts


def t_test_p(d: np.ndarray) -> tuple[float, float]:
    """Two-sided one-sample t-test of mean(d) == 0: (t, p). Student's t via mpmath's incomplete beta."""
    import mpmath

    n = len(d)
    sd = float(np.std(d, ddof=1)) if n > 1 else 0.0
    if n < 2 or sd == 0.0:
        return (math.copysign(math.inf, float(np.mean(d))) if np.mean(d) else 0.0), (0.0 if np.mean(d) else 1.0)
    t = float(np.mean(d)) / (sd / math.sqrt(n))
    df = n - 1
    p = float(mpmath.betainc(df / 2, 0.5, 0, df / (df + t * t), regularized=True))
    return t, p


def compare(method: dict, reference: dict, point: str, tokens: float) -> dict:
    """Paired comparison "method below reference": over seeds (loss per seed) and over held-out samples.

    Seeds pair by data order (seed s of every method drew the same samples); samples pair by record, using
    each sample's loss summed over its answer tokens and averaged over the seeds (the pooled held-out loss
    is their sum over all tokens, so this tests exactly the reported difference).
    """
    key = "first" if point == "first" else "final"
    a = np.array(method[f"{key}_sums_by_seed"])  # seeds x samples
    b = np.array(reference[f"{key}_sums_by_seed"])
    n = min(len(a), len(b))
    per_seed = (a[:n].sum(1) - b[:n].sum(1)) / tokens
    t_seed, p_seed = t_test_p(per_seed)
    d_sample = (a[:n] - b[:n]).mean(0)
    t_sample, p_sample = t_test_p(d_sample)
    se_sample = float(np.std(d_sample, ddof=1)) * math.sqrt(len(d_sample)) / tokens  # of the pooled difference
    diff = float(per_seed.mean())
    if p_seed < ALPHA and p_sample < ALPHA and (per_seed < 0).all():
        verdict = "supported"
    elif p_seed < ALPHA and p_sample < ALPHA and (per_seed > 0).all():
        verdict = "contradicted"
    else:
        verdict = "inconclusive"
    return {"diff": diff, "per_seed_diff": per_seed.tolist(), "seeds": n, "t_seed": t_seed, "p_seed": p_seed,
            "t_sample": t_sample, "p_sample": p_sample, "n_samples": int(a.shape[1]), "se_sample": se_sample,
            "verdict": verdict}


def claims_table(methods: dict[str, dict], tokens: float) -> list[dict]:
    rows = []
    for claim, m, ref, point in CLAIMS:
        if m in methods and ref in methods:
            rows.append({"claim": claim, "method": m, "reference": ref, "point": point,
                         **compare(methods[m], methods[ref], point, tokens)})
        else:
            missing = ", ".join(x for x in (m, ref) if x not in methods)
            rows.append({"claim": claim, "method": m, "reference": ref, "point": point,
                         "verdict": f"not run ({missing} not in this benchmark)"})
    return rows


# ---------------------------------------------------------------- report


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def fmt_p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def report_markdown(res: dict) -> str:
    """The tables of docs/benchmarks.md: methods (mean ± std over seeds), lr grids, claims with verdicts."""
    base = res["base"]["heldout_loss"]
    lines = ["| method | config | trainable params | chosen lr | lr grid (final) | held-out loss @ first eval "
             "| final held-out loss (mean ± std) | per seed | exact match | step time (ms) "
             "| peak memory over start (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["methods"]:
        cfg = json.dumps(r["config"]).replace("|", "/") if r["config"] else "-"
        grid = ", ".join(f"{lr:g}" + ("*" if lr == r["lr"] else "") for lr in r["grid"])
        t = res["timing"].get(r["name"], {})
        lines.append(
            f"| {r['name']} | `{cfg}` | {fmt_params(r['trainable_params'])} | {r['lr']:g} | {grid}"
            f"{'' if r['grid_status'] == 'interior' else ' (' + r['grid_status'] + ')'} | "
            f"{r['first_mean']:.4f} ± {r['first_std']:.4f} | **{r['final_mean']:.4f} ± {r['final_std']:.4f}** | "
            f"{', '.join(f'{x:.4f}' for x in r['final_by_seed'])} | {r['exact_hits']}/{r['n_gen_total']} | "
            f"{t.get('step_ms', float('nan')):.0f} | {t.get('peak_over_start_mb', float('nan')):.0f} |")
    lines.append(f"| base (no fine-tuning) | - | 0 | - | - | - | {base:.4f} | - | "
                 f"{res['base']['exact_hits']}/{res['base']['n_gen']} | - | - |")
    lines += ["", "Training loss (mean over the last quarter of steps, seed 0) at every lr of each method's final grid "
              "(the lr is chosen by this, never by held-out loss; `div` = diverged):", "",
              "| method | " + " | ".join(["lr: train loss"]) + " |", "|---|---|"]
    for r in res["methods"]:
        cells = ", ".join(f"{lr}: {'div' if not math.isfinite(v) else f'{v:.4f}'}"
                          for lr, v in sorted(r["train_loss_by_lr"].items(), key=lambda kv: float(kv[0])))
        lines.append(f"| {r['name']} | {cells} |")
    lines += ["", "| claim | compared | difference in held-out loss (mean over seeds; < 0 favours the claim) "
              "| per seed | paired t over seeds (t, p) | paired t over held-out samples (t, p) | verdict |",
              "|---|---|---|---|---|---|---|"]
    for c in res["claims"]:
        if "diff" not in c:
            lines.append(f"| {c['claim']} | {c['method']} vs {c['reference']} | - | - | - | - | {c['verdict']} |")
            continue
        at = "first eval" if c["point"] == "first" else "final"
        lines.append(f"| {c['claim']} | {c['method']} − {c['reference']} ({at}) | {c['diff']:+.4f} | "
                     f"{', '.join(f'{x:+.4f}' for x in c['per_seed_diff'])} | {c['t_seed']:.2f}, "
                     f"{fmt_p(c['p_seed'])} (n={c['seeds']}) | {c['t_sample']:.2f}, {fmt_p(c['p_sample'])} "
                     f"(n={c['n_samples']}) | **{c['verdict']}** |")
    return "\n".join(lines) + "\n"


def write_report(res: dict, out: Path) -> None:
    """results.json, table.md and three plots: curves and final losses (error bars: std over seeds), claims."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files.write_text(out / "results.json", json.dumps(res, indent=1) + "\n")
    files.write_text(out / "table.md", report_markdown(res))
    rows = res["methods"]
    base = res["base"]["heldout_loss"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for r in rows:
        steps = [0] + [int(x) for x in r["curve_steps"]]
        mean, std = [base] + r["curve_mean"], [0.0] + r["curve_std"]
        label = f"{r['name']} ({fmt_params(r['trainable_params'])}, lr {r['lr']:g})"
        for ax, first in zip(axes, (0, 1), strict=True):  # right: without step 0, to see the adapters apart
            ax.errorbar(steps[first:], mean[first:], yerr=std[first:], marker="o", ms=3, capsize=3, label=label)
    for ax, title in zip(axes, ("from the base (step 0)", "zoom: after the first evaluation"), strict=True):
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("held-out loss (answer tokens)")
        ax.set_title(f"Held-out loss vs step, {title}\nmean ± std over {res['seeds']} seeds", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "heldout_loss_vs_step.png", dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r, marker in zip(rows, "osD^vPX*h", strict=False):  # matched methods share an x: tell them by marker
        ax.errorbar(r["trainable_params"], r["final_mean"], yerr=r["final_std"], fmt=marker, ms=6, capsize=4,
                    alpha=0.85, label=f"{r['name']}: {r['final_mean']:.3f} ± {r['final_std']:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("final held-out loss")
    ax.set_title(f"Final held-out loss vs trainable parameters, mean ± std over {res['seeds']} seeds "
                 f"(base {base:.3f})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "final_loss_vs_params.png", dpi=90)
    plt.close(fig)

    tested = [c for c in res["claims"] if "diff" in c]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(tested) + 1.6))
    for y, c in enumerate(tested):
        color = {"supported": "tab:green", "contradicted": "tab:red"}.get(c["verdict"], "tab:gray")
        ax.errorbar(c["diff"], y, xerr=1.96 * c["se_sample"], fmt="o", color=color, capsize=4)
        ax.scatter(c["per_seed_diff"], [y] * len(c["per_seed_diff"]), marker="|", s=120, color=color, alpha=0.7)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(tested)), [f"{c['method']} − {c['reference']}"
                                       f"{' (first eval)' if c['point'] == 'first' else ''}\n{c['verdict']}"
                                       for c in tested], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("held-out loss difference (< 0: the claim's direction)")
    ax.set_title("Per claim: mean over seeds ± 1.96 s.e. over held-out samples; ticks: each seed", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(out / "claims.png", dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Setting]:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", type=Path, help="plain-text corpus for pre-training the base")
    p.add_argument("--sft", type=Path, help="jsonl with question/answer ('#### N') records")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_methods",
                   help="results and every run; a finished run found here is reused")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "rwkv-peft" / "bench_methods",
                   help="pre-trained bases, by content hash")
    p.add_argument("--report", type=Path, help="only rewrite table.md and the plots from this results.json")
    p.add_argument("--preset", choices=list(PRESETS), default="full")
    p.add_argument("--quick", action="store_true", help="same as --preset quick (CPU, a few minutes)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {','.join(METHODS)}")
    p.add_argument("--train_only", action="store_true",
                   help="train and evaluate the --methods, then stop: several processes can share --out this way, "
                        "a last run without it reuses their runs for the side-by-side timing and the report")
    p.add_argument("--timing_only", action="store_true",
                   help="only the side-by-side timing of the --methods (cached in --out for the report run)")
    p.add_argument("--split_seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--base_seed", type=int, default=0, help="seed of the base's init and pre-training data order")
    for f in fields(Setting):
        if f.name in ("lrs", "full_lrs"):
            p.add_argument(f"--{f.name}", type=lambda t: tuple(float(x) for x in t.split(",")), help="comma list")
        else:
            kind = float if f.name == "pretrain_lr" else int
            p.add_argument(f"--{f.name}", type=kind, help=f"override the preset's {f.name}")
    a = p.parse_args(argv)
    s = PRESETS["quick" if a.quick else a.preset]
    s = replace(s, **{f.name: getattr(a, f.name) for f in fields(Setting) if getattr(a, f.name) is not None})
    if a.report is None and (a.text is None or a.sft is None):
        p.error("--text and --sft are required (or --report RESULTS.json)")
    a.methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in a.methods if m not in METHODS]
    if unknown or not a.methods:
        p.error(f"--methods: unknown {unknown}; expected a comma list from {','.join(METHODS)}")
    if s.ft_steps % s.eval_every or s.pretrain_steps < 1 or s.ft_steps < 1:
        p.error("--ft_steps must be a positive multiple of --eval_every, --pretrain_steps positive")
    if s.n_embd % 64:
        p.error("--n_embd must be a multiple of the head size 64")
    if s.seeds < 1 or s.max_grid < 1 or not s.lrs or not s.full_lrs:
        p.error("--seeds, --max_grid and the lr grids must be non-empty / positive")
    return a, s


def warm_imports() -> None:
    """Import once in the parent what every forked run would import again (no torch compute here)."""
    importlib.import_module("rwkv_peft.train.engine").import_deepspeed(False)
    importlib.import_module("deepspeed.runtime.zero.muon.muon_optimizer")  # pulled in lazily by deepspeed
    importlib.import_module("rwkv_peft.tools.init_model")
    import matplotlib

    matplotlib.use("Agg")
    importlib.import_module("matplotlib.pyplot")
    import torch

    with torch.device("meta"):  # load_model builds on meta: pay its one-time lazy imports here (no compute)
        torch.nn.Embedding(2, 2)
    from rwkv_peft.ops.build import load_kernel

    try:
        load_kernel("wkv7", "cpu")  # build/open the CPU kernel once (no compute), not in every run
    except Exception as e:  # runs fall back to the torch op, as the model's "auto" does
        print(f"note: CPU WKV kernel unavailable ({e})")


def summarize(sp: dict, tuned: dict, runs: list[dict], evals: list[dict], s: Setting, counts: list[float]) -> dict:
    """One method's numbers over seeds: curves mean ± std, final losses, answers, grid."""
    tokens = sum(counts)
    steps = sorted(evals[0]["sums"], key=int)
    curves = np.array([[sum(ev["sums"][k]) / tokens for k in steps] for ev in evals])  # seeds x evals
    answers = [x for ev in evals for x in ev["answers"]]
    def std(x: np.ndarray) -> np.ndarray:
        return x.std(0, ddof=1) if len(x) > 1 else np.zeros(x.shape[1:])

    return {
        "name": sp["name"], "peft": sp["peft"], "config": sp["config"],
        "trainable_params": evals[0]["trainable_params"], "lr": tuned["lr"],
        "grid": [float(lr_key(x)) for x in tuned["grid"]], "grid_status": tuned["status"],
        "train_loss_by_lr": {k: v["train_loss_tail"] for k, v in tuned["runs"].items()},
        "seeds": [r["seed"] for r in runs], "curve_steps": steps,
        "curve_mean": curves.mean(0).tolist(), "curve_std": std(curves).tolist(),
        "first_mean": float(curves[:, 0].mean()), "first_std": float(std(curves[:, 0])),
        "final_mean": float(curves[:, -1].mean()), "final_std": float(std(curves[:, -1])),
        "final_by_seed": curves[:, -1].tolist(),
        "first_sums_by_seed": [ev["sums"][steps[0]] for ev in evals],
        "final_sums_by_seed": [ev["sums"][steps[-1]] for ev in evals],
        "answers": answers, "n_gen_total": len(answers), "data_hash_by_seed": [r["data_hash"] for r in runs],
    }


def main(argv: list[str] | None = None) -> dict:
    a, s = parse_args(argv)
    if a.report is not None:
        res = json.loads(a.report.read_text())
        res["claims"] = claims_table({m["name"]: m for m in res["methods"]}, res["heldout_tokens"])  # current tests
        write_report(res, a.report.parent)
        print(report_markdown(res))
        return res
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    warm_imports()
    print(f"setting: {asdict(s)}", flush=True)
    data = prepare_data(a, s, out)
    print(f"data: corpus {data['corpus_tokens']} tokens ({data['n_text_docs']} text documents + "
          f"{data['n_sft_docs']} SFT training records), tokenizer {data['tokenizer']}", flush=True)

    # 1. the base: pre-trained on the text and the SFT training records, cached by content hash
    base, base_hash, base_info = pretrained_base(a, s, data, out)
    from rwkv_peft.model import config_from_state_dict, read_state_dict

    base_sd = read_state_dict(base)
    arch = config_from_state_dict(base_sd, str(base))
    specs = [sp for sp in method_specs(target_shapes(base_sd, arch.n_layer), s,
                                       sum(v.numel() for v in base_sd.values())) if sp["name"] in a.methods]
    del base_sd

    if a.timing_only:
        return {"timing": time_methods(s, data, base, base_hash, specs, out)}

    # 2. per method: lr grid until the best lr is interior (seed 0), the other seeds at that lr, evaluation
    base_eval = evaluate_base(data, s, base, base_hash, out)
    counts = base_eval["counts"]
    tokens = sum(counts)
    from rwkv_peft.scoring import exact_match

    golds = [r["answer"] for r in data["heldout_records"][: s.n_gen]]
    tuned, runs, methods = {}, {}, {}
    for sp in sorted(specs, key=lambda x: RUN_ORDER.index(x["name"]) if x["name"] in RUN_ORDER else len(RUN_ORDER)
                     + (x["name"] == "full")):
        check_fresh_adapter(data, s, base, base_hash, sp, sum(base_eval["sums"]) / tokens, out)
        t = tuned[sp["name"]] = tune_lr(a, s, data, base, base_hash, sp, out)
        runs[sp["name"]] = [t["runs"][lr_key(t["lr"])]] + [
            fine_tune(a, s, data, base, base_hash, sp, t["lr"], seed, out) for seed in range(1, s.seeds)]
        if any(r["diverged"] for r in runs[sp["name"]]):
            raise RuntimeError(f"{sp['name']}: a seed diverged at the chosen lr {t['lr']:g}")
        evals = [evaluate_run(data, s, sp, r, base, base_hash) for r in runs[sp["name"]]]
        m = summarize(sp, t, runs[sp["name"]], evals, s, counts)
        m["exact_hits"] = sum(round(exact_match(ev["answers"], golds) * len(golds)) for ev in evals)
        methods[sp["name"]] = m
        print(f"{sp['name']}: lr {m['lr']:g}, held-out {m['final_mean']:.4f} ± {m['final_std']:.4f} "
              f"(base {sum(base_eval['sums']) / tokens:.4f})", flush=True)
    finished = [r for per in runs.values() for r in per] + [r for t in tuned.values() for r in t["runs"].values()
                                                            if not r["diverged"]]
    for seed in range(s.seeds):  # every method and lr drew the same samples at a seed
        prints = {(r["data_hash"], r["first_sample"]) for r in finished if r["seed"] == seed}
        if len(prints) != 1:
            raise RuntimeError(f"seed {seed}: runs drew different data ({len(prints)} distinct sample fingerprints)")

    if a.train_only:
        return {"methods": list(methods.values())}

    # 3. side by side: step time and peak memory, methods interleaved round by round
    timing = time_methods(s, data, base, base_hash, specs, out)
    base_hits = round(exact_match(base_eval["answers"], golds) * len(golds))
    res = {
        "setting": asdict(s), "seeds": s.seeds, "split_seed": a.split_seed, "text": str(a.text), "sft": str(a.sft),
        "tokenizer": data["tokenizer"], "corpus_tokens": data["corpus_tokens"], "n_heldout": len(counts),
        "heldout_tokens": tokens, "n_gen": len(golds),
        "base": {"sha256": base_hash, "heldout_loss": sum(base_eval["sums"]) / tokens, "exact_hits": base_hits,
                 "n_gen": len(golds), **{k: v for k, v in base_info.items() if k != "sha256"}},
        "identical": {"base_sha256": base_hash, "data_hash_by_seed": methods[specs[0]["name"]]["data_hash_by_seed"],
                      "fresh_adapter_equals_base_loss": True, "params_match_analytic": True},
        "methods": [methods[n] for n in METHODS if n in methods], "timing": timing,
        "claims": claims_table(methods, tokens),
        "wall_s": time.perf_counter() - t_start,
    }
    write_report(res, out)
    print(report_markdown(res))
    print(f"wrote {out}/results.json, table.md, heldout_loss_vs_step.png, final_loss_vs_params.png "
          f"in {res['wall_s']:.0f}s", flush=True)
    return res


if __name__ == "__main__":
    main()
