"""Reference log-probs computed once, for a model with no adapter to switch off (``--peft full``).

DPO compares the policy with a frozen reference. An adapter gives that for free (switched off, the
model is its base); full fine-tuning changes the base itself, so before the first step the model as
loaded scores every pair of the training and held-out files once, and the log-probs are kept — no
second model in memory. They go to ``<data file>.ref-<hash>.pt`` beside the data (or into
``--proj_dir`` when that directory is read-only): a plain dict of tensors, read with
``weights_only``. The hash covers what the numbers depend on: every pair's tokens and masks, the base
checkpoint's bytes, ``--precision`` and ``--ctx_len``; a run on the same data and base reuses the file,
a changed one gets its own. Every process scores every pair in the same batches (ZeRO-3 needs all of
them in each forward), and rank 0 writes.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from rwkv_peft import files

READ_BLOCK = 1 << 24


def file_digest(path: str | os.PathLike, h: hashlib._Hash | None = None) -> hashlib._Hash:
    """blake2b of a file's bytes (every file of a folder, by name, for an HF folder)."""
    h = h or hashlib.blake2b(digest_size=16)
    p = Path(path)
    for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
        if f.is_file():
            h.update(f.relative_to(p).as_posix().encode() if p.is_dir() else b"")
            with open(f, "rb") as fh:
                while block := fh.read(READ_BLOCK):
                    h.update(block)
    return h


class ReferenceCache:
    """Reference log-probs (chosen, rejected) by pair hash."""

    def __init__(self, table: dict[int, torch.Tensor]):
        self.table = table

    def lookup(self, pair_hash: torch.Tensor) -> torch.Tensor:
        """The (2B,) reference log-probs of a batch: its chosen sequences, then its rejected ones."""
        try:
            rows = torch.stack([self.table[int(k)] for k in pair_hash])
        except KeyError as e:
            raise ValueError(f"reference log-probs: pair {e.args[0]} was not scored before training") from None
        return rows.t().reshape(-1)

    @classmethod
    def build(cls, ctx, score: Callable[[torch.nn.Module, dict], torch.Tensor]) -> ReferenceCache:
        """Score (or read) the pairs of --data_file and --eval_data with the model as it is now."""
        from rwkv_peft.data import collate, read_data

        cfg = ctx.cfg
        options = cfg.data_options(ctx.model.cfg.vocab_size)
        base = file_digest(cfg.load_model)
        base.update(f"{cfg.precision} {cfg.ctx_len}".encode())
        table: dict[int, torch.Tensor] = {}
        for path in filter(None, (cfg.data_file, cfg.eval_data)):
            items = read_data(path, cfg.data_type, options)
            table.update(cls._scored(ctx, path, items, base.copy(), score, collate))
        return cls(table)

    @staticmethod
    def _scored(ctx, path: str, items: Sequence[dict], h, score, collate) -> dict[int, torch.Tensor]:
        keys = torch.stack([it["pair_hash"] for it in items])
        h.update(keys.numpy().tobytes())
        name = f"{Path(path).name}.ref-{h.hexdigest()[:16]}.pt"
        where = Path(path).parent if os.access(Path(path).parent, os.W_OK) else Path(ctx.cfg.proj_dir)
        cache = where / name
        if cache.is_file():
            from rwkv_peft.model.checkpoint import load_checked

            saved = load_checked(cache)
            if not isinstance(saved, dict) or not torch.equal(saved.get("pair_hash", keys[:0]), keys):
                raise ValueError(f"{cache}: not the reference log-probs of {path}; delete it to score again")
            logps = saved["logps"]
        else:
            if ctx.cfg.resume and (Path(ctx.cfg.proj_dir) / "trainer_state.pt").is_file():
                raise ValueError(f"{cache}: missing, and a resumed run's model is no longer the reference; "
                                 "restore the file or start the run afresh")
            if ctx.rank == 0:
                print(f"reference: scoring {len(items)} pairs of {path} with the base (once)", file=sys.stderr)
            bs = ctx.cfg.micro_bsz
            out = []
            for s in range(0, len(items), bs):
                batch = collate([items[i] for i in range(s, min(s + bs, len(items)))])
                batch = {k: v.to(ctx.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                out.append(score(ctx.model, batch).view(2, -1).t().double().cpu())
            logps = torch.cat(out)
            if ctx.rank == 0:
                with files.atomic_path(cache) as tmp, open(tmp, "wb") as f:
                    torch.save({"pair_hash": keys, "logps": logps}, f)
                print(f"reference: kept in {cache}", file=sys.stderr)
        return {int(k): v for k, v in zip(keys, logps, strict=True)}
