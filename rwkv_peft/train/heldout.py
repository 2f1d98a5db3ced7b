"""Held-out evaluation while training (--eval_data / --eval_every / --eval_samples / --save_best).

Each held-out document (or item, for data types of items) is one sample (its first ctx_len+1 tokens,
padded), masked exactly as the training data of the same --data_type, and the objective scores the
batches (``Objective.evaluate``: for the language model the training loss of unseen data). The first
``--eval_samples`` documents of token data also give a prompt (what precedes their last trained span:
a chat's last ``Assistant:``, an sft question; plain text: its first half) whose continuation is
sampled with ``rwkv_peft.decoder`` and logged beside the reference.
Every rank runs the same evaluation (ZeRO-3 needs every rank in every forward) with the sampler's own
seeded generator, so training's random stream and exact resume are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rwkv_peft.data import ChatTemplate, Documents, get_data_type, get_tokenizer, read_data
from rwkv_peft.decoder import eval_mode, generate
from rwkv_peft.sampling import Sampling
from rwkv_peft.train.config import TrainConfig
from rwkv_peft.train.objectives import Objective


@dataclass
class HeldOutPrompt:
    ids: list[int]
    text: str
    reference: str


def prompt_of(ids: np.ndarray, flags: np.ndarray) -> tuple[int, int]:
    """(end of the prompt, end of the reference) in a document's tokens: the prompt is what
    precedes the last run of trained tokens, the reference that run (plain text: halves)."""
    trained = np.flatnonzero(flags)
    if len(trained) == 0:
        return len(ids), len(ids)
    run_starts = trained[np.r_[True, np.diff(trained) > 1]]
    cut = int(run_starts[-1])
    if cut <= 1:  # everything is trained (plain text): continue its first half
        return max(1, len(ids) // 2), len(ids)
    return cut, int(trained[-1]) + 1


class HeldOut:
    """The held-out samples and prompts of one run, and the best step seen so far."""

    def __init__(self, cfg: TrainConfig, vocab_size: int):
        kind = get_data_type(cfg.data_type)
        data = read_data(cfg.eval_data, cfg.data_type, cfg.data_options(vocab_size), padded=True)
        self.prompts = []
        if isinstance(data, Documents):
            ds = data.sampler(cfg.ctx_len, vocab_size)
            docs = [int(d) for d in (data.order if data.order is not None else range(len(data.docs)))]
            samples, self.summary = [ds.doc_sample(d) for d in docs], data.summary
            self.tokenizer = get_tokenizer(cfg.tokenizer)
            self.stop = ChatTemplate.load(cfg.chat_template or None).stop if kind.chat_stop else None
            for d in docs[: cfg.eval_samples]:
                ids = np.asarray(ds.docs[d][: cfg.ctx_len + 1])
                cut, end = prompt_of(ids, ds.doc_flags(d, len(ids)))
                self.prompts.append(HeldOutPrompt(ids[:cut].tolist(), self.tokenizer.decode(ids[:cut].tolist()),
                                                  self.tokenizer.decode(ids[cut:end].tolist())))
        else:
            samples, self.summary = list(data), f"{cfg.eval_data}: {len(data)} records"
        self.batches = [kind.collate(samples[i : i + cfg.micro_bsz]) for i in range(0, len(samples), cfg.micro_bsz)]
        self.every, self.max_tokens = cfg.eval_every, cfg.eval_max_tokens
        self.seed = cfg.random_seed
        self.best_step, self.best_loss, self.improved = None, float("inf"), False

    def due(self, step: int, steps_total: int) -> bool:
        return step % self.every == 0 or step == steps_total

    def remember(self, records: list[dict]) -> None:
        """Take the best step from a resumed run's log (read by rank 0, shared with every rank so that
        all agree on when --save_best saves: a collective under ZeRO-3)."""
        for r in records:
            if "eval_loss" in r and r["eval_loss"] < self.best_loss:
                self.best_step, self.best_loss = r["step"], r["eval_loss"]
        if torch.distributed.is_initialized():
            best = [(self.best_step, self.best_loss)]
            torch.distributed.broadcast_object_list(best, src=0)
            self.best_step, self.best_loss = best[0]

    def run(self, objective: Objective, model: nn.Module, step: int) -> dict:
        """The eval record of ``step`` (``eval_loss`` and the objective's other held-out metrics); sets
        ``improved`` when its loss is the best so far."""
        device = next(model.parameters()).device
        self.batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in self.batches]
        with eval_mode(model):
            metrics = objective.evaluate(self.batches)
        if torch.distributed.is_initialized():  # identical on every rank; averaged so all agree bit for bit
            t = torch.tensor(list(metrics.values()), dtype=torch.float64, device=device)  # nccl: device tensors
            torch.distributed.all_reduce(t)
            metrics = dict(zip(metrics, (t / torch.distributed.get_world_size()).tolist(), strict=True))
        loss = metrics["loss"]
        self.improved = loss < self.best_loss
        if self.improved:
            self.best_step, self.best_loss = step, loss
        outputs = self.generate(model, step) if self.prompts and self.max_tokens else []
        samples = [{"prompt": p.text, "output": o, "reference": p.reference}
                   for p, o in zip(self.prompts, outputs, strict=True)]
        return {"step": step, **{f"eval_{k}": float(v) for k, v in metrics.items()}, "eval_samples": samples}

    def generate(self, model: nn.Module, step: int) -> list[str]:
        """The prompts' sampled continuations (RWKV's default sampling), cut at the stop string; the
        sampler's own generator is seeded by the step, so every rank samples the same tokens."""
        stop = (self.stop,) if self.stop else ()
        return [generate(model, self.tokenizer, p.ids, self.max_tokens, Sampling(seed=self.seed + step), stop).text
                for p in self.prompts]
