"""Data files as token documents: plain text, prompt/response (sft) and binidx readers, each with
where its loss goes (a start per sft document, per-token flags for chat, else every target)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from .binidx import BinIdx
from .chat import open_chat_binidx
from .dataset import DocDataset
from .jsonl import JsonlStats, iter_jsonl
from .tokenizer import END_TOKEN, check_vocab_range, get_tokenizer

DEFAULT_SFT_TEMPLATE = "User: {prompt}\n\nAssistant: {response}"


def checked(*_: object) -> None:
    """In-memory data had its ids range-checked while tokenizing."""


def load_texts(path: str, vocab_size: int, tokenizer: str = "world", strict: bool = False,
               field: str = "text") -> tuple[list[np.ndarray], JsonlStats]:
    """Tokenize a small `{"text": ...}` jsonl into memory; each document ends in token 0."""
    tok = get_tokenizer(tokenizer)
    stats, docs = JsonlStats(path), []
    for lineno, (text,) in iter_jsonl(path, (field,), stats, strict):
        ids = np.append(tok.encode_array(text), END_TOKEN).astype(np.int32)
        check_vocab_range(ids, vocab_size, f"{path}:{lineno}")
        docs.append(ids)
        stats.keep(len(ids))
    if not docs:
        raise ValueError(f"{path}: no usable documents with a string field '{field}' "
                         f"({stats.summary(with_path=False)})")
    return docs, stats


def render_sft(template: str, fields: tuple[str, str], prompt: str,
               response: str) -> tuple[str, str]:
    """(prompt text, full text) of one record under the template.

    The prompt text is what precedes the response, minus trailing spaces: RWKV chat
    prompts end in "Assistant:" and the space goes with the first response token, so
    this is also the string to feed the model at inference. The template names the
    fields with `{prompt}` / `{response}` or with the field names themselves (e.g.
    `{question}` / `{answer}`); placeholders are replaced literally, so braces in the
    data are safe.
    """
    p_keys = ("{prompt}", "{" + fields[0] + "}")
    r_keys = ("{response}", "{" + fields[1] + "}")
    r_key = next((k for k in r_keys if template.count(k) == 1), None)
    if r_key is None:
        raise ValueError(f"--sft_template {template!r}: needs exactly one {r_keys[0]} (or "
                         f"{r_keys[1]}) placeholder")
    head, tail = template.split(r_key)
    for k in p_keys:
        head, tail = head.replace(k, prompt), tail.replace(k, prompt)
    return head.rstrip(" "), head + response + tail


def load_sft(path: str, vocab_size: int, ctx_len: int, tokenizer: str = "world",
             fields: tuple[str, str] = ("question", "answer"), template: str | None = None,
             strict: bool = False) -> tuple[list[np.ndarray], np.ndarray, JsonlStats]:
    """Tokenize prompt/response records; returns (docs, loss_start per doc, stats).

    The whole text is tokenized at once (as at inference); the prompt owns the tokens it
    shares with the tokenization of the prompt alone, every later token (the response, the
    template's tail, the end token 0) carries loss.
    """
    tok = get_tokenizer(tokenizer)
    template = template or DEFAULT_SFT_TEMPLATE
    stats, docs, starts = JsonlStats(path), [], []
    for lineno, (prompt, response) in iter_jsonl(path, fields, stats, strict,
                                                      allow_empty=(fields[0],)):
        head, full = render_sft(template, fields, prompt, response)
        ids = np.append(tok.encode_array(full), END_TOKEN).astype(np.int32)
        head_ids = tok.encode_array(head)
        m = min(len(head_ids), len(ids))
        diff = np.flatnonzero(ids[:m] != head_ids[:m])
        k = int(diff[0]) if len(diff) else m
        check_vocab_range(ids, vocab_size, f"{path}:{lineno}")
        if k >= ctx_len + 1:
            stats.skip(f"prompt longer than ctx_len {ctx_len}", lineno)
            continue
        docs.append(ids)
        starts.append(k)
        stats.keep(len(ids))
    if not docs:
        raise ValueError(f"{path}: no usable prompt/response records with string fields "
                         f"'{fields[0]}', '{fields[1]}' ({stats.summary(with_path=False)})")
    return docs, np.asarray(starts, dtype=np.int64), stats


def is_binidx_path(data_file: str) -> bool:
    """A `chat` data file is a jsonl file, or the PREFIX of a `make_binidx --chat` pair."""
    return data_file.endswith((".bin", ".idx")) or not os.path.isfile(data_file)


@dataclass
class Documents:
    """One data file as documents: tokens (arrays or a memory-mapped BinIdx), where the loss
    goes (per-token flags for chat, a start per document for sft, else every target), and
    which documents a one-document-per-sample loader may use."""

    docs: Sequence[np.ndarray] | BinIdx
    name: str
    summary: str
    flags: Sequence[np.ndarray] | BinIdx | None = None
    loss_start: np.ndarray | None = None
    order: np.ndarray | None = None

    def check(self, vocab_size: int) -> Callable[[int, np.ndarray], None]:
        """The id-range check of document d (a BinIdx is checked window by window)."""
        if isinstance(self.docs, BinIdx):
            return partial(self.docs.check_doc, vocab_size)
        return checked

    def sampler(self, ctx_len: int, vocab_size: int, samples_per_epoch: int = 1, seed: int = 0,
                rank: int = 0, world_size: int = 1) -> DocDataset:
        return DocDataset(self.docs, self.check(vocab_size), ctx_len, samples_per_epoch, seed,
                          rank, world_size, loss_start=self.loss_start, order=self.order,
                          flags=self.flags)


def _binidx_order(tokens: BinIdx, flags: BinIdx | None, ctx_len: int, too_long: str,
                  counts: dict) -> np.ndarray | None:
    """Documents a padded sample can learn from (>= 2 tokens; chat: a trained token within
    ctx_len, not over-long under --too_long drop); counts what was left out or truncated."""
    usable = tokens.sizes >= 2
    if flags is not None:
        long = tokens.sizes > ctx_len + 1
        if too_long == "drop":
            counts[f"dropped: longer than ctx_len+1 = {ctx_len + 1} tokens"] = int((usable & long).sum())
            usable &= ~long
        counts[f"truncated to ctx_len+1 = {ctx_len + 1} tokens"] = int((usable & long).sum())
        for d in np.flatnonzero(usable):
            if not flags[d][1 : ctx_len + 1].any():
                usable[d] = False
                counts["dropped: no assistant token within ctx_len"] += 1
    return None if usable.all() else np.flatnonzero(usable)


def read_binidx(data_file: str, ctx_len: int, vocab_size: int, too_long: str = "truncate", padded: bool = True,
                chat: bool = False) -> Documents:
    """A PREFIX.bin/.idx pair (chat: with its PREFIX.mask.bin/.idx loss flags) as Documents."""
    tokens, flags = open_chat_binidx(data_file) if chat else (BinIdx(data_file), None)
    # small files are checked up front; big ones window by window
    if tokens.num_tokens * tokens.dtype.itemsize <= 1 << 30:
        tokens.check_ids(vocab_size)
    counts: dict = Counter()
    order = _binidx_order(tokens, flags, ctx_len, too_long, counts) if padded else None
    if order is not None and len(order) == 0:
        raise ValueError(f"{tokens.bin_path}: no document has anything to learn within "
                         f"ctx_len {ctx_len} ({dict(counts) or 'every one has < 2 tokens'})")
    summary = (f"{tokens.prefix}: {len(tokens)} documents, {tokens.num_tokens} tokens "
               f"({tokens.dtype.name})")
    if flags is not None:
        summary += f", {int(flags.tokens.sum(dtype=np.int64))} trained"
    summary += "".join(f"; {n} {what}" for what, n in counts.items() if n)
    return Documents(tokens, tokens.bin_path, summary, flags=flags, order=order)
