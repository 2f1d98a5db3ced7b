"""Every ``--data_type`` as one record: the trainer's flags, held-out evaluation and make_binidx look types up here.

A record's ``read`` turns a data file into either token ``Documents`` (the loss mask travels with
them: every target, a start per sft document, or per-token chat flags), which the get / pad samplers
cut into ``input_ids`` / ``targets`` / ``mask`` windows and held-out evaluation scores and prompts
from; or a sequence of item dicts (e.g. preference pairs, prompts with their reward fields), one
item per sample, batched by the record's ``collate``. Adding a data type is one record
(``register_data_type``) beside its reader; nothing in the trainer names a type.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rwkv_peft.records import Records

from .binidx import split_prefix
from .chat import MASK_SUFFIX, ChatTemplate, load_chat
from .documents import DEFAULT_SFT_TEMPLATE, Documents, is_binidx_path, load_sft, load_texts, read_binidx
from .jsonl import JsonlStats
from .writers import make_binidx, make_chat_binidx


@dataclass(frozen=True)
class DataOptions:
    """How to read a data file: the trainer's data flags and the model's vocabulary."""

    ctx_len: int
    vocab_size: int
    tokenizer: str = "world"
    sft_field: tuple[str, str] = ("question", "answer")
    sft_template: str | None = None
    chat_template: str | None = None
    too_long: str = "truncate"
    strict: bool = False


def collate(items: list[dict]) -> dict:
    """A batch of item dicts: tensors stacked, anything else (strings, records) as a list."""
    return {k: torch.stack([it[k] for it in items]) if torch.is_tensor(items[0][k]) else [it[k] for it in items]
            for k in items[0]}


@dataclass(frozen=True)
class DataType:
    """One ``--data_type``: how its files are named and read, batched, pre-tokenised and evaluated."""

    name: str
    help: str  # one line for --data_type's help
    read: Callable[[str, DataOptions, bool], Documents | Sequence[dict]]  # (path, options, padded)
    tokens: bool = True  # read gives token Documents (get / pad samplers), else item dicts (one per sample)
    path: str = "file"  # what --data_file names: "file", "prefix" (PREFIX.bin/.idx) or "either"
    companions: tuple[str, ...] = ()  # suffixes of pairs read beside PREFIX (chat: PREFIX.mask.bin/.idx)
    dataloads: tuple[str, ...] = ("get", "pad")  # --dataload choices; a single one is always used
    collate: Callable[[list[dict]], dict] = collate
    write: Callable[[argparse.Namespace], JsonlStats] | None = None  # make_binidx --data_type NAME
    writes: str = ""  # what that leaves beside PREFIX (said after writing)
    eval: bool = True  # --eval_data in this format is supported
    chat_stop: bool = False  # held-out generations stop where the chat template's next user turn starts

    def files(self, flag: str, path: str) -> list[str]:
        """The files behind a data flag: a jsonl file, or PREFIX.bin/.idx (``either``: a file, else a prefix)
        and the companions beside them that exist. FileNotFoundError naming ``flag`` if one is missing."""
        if self.path == "file" or (self.path == "either" and os.path.isfile(path)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{flag} {path}: file not found")
            return [path]
        prefix = split_prefix(path)
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                what = "PREFIX.bin and PREFIX.idx" if self.path == "prefix" else f"a {self.name} file or a PREFIX"
                raise FileNotFoundError(f"{flag} {path}: {prefix + ext} not found (expected {what})")
        companions = [prefix + s + ext for s in self.companions for ext in (".bin", ".idx")]
        return [prefix + ".bin", prefix + ".idx", *(p for p in companions if os.path.isfile(p))]


DATA_TYPES: Records[DataType] = Records("--data_type")


def register_data_type(record: DataType) -> DataType:
    """Add a data type (a test, a plug-in)."""
    return DATA_TYPES.register(record)


def get_data_type(name: str) -> DataType:
    """The record for ``--data_type name``; a ValueError naming the flag and the choices otherwise."""
    return DATA_TYPES[name]


def _chat(path: str, o: DataOptions, padded: bool) -> Documents:
    if is_binidx_path(path):
        return read_binidx(path, o.ctx_len, o.vocab_size, o.too_long, padded, chat=True)
    docs, flags, stats = load_chat(path, o.vocab_size, o.ctx_len, o.tokenizer, ChatTemplate.load(o.chat_template),
                                   o.too_long, o.strict, padded)
    return Documents(docs, path, stats.summary(), flags=flags)


def _sft(path: str, o: DataOptions, padded: bool) -> Documents:
    docs, starts, stats = load_sft(path, o.vocab_size, o.ctx_len, o.tokenizer, o.sft_field, o.sft_template,
                                   o.strict)
    return Documents(docs, path, stats.summary(), loss_start=starts)


def _jsonl(path: str, o: DataOptions, padded: bool) -> Documents:
    docs, stats = load_texts(path, o.vocab_size, o.tokenizer, o.strict)
    return Documents(docs, path, stats.summary())


for _record in (
    DataType("binidx", "PREFIX of a .bin/.idx pair (RWKV-LM's; make_binidx writes one)",
             lambda path, o, padded: read_binidx(path, o.ctx_len, o.vocab_size, o.too_long, padded), path="prefix"),
    DataType("jsonl", "{'text': ...} per line; loss on every token", _jsonl,
             write=lambda a: make_binidx(a.input, a.output, a.tokenizer, a.field, a.strict, not a.quiet),
             writes="PREFIX.bin/.idx (train with --data_type binidx)"),
    DataType("sft", f"prompt/response jsonl (--sft_field, --sft_template {DEFAULT_SFT_TEMPLATE!r}); "
             "loss on the response", _sft, dataloads=("pad",), chat_stop=True),
    DataType("chat", "{'messages': [{'role', 'content'}...]} or {'text': 'User: ...'} jsonl, or a make_binidx "
             "--data_type chat PREFIX; loss on assistant turns", _chat, path="either", chat_stop=True,
             companions=(MASK_SUFFIX,),
             write=lambda a: make_chat_binidx(a.input, a.output, a.tokenizer, a.chat_template, a.strict,
                                              not a.quiet),
             writes="PREFIX.bin/.idx and the loss flags PREFIX.mask.bin/.idx (train with --data_type chat)"),
):
    register_data_type(_record)
