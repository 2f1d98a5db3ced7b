"""Chat data: RWKV's chat template, and conversations -> tokens + per-token loss flags.

One conversation per jsonl line, either as messages or as rendered RWKV text:

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"text": "User: ...\\n\\nAssistant: ..."}

Rendering (RWKV's chat format, `DEFAULT_CHAT_TEMPLATE`, or a `--chat_template` JSON file with
the same keys): each turn is `System: ...`, `User: ...` or `Assistant: ...`, turns are joined by
the separator "\\n\\n" and the document ends with token 0 like every document. In a message a
blank line would read as the end of the turn, so "\\n\\n" inside content is written as "\\n"
(RWKV's fine-tuning convention); `{"text": ...}` lines are taken verbatim, a chunk that starts
with no role label continuing the turn before it.

The loss rule, in one place (`encode_chat`): an assistant turn trains its text and its end of
turn, that is everything after the label `Assistant:` (the space included: the model writes it
after the prompt's colon, as in `render_sft`), the separator that follows the turn, or token 0
when it is the conversation's last turn. Role labels, system and user turns are not trained.
`<think>...</think>` is ordinary assistant text. The whole conversation is tokenized at once, as
at inference, and a token is trained iff its first character lies in a trained span.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .binidx import BinIdx, split_prefix
from .jsonl import JsonlStats, iter_jsonl_objects, reject
from .tokenizer import END_TOKEN, check_vocab_range, get_tokenizer

ROLES = ("system", "user", "assistant")
DEFAULT_CHAT_TEMPLATE = {
    "system": "System: {content}",
    "user": "User: {content}",
    "assistant": "Assistant: {content}",
    "separator": "\n\n",
    "separator_in_content": "\n",
}
EXPECTED = ('{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]} '
            'or {"text": str}')
MASK_SUFFIX = ".mask"  # make_binidx --chat writes PREFIX.mask.bin/.idx beside PREFIX.bin/.idx
_HARMLESS = ("empty document", "no assistant turn")  # skipped and counted even with strict

Pieces = list[tuple[str, bool]]  # consecutive text spans, each trained or not


@dataclass(frozen=True)
class ChatTemplate:
    """How turns are written: a format with one `{content}` per role, and the turn separator."""

    turns: dict[str, str]
    separator: str
    separator_in_content: str | None

    @classmethod
    def from_dict(cls, d: dict, where: str = "chat template") -> ChatTemplate:
        unknown = set(d) - set(DEFAULT_CHAT_TEMPLATE)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; expected "
                             f"{sorted(DEFAULT_CHAT_TEMPLATE)}")
        d = {**DEFAULT_CHAT_TEMPLATE, **d}
        for role in ROLES:
            fmt = d[role]
            if not isinstance(fmt, str) or fmt.count("{content}") != 1:
                raise ValueError(f"{where}: '{role}' must be a string with exactly one "
                                 f"{{content}}, got {fmt!r}")
        sep, repl = d["separator"], d["separator_in_content"]
        if not isinstance(sep, str) or not sep:
            raise ValueError(f"{where}: 'separator' must be a non-empty string, got {sep!r}")
        if repl is not None and (not isinstance(repl, str) or sep in repl):
            raise ValueError(f"{where}: 'separator_in_content' must be null or a string "
                             f"without the separator, got {repl!r}")
        tpl = cls({r: d[r] for r in ROLES}, sep, repl)
        labels = [tpl.label(r) for r in ROLES]
        if not all(labels) or len(set(labels)) != len(labels):
            raise ValueError(f"{where}: each role needs its own non-empty label before "
                             f"{{content}}, got {labels}")
        return tpl

    @classmethod
    def load(cls, path: str | None = None) -> ChatTemplate:
        """The default template, or the JSON file at `path` (keys as DEFAULT_CHAT_TEMPLATE;
        missing keys keep their defaults)."""
        if not path:
            return cls.from_dict(DEFAULT_CHAT_TEMPLATE)
        where = f"--chat_template {path}"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: file not found")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: not a JSON file ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object with keys "
                             f"{sorted(DEFAULT_CHAT_TEMPLATE)}")
        return cls.from_dict(d, where)

    def label(self, role: str) -> str:
        """The untrained role label, e.g. `Assistant:` (the text before {content}, minus
        trailing spaces)."""
        return self.turns[role].split("{content}")[0].rstrip(" ")

    @property
    def stop(self) -> str:
        """Where a generated assistant turn ends: the separator and the next user label."""
        return self.separator + self.label("user")

    def clean(self, content: str) -> str:
        content = content.replace("\r\n", "\n").strip()
        if self.separator_in_content is not None:
            while self.separator in content:
                content = content.replace(self.separator, self.separator_in_content)
        return content

    def _pieces(self, turns: list[tuple[str | None, str]]) -> Pieces:
        """Rendered turns (role, text incl. label) -> pieces; the assistant rule lives here."""
        pieces: Pieces = []
        for i, (role, body) in enumerate(turns):
            body += self.separator if i < len(turns) - 1 else ""
            if role == "assistant":
                label = self.label("assistant")
                pieces += [(label, False), (body[len(label):], True)]
            else:
                pieces.append((body, False))
        return pieces

    def render(self, messages: list[dict[str, str]]) -> Pieces:
        """`{"role", "content"}` messages -> pieces of the rendered conversation."""
        turns = []
        for m in messages:
            if m["role"] not in self.turns:
                raise ValueError(f"chat role {m['role']!r}: expected one of {', '.join(ROLES)}")
            head, tail = self.turns[m["role"]].split("{content}")
            turns.append((m["role"], head + self.clean(m["content"]) + tail))
        return self._pieces(turns)

    def split_text(self, text: str) -> Pieces:
        """A conversation already written out (`User: ...\\n\\nAssistant: ...`) -> pieces."""
        labels = sorted(((self.label(r), r) for r in ROLES), key=lambda x: -len(x[0]))
        turns: list[list] = []
        for chunk in text.split(self.separator):
            role = next((r for lab, r in labels if chunk.startswith(lab)), None)
            if role is None and turns:
                turns[-1][1] += self.separator + chunk
            else:
                turns.append([role, chunk])
        return self._pieces([(r, t) for r, t in turns])

    def prompt(self, messages: list[dict[str, str]]) -> str:
        """The text to feed for the assistant's next turn: the conversation so far, the
        separator and the assistant label (no trailing space)."""
        text = "".join(p for p, _ in self.render(messages)) if messages else ""
        return text + (self.separator if messages else "") + self.label("assistant")


def conversation_pieces(obj: dict, template: ChatTemplate) -> tuple[str | None, Pieces]:
    """(reason to skip or None, pieces) of one jsonl record."""
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "field 'messages' not a non-empty list", []
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                role = m.get("role") if isinstance(m, dict) else m
                return f"message role {role!r} not system|user|assistant", []
            if not isinstance(m.get("content"), str):
                return "message content not a string", []
        if not any(m["content"].strip() for m in msgs):
            return "empty document", []
        if not any(m["role"] == "assistant" for m in msgs):
            return "no assistant turn", []
        return None, template.render(msgs)
    if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str):
            return "field 'text' not a string", []
        if not text.strip():
            return "empty document", []
        pieces = template.split_text(text)
        return (None if any(t for _, t in pieces) else "no assistant turn"), pieces
    return "missing field 'messages' or 'text'", []


def encode_chat(tokenizer, pieces: Pieces) -> tuple[np.ndarray, np.ndarray]:
    """(token ids ending in token 0, uint8 flag per token: 1 = trained as a target).

    The first token of a document is never a target (nothing precedes it); token 0 is
    trained iff the conversation ends with an assistant turn (its end of turn).
    """
    text = "".join(p for p, _ in pieces)
    ids, starts = tokenizer.encode_offsets(text)
    ends = np.cumsum([len(p) for p, _ in pieces])
    trained = np.asarray([t for _, t in pieces] + [False])
    flags = trained[np.searchsorted(ends, starts, side="right")]
    ids = np.append(ids, END_TOKEN).astype(ids.dtype)
    flags = np.append(flags, bool(pieces) and pieces[-1][1]).astype(np.uint8)
    flags[0] = 0
    return ids, flags


def iter_conversations(path: str, tokenizer: str = "world", template: ChatTemplate | None = None,
                       stats: JsonlStats | None = None, strict: bool = False
                       ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (line number, token ids, loss flags) per usable conversation of a chat jsonl;
    bad lines are counted in stats (or, with strict, a one-line error)."""
    tok = get_tokenizer(tokenizer)
    template = template or ChatTemplate.load()
    stats = stats if stats is not None else JsonlStats(path)
    for lineno, obj in iter_jsonl_objects(path, stats, strict, EXPECTED):
        reason, pieces = conversation_pieces(obj, template)
        if reason in _HARMLESS:
            stats.skip(reason, lineno)
        elif reason:
            reject(stats, reason, lineno, strict, EXPECTED)
        else:
            yield lineno, *encode_chat(tok, pieces)


