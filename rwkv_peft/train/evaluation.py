"""Evaluation while training (--eval_data / --eval_every / --eval_samples / --save_best).

Each held-out document is one sample (its first ctx_len+1 tokens, padded), masked exactly as the
training data of the same --data_type: held-out loss is ``rwkv_peft.eval.heldout_loss``, the
training loss of unseen data. The first ``--eval_samples`` documents also give a prompt (what
precedes their last trained span: a chat's last ``Assistant:``, an sft question; plain text: its
first half) whose continuation is sampled with ``rwkv_peft.generate`` and logged beside the reference.
Every rank runs the same evaluation (ZeRO-3 needs every rank in every forward) with the sampler's own
seeded generator, so training's random stream and exact resume are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rwkv_peft.train.config import TrainConfig


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


class Evaluator:
    """The held-out samples and prompts of one run, and the best step seen so far."""

    def __init__(self, cfg: TrainConfig, vocab_size: int):
        from rwkv_peft.data import ChatTemplate, get_tokenizer, load_documents

        data = load_documents(cfg.eval_data, cfg.data_type, cfg.ctx_len, vocab_size, cfg.tokenizer,
                              cfg.sft_field, cfg.sft_template or None, cfg.chat_template or None,
                              cfg.too_long, strict=bool(cfg.strict), padded=True)
        ds = data.sampler(cfg.ctx_len, vocab_size)
        docs = data.order if data.order is not None else range(len(data.docs))
        self.samples = [ds.doc_sample(int(d)) for d in docs]
        self.summary = data.summary
        self.tokenizer = get_tokenizer(cfg.tokenizer)
        self.stop = ChatTemplate.load(cfg.chat_template or None).stop if cfg.data_type in ("chat", "sft") else None
        self.prompts = []
        for d in list(docs)[: cfg.eval_samples]:
            ids = np.asarray(ds.docs[int(d)][: cfg.ctx_len + 1])
            cut, end = prompt_of(ids, ds.doc_flags(int(d), len(ids)))
            self.prompts.append(HeldOutPrompt(ids[:cut].tolist(), self.tokenizer.decode(ids[:cut].tolist()),
                                              self.tokenizer.decode(ids[cut:end].tolist())))
        self.every, self.max_tokens, self.batch = cfg.eval_every, cfg.eval_max_tokens, cfg.micro_bsz
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

    def run(self, model: nn.Module, step: int) -> dict:
        """The eval record of ``step``; sets ``improved`` when its loss is the best so far."""
        from rwkv_peft.eval import heldout_loss

        device = next(model.parameters()).device
        if self.samples[0]["input_ids"].device != device:  # once: they stay on the model's device
            self.samples = [{k: v.to(device) for k, v in s.items()} for s in self.samples]
        loss = heldout_loss(model, self.samples, batch_size=self.batch)
        if torch.distributed.is_initialized():  # identical on every rank; averaged so all agree bit for bit
            t = torch.tensor([loss], dtype=torch.float64, device=device)  # nccl reduces device tensors only
            torch.distributed.all_reduce(t)
            loss = float(t) / torch.distributed.get_world_size()
        self.improved = loss < self.best_loss
        if self.improved:
            self.best_step, self.best_loss = step, loss
        outputs = self.generate(model, step) if self.prompts and self.max_tokens else []
        samples = [{"prompt": p.text, "output": o, "reference": p.reference}
                   for p, o in zip(self.prompts, outputs, strict=True)]
        return {"step": step, "eval_loss": loss, "eval_samples": samples}

    def generate(self, model: nn.Module, step: int) -> list[str]:
        """The prompts' sampled continuations (RWKV's default sampling), cut at the stop string; the
        sampler's own generator is seeded by the step, so every rank samples the same tokens."""
        from rwkv_peft.generate import Sampling, generate

        stop = (self.stop,) if self.stop else ()
        return [generate(model, self.tokenizer, p.ids, self.max_tokens, Sampling(seed=self.seed + step), stop).text
                for p in self.prompts]
