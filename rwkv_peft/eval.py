"""Evaluation helpers: held-out loss on SFT samples and exact match of greedy `#### N` answers.

Both work on any model with the package's interface (``model.forward_hidden(idx, state)``, the
states before the head, ``model.head(hidden, loss)``, which applies a training loss without forming
every logit, and ``model.forward_state(idx, state) -> (logits, state)``), adapted or not, so a
benchmark can score a base model and every PEFT method the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import islice

import torch
from torch import nn

from rwkv_peft.generate import Decoder, eval_mode
from rwkv_peft.train.loss import head_loss

_ANSWER = re.compile(r"####\s*([-+]?[\d,]*\.?\d+)")


@torch.no_grad()
def heldout_sums(
    model: nn.Module, samples: Sequence[dict[str, torch.Tensor]], batch_size: int = 8
) -> tuple[list[float], list[float]]:
    """Per sample: (sum of masked cross-entropy, number of masked tokens).

    Samples are the trainer's dicts (input_ids, targets, mask), so this is the training loss of unseen
    data; the per-sample sums let a benchmark pair two models sample by sample.
    """
    if not samples:
        raise ValueError("heldout_sums: no samples")
    sums: list[float] = []
    counts: list[float] = []
    with eval_mode(model):
        for i in range(0, len(samples), batch_size):
            batch = samples[i : i + batch_size]
            idx = torch.stack([s["input_ids"] for s in batch])
            targets = torch.stack([s["targets"] for s in batch])
            mask = torch.stack([s["mask"] for s in batch])
            keep = int(mask.nonzero()[:, 1].max()) + 1 if mask.any() else 1  # skip the all-padding tail
            hidden = model.forward_hidden(idx[:, :keep], None)[0]
            for j in range(len(batch)):  # the head + loss per sample, chunked: no (B, T, V) logits
                summed = head_loss(targets[j : j + 1, :keep], mask[j : j + 1, :keep], total=mask.new_tensor(1.0))
                sums.append(float(model.head(hidden[j : j + 1], summed)))
                counts.append(float(mask[j].sum()))
    return sums, counts


def heldout_loss(model: nn.Module, samples: Sequence[dict[str, torch.Tensor]], batch_size: int = 8) -> float:
    """Token-level mean cross-entropy over the masked (answer) tokens of ``samples``.

    Tokens are pooled over all samples (not a mean of per-sample means), so long answers weigh as
    much as they do in training.
    """
    sums, counts = heldout_sums(model, samples, batch_size)
    if sum(counts) == 0:
        raise ValueError("heldout_loss: every sample's loss mask is empty")
    return sum(sums) / sum(counts)


@torch.no_grad()
def greedy_generate(
    model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_token: int = 0
) -> list[list[int]]:
    """Greedy continuations of token-id prompts (batched, recurrent), each cut at ``stop_token``.

    Each prompt is read on its own (no padding enters the state), then all continue in one batch
    one token at a time from their stacked recurrent states (``Decoder.steps``, the loop
    ``rwkv_peft.generate`` samples with).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: every prompt needs at least one token")
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    with eval_mode(model):
        dec = Decoder(model)
        dec.feed_each(prompts)
        for tokens in islice(dec.steps(lambda logits: logits.argmax(-1).tolist()), max_new_tokens):
            for i, tok in enumerate(tokens):
                if not done[i]:
                    done[i] = tok == stop_token
                    if not done[i]:
                        out[i].append(tok)
            if all(done):
                break
    return out


def extract_answer(text: str) -> str | None:
    """The number after the first ``####`` (GSM8K's final-answer marker), normalised; None if absent."""
    m = _ANSWER.search(text)
    if m is None:
        return None
    num = m.group(1).replace(",", "").lstrip("+")
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    return num or "0"


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions whose ``#### N`` equals the reference's (a missing answer is wrong)."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"exact_match: {len(predictions)} predictions for {len(references)} references")
    hits = 0
    for p, r in zip(predictions, references, strict=True):
        gold = extract_answer(r)
        if gold is None:
            raise ValueError(f"exact_match: reference without a '#### N' answer: {r[-80:]!r}")
        hits += extract_answer(p) == gold
    return hits / len(references)
