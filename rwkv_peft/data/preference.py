"""Preference pairs: TRL's jsonl records -> chosen / rejected token sequences with completion masks.

One pair per line, in either of TRL's two forms (all three fields of a record in the same form):

    {"prompt": "User: 2+2?\\n\\nAssistant:", "chosen": " 4", "rejected": " 5"}
    {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5"}]}

Strings are taken verbatim: the text is prompt + completion. Message lists are rendered with the
chat template (`chat.py`), prompt messages then completion messages, as one conversation. Either
way the whole text is tokenized at once, ends with token 0, and only the completion is trained: its
tokens (a token belongs to the span its first character lies in) and the end token after it (the
end of turn: token 0). Assistant turns inside the prompt are context, not trained.

A sample is one pair, ``(2, ctx_len)`` tensors: row 0 the chosen sequence, row 1 the rejected one,
each cut to its first ctx_len+1 tokens and padded with 0 (padding masked out).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from .chat import ChatTemplate, Pieces, conversation_pieces, encode_chat
from .dataset import DocDataset
from .documents import checked
from .jsonl import JsonlStats, iter_jsonl_objects, reject
from .tokenizer import check_vocab_range, get_tokenizer
from .types import DataOptions, DataType, register_data_type

FIELDS = ("prompt", "chosen", "rejected")
EXPECTED = ('{"prompt", "chosen", "rejected"}, each a string, or each a list of chat messages '
            '[{"role": "system"|"user"|"assistant", "content": str}, ...]')
_HARMLESS = ("empty completion", "no assistant turn in a completion")  # skipped and counted even with strict

Pair = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # chosen ids, flags, rejected ids, flags


def _message_pieces(prompt: list, completion: list, template: ChatTemplate) -> tuple[str | None, Pieces]:
    """The conversation prompt + completion rendered; only the completion's assistant text trained."""
    reason, pieces = conversation_pieces({"messages": prompt + completion}, template)
    if reason == "no assistant turn":
        return "no assistant turn in a completion", []
    if reason:
        return reason, []
    n_prompt = sum(2 if m["role"] == "assistant" else 1 for m in prompt)  # render: 2 pieces per assistant turn
    pieces = [(text, trained and i >= n_prompt) for i, (text, trained) in enumerate(pieces)]
    return (None if any(t and s for s, t in pieces) else "no assistant turn in a completion"), pieces


def pair_pieces(obj: dict, template: ChatTemplate) -> tuple[str | None, Pieces, Pieces]:
    """(reason to skip or None, chosen pieces, rejected pieces) of one jsonl record."""
    for k in FIELDS:
        if k not in obj:
            return f"missing field '{k}'", [], []
    prompt, chosen, rejected = (obj[k] for k in FIELDS)
    if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        if not chosen.strip() or not rejected.strip():
            return "empty completion", [], []
        return None, [(prompt, False), (chosen, True)], [(prompt, False), (rejected, True)]
    if not all(isinstance(v, list) for v in (prompt, chosen, rejected)):
        return "fields 'prompt', 'chosen', 'rejected' not all strings or all message lists", [], []
    if not prompt:
        return "field 'prompt' an empty message list", [], []
    out = []
    for completion in (chosen, rejected):
        reason, pieces = _message_pieces(prompt, completion, template)
        if reason:
            return reason, [], []
        out.append(pieces)
    return None, *out


def load_pairs(path: str, vocab_size: int, ctx_len: int, tokenizer: str = "world",
               template: ChatTemplate | None = None, too_long: str = "truncate",
               strict: bool = False) -> tuple[list[Pair], JsonlStats]:
    """Tokenize a preference jsonl into memory: (pairs, stats).

    A pair with a sequence longer than ctx_len+1 tokens is truncated (completion tokens past the
    window are lost) or, with too_long='drop', skipped; either way it is counted. A pair with no
    completion token of the chosen or the rejected sequence within the window is skipped.
    """
    if too_long not in ("truncate", "drop"):
        raise ValueError(f"--too_long {too_long!r}: expected truncate or drop")
    tok, template = get_tokenizer(tokenizer), template or ChatTemplate.load()
    stats, pairs = JsonlStats(path, unit="pairs"), []
    stats.trained = 0
    for lineno, obj in iter_jsonl_objects(path, stats, strict, EXPECTED):
        reason, chosen, rejected = pair_pieces(obj, template)
        if reason in _HARMLESS:
            stats.skip(reason, lineno)
            continue
        if reason:
            reject(stats, reason, lineno, strict, EXPECTED)
            continue
        pair = (*encode_chat(tok, chosen), *encode_chat(tok, rejected))
        for ids in pair[::2]:
            check_vocab_range(ids, vocab_size, f"{path}:{lineno}")
        long = max(len(pair[0]), len(pair[2])) > ctx_len + 1
        if long and too_long == "drop":
            stats.skip(f"longer than ctx_len+1 = {ctx_len + 1} tokens (--too_long drop)", lineno)
            continue
        trained = [int(f[1 : ctx_len + 1].sum()) for f in pair[1::2]]
        if not all(trained):
            stats.skip("no completion token within ctx_len", lineno)
            continue
        if long:
            stats.kept_changed[f"truncated to ctx_len+1 = {ctx_len + 1} tokens"] += 1
        pairs.append(pair)
        stats.keep(len(pair[0]) + len(pair[2]), sum(trained))
    if not pairs:
        raise ValueError(f"{path}: no usable preference pairs ({stats.summary(with_path=False)}); "
                         f"expected one per line: {EXPECTED}")
    return pairs, stats


def pair_hash(pair: Pair) -> int:
    """A 64-bit content hash of a pair's tokens and masks (the key of precomputed reference log-probs)."""
    h = hashlib.blake2b(digest_size=8)
    for a in pair:
        h.update(np.ascontiguousarray(a).tobytes())
        h.update(b"|")
    return int.from_bytes(h.digest(), "little", signed=True)


class PairItems(Sequence):
    """The pairs as samples, one item per pair: ``input_ids`` / ``targets`` / ``mask`` of shape (2, ctx_len),
    chosen then rejected, each padded as ``DocDataset`` pads a document, and ``pair_hash``."""

    def __init__(self, pairs: Sequence[Pair], ctx_len: int, summary: str = ""):
        docs = DocDataset([d for p in pairs for d in p[::2]], checked, ctx_len, 1, 0,
                          flags=[f for p in pairs for f in p[1::2]])
        self.docs, self.summary = docs, summary
        self.hashes = torch.tensor([pair_hash(p) for p in pairs], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.hashes)

    def __getitem__(self, d: int) -> dict[str, torch.Tensor]:
        if not 0 <= d < len(self):
            raise IndexError(f"pair {d} outside [0, {len(self)})")
        rows = [self.docs.doc_sample(2 * d + k) for k in (0, 1)]
        return {**{k: torch.stack([r[k] for r in rows]) for k in rows[0]}, "pair_hash": self.hashes[d]}


def read_preference(path: str, o: DataOptions, padded: bool = True) -> PairItems:
    """The data type's reader: a preference jsonl as pair items (always one pair per sample)."""
    pairs, stats = load_pairs(path, o.vocab_size, o.ctx_len, o.tokenizer, ChatTemplate.load(o.chat_template),
                              o.too_long, o.strict)
    return PairItems(pairs, o.ctx_len, stats.summary())


register_data_type(DataType(
    "preference", "{'prompt', 'chosen', 'rejected'} jsonl (TRL's: strings, or chat message lists rendered with the "
    "chat template); loss on the completions, for --objective dpo|orpo|simpo", read_preference, tokens=False,
    dataloads=("pad",)))