def load_chat(path: str, vocab_size: int, ctx_len: int, tokenizer: str = "world",
              template: ChatTemplate | None = None, too_long: str = "truncate",
              strict: bool = False, padded: bool = True
              ) -> tuple[list[np.ndarray], list[np.ndarray], JsonlStats]:
    """Tokenize a chat jsonl into memory: (token arrays, flag arrays, stats).

    padded (one conversation per sample, at most ctx_len+1 tokens): a longer conversation is
    truncated (its trained tokens past the window are lost) or, with too_long='drop', skipped;
    either way it is counted. A conversation with no trained token in its sample is skipped.
    """
    if too_long not in ("truncate", "drop"):
        raise ValueError(f"--too_long {too_long!r}: expected truncate or drop")
    stats, docs, masks = JsonlStats(path), [], []
    stats.trained = 0
    for lineno, ids, flags in iter_conversations(path, tokenizer, template, stats, strict):
        check_vocab_range(ids, vocab_size, f"{path}:{lineno}")
        long = padded and len(ids) > ctx_len + 1
        if long and too_long == "drop":
            stats.skip(f"longer than ctx_len+1 = {ctx_len + 1} tokens (--too_long drop)", lineno)
            continue
        window = flags[1 : ctx_len + 1] if padded else flags
        if not window.any():
            stats.skip("no assistant token within ctx_len" if padded else "no assistant turn",
                       lineno)
            continue
        if long:
            stats.kept_changed[f"truncated to ctx_len+1 = {ctx_len + 1} tokens"] += 1
        docs.append(ids)
        masks.append(flags)
        stats.keep(len(ids), int(window.sum()))
    if not docs:
        raise ValueError(f"{path}: no usable conversations ({stats.summary(with_path=False)}); "
                         f"expected one per line: {EXPECTED}")
    return docs, masks, stats


def open_chat_binidx(path: str) -> tuple[BinIdx, BinIdx]:
    """The token pair PREFIX.bin/.idx and its loss flags PREFIX.mask.bin/.idx (make_binidx
    --chat), checked to describe the same documents."""
    prefix = split_prefix(path)
    tokens = BinIdx(prefix)
    mask_prefix = prefix + MASK_SUFFIX
    if not os.path.isfile(mask_prefix + ".idx"):
        raise FileNotFoundError(f"{mask_prefix}.idx: missing; chat binidx data needs the loss "
                                "flags that `make_binidx --chat` writes beside the tokens")
    flags = BinIdx(mask_prefix)
    if flags.dtype != np.uint8 or not np.array_equal(flags.sizes, tokens.sizes):
        raise ValueError(f"{mask_prefix}.idx: does not match {prefix}.idx (expected uint8 "
                         "flags with the same document sizes; rebuild with make_binidx --chat)")
    return tokens, flags
