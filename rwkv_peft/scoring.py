"""Scoring generated answers: batched greedy continuations and exact match of GSM8K's `#### N` answers.

Works on any model with the package's interface (``model.forward_state(idx, state) -> (logits, state)``),
adapted or not, so a benchmark can score a base model and every PEFT method the same way (the held-out
loss is the trainer's: ``rwkv_peft.train.loss.heldout_loss``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import islice

import torch
from torch import nn

from rwkv_peft.decoder import Decoder, eval_mode

_ANSWER = re.compile(r"####\s*([-+]?[\d,]*\.?\d+)")


@torch.no_grad()
def greedy_generate(
    model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_token: int = 0
) -> list[list[int]]:
    """Greedy continuations of token-id prompts (batched, recurrent), each cut at ``stop_token``.

    Each prompt is read on its own (no padding enters the state), then all continue in one batch
    one token at a time from their stacked recurrent states (``Decoder.steps``, the loop
    ``rwkv_peft.decoder.generate`` samples with).
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
