"""Data pipeline: the data types (types.py: binidx / jsonl / sft / chat, one record each), the get / pad
samplers, tokenizers.

The trainer needs `build_dataset`, `load_documents` (held-out data), `get_data_type` and `get_tokenizer`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import partial

import numpy as np

from . import preference, prompts  # noqa: F401  (register --data_type preference and prompts)
from .binidx import BinIdx, BinIdxWriter
from .chat import ChatTemplate, load_chat
from .dataset import DocDataset, GetDataset, ItemDataset, largest_magic_prime, permute
from .documents import DEFAULT_SFT_TEMPLATE, Documents, checked, is_binidx_path, load_sft, load_texts, render_sft
from .tokenizer import get_tokenizer
from .types import DATA_TYPES, DataOptions, DataType, collate, get_data_type, register_data_type

__all__ = ["DATA_TYPES", "DEFAULT_SFT_TEMPLATE", "BinIdx", "BinIdxWriter", "ChatTemplate", "DataOptions",
           "DataType", "DocDataset", "Documents", "GetDataset", "ItemDataset", "build_dataset", "collate",
           "get_data_type", "get_tokenizer", "is_binidx_path", "largest_magic_prime", "load_chat", "load_documents",
           "load_sft", "load_texts", "permute", "read_data", "register_data_type", "render_sft"]


def read_data(data_file: str, data_type: str, options: DataOptions, padded: bool = True) -> Documents | Sequence[dict]:
    """Read a data file of any registered --data_type (Documents, or item dicts). padded: samples are one
    document each (pad / sft), so documents longer than ctx_len+1 are cut (counted, or dropped for chat
    with too_long='drop') and ones with nothing to learn in the window are left out."""
    return get_data_type(data_type).read(data_file, options, padded)


def load_documents(data_file: str, data_type: str, ctx_len: int, vocab_size: int,
                   tokenizer: str = "world", sft_field: tuple[str, str] = ("question", "answer"),
                   sft_template: str | None = None, chat_template: str | None = None,
                   too_long: str = "truncate", strict: bool = False, padded: bool = True
                   ) -> Documents:
    """``read_data`` of a token data type, with the options as keywords."""
    options = DataOptions(ctx_len, vocab_size, tokenizer, tuple(sft_field), sft_template, chat_template, too_long,
                          strict)
    data = read_data(data_file, data_type, options, padded)
    if not isinstance(data, Documents):
        raise ValueError(f"--data_type {data_type}: its records are not token documents")
    return data


def build_dataset(data_file: str, data_type: str, dataload: str, ctx_len: int,
                  vocab_size: int, samples_per_epoch: int, seed: int, rank: int = 0,
                  world_size: int = 1, tokenizer: str = "world",
                  sft_field: tuple[str, str] = ("question", "answer"),
                  sft_template: str | None = None, magic_prime: int = 0,
                  strict: bool = False, chat_template: str | None = None,
                  too_long: str = "truncate") -> GetDataset | DocDataset:
    """The training data set the trainer iterates; see rwkv_peft/data/dataset.py.

    Token data is cut into windows (get) or one document per sample (pad); item data (a type whose
    reader returns dicts) is one item per sample, in the same seeded order as pad."""
    kind = get_data_type(data_type)
    if not kind.tokens or len(kind.dataloads) == 1:  # items: one per sample
        dataload = kind.dataloads[0] if kind.tokens else "pad"
    elif dataload not in kind.dataloads:
        raise ValueError(f"--dataload {dataload!r}: expected {'|'.join(kind.dataloads)} for --data_type {data_type}")
    if magic_prime and dataload != "get":
        raise ValueError(f"--magic_prime applies to --dataload get, not {dataload}")
    common = dict(ctx_len=ctx_len, samples_per_epoch=samples_per_epoch, seed=seed, rank=rank,
                  world_size=world_size)
    options = DataOptions(ctx_len, vocab_size, tokenizer, tuple(sft_field), sft_template, chat_template, too_long,
                          strict)
    data = kind.read(data_file, options, dataload != "get")
    if not data:
        raise ValueError(f"{data_file}: no usable records for --data_type {data_type}")
    summary = getattr(data, "summary", "") or f"{data_file}: {len(data)} records"
    if not kind.tokens:
        ds = ItemDataset(data, checked, **common)
    elif dataload == "get":
        if isinstance(data.docs, BinIdx):
            stream, flags, check = data.docs, data.flags, partial(data.docs.check_ids, vocab_size)
            longest = int(data.docs.sizes.max())
        else:
            stream, check = np.concatenate(data.docs), checked
            flags = None if data.flags is None else np.concatenate(data.flags)
            longest = max(len(d) for d in data.docs)
        ds = GetDataset(stream, check, data.name, magic_prime=magic_prime, longest_doc=longest,
                        flags=flags, **common)
    else:
        ds = data.sampler(ctx_len, vocab_size, samples_per_epoch, seed, rank, world_size)
    ds.summary = summary
    if rank == 0:
        print(f"data: {ds.summary}", file=sys.stderr)
    return ds
