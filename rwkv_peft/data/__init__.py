"""Data pipeline: binidx / jsonl / sft sources, the get / pad / sft samplers, tokenizers.

The trainer needs only `build_dataset` and `get_tokenizer`.
"""

from __future__ import annotations

import sys
from functools import partial

import numpy as np

from .binidx import BinIdx, BinIdxWriter
from .dataset import DocDataset, GetDataset, largest_magic_prime, permute
from .jsonl import JsonlStats, iter_jsonl
from .tokenizer import END_TOKEN, get_tokenizer

__all__ = ["DEFAULT_SFT_TEMPLATE", "BinIdx", "BinIdxWriter", "DocDataset", "GetDataset",
           "build_dataset", "get_tokenizer", "largest_magic_prime", "load_sft", "load_texts",
           "permute", "render_sft"]

DEFAULT_SFT_TEMPLATE = "User: {prompt}\n\nAssistant: {response}"


def _check_range(ids: np.ndarray, vocab_size: int, where: str) -> None:
    if len(ids) and int(ids.max()) >= vocab_size:
        raise ValueError(f"{where}: token id {int(ids.max())} >= model vocab_size {vocab_size} "
                         "(tokenizer and model do not match)")


def _checked(*_: object) -> None:
    """In-memory data had its ids range-checked while tokenizing."""


def load_texts(path: str, vocab_size: int, tokenizer: str = "world", strict: bool = False,
               field: str = "text") -> tuple[list[np.ndarray], JsonlStats]:
    """Tokenize a small `{"text": ...}` jsonl into memory; each document ends in token 0."""
    tok = get_tokenizer(tokenizer)
    stats, docs = JsonlStats(path), []
    for lineno, (text,) in iter_jsonl(path, (field,), stats, strict):
        ids = np.append(tok.encode_array(text), END_TOKEN).astype(np.int32)
        _check_range(ids, vocab_size, f"{path}:{lineno}")
        docs.append(ids)
        stats.documents += 1
        stats.tokens += len(ids)
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
        _check_range(ids, vocab_size, f"{path}:{lineno}")
        if k >= ctx_len + 1:
            stats.skip(f"prompt longer than ctx_len {ctx_len}", lineno)
            continue
        docs.append(ids)
        starts.append(k)
        stats.documents += 1
        stats.tokens += len(ids)
    if not docs:
        raise ValueError(f"{path}: no usable prompt/response records with string fields "
                         f"'{fields[0]}', '{fields[1]}' ({stats.summary(with_path=False)})")
    return docs, np.asarray(starts, dtype=np.int64), stats


def build_dataset(data_file: str, data_type: str, dataload: str, ctx_len: int,
                  vocab_size: int, samples_per_epoch: int, seed: int, rank: int = 0,
                  world_size: int = 1, tokenizer: str = "world",
                  sft_field: tuple[str, str] = ("question", "answer"),
                  sft_template: str | None = None, magic_prime: int = 0,
                  strict: bool = False) -> GetDataset | DocDataset:
    """The training data set the trainer iterates; see rwkv_peft/data/dataset.py."""
    if data_type not in ("binidx", "jsonl", "sft"):
        raise ValueError(f"--data_type {data_type!r}: expected binidx, jsonl or sft")
    if data_type == "sft":
        dataload = "sft"
    elif dataload not in ("get", "pad"):
        raise ValueError(f"--dataload {dataload!r}: expected get or pad for --data_type "
                         f"{data_type} (sft data uses --data_type sft)")
    if magic_prime and dataload != "get":
        raise ValueError(f"--magic_prime applies to --dataload get, not {dataload}")
    common = dict(ctx_len=ctx_len, samples_per_epoch=samples_per_epoch, seed=seed, rank=rank,
                  world_size=world_size)

    if data_type == "binidx":
        data = BinIdx(data_file)
        # small files are checked up front; big ones window by window
        if data.num_tokens * data.dtype.itemsize <= 1 << 30:
            data.check_ids(vocab_size)
        if dataload == "get":
            ds = GetDataset(data, partial(data.check_ids, vocab_size), data.bin_path,
                            magic_prime=magic_prime, longest_doc=int(data.sizes.max()),
                            **common)
        else:
            order = None
            usable = data.sizes >= 2
            if not usable.all():
                order = np.flatnonzero(usable)
                if len(order) == 0:
                    raise ValueError(f"{data.bin_path}: every document has < 2 tokens; "
                                     "nothing to learn with --dataload pad")
            ds = DocDataset(data, partial(data.check_doc, vocab_size), order=order, **common)
        ds.summary = (f"{data.prefix}: {len(data)} documents, {data.num_tokens} tokens "
                      f"({data.dtype.name})")
    elif data_type == "jsonl":
        docs, stats = load_texts(data_file, vocab_size, tokenizer, strict)
        if dataload == "get":
            stream = np.concatenate(docs)
            ds = GetDataset(stream, _checked, data_file, magic_prime=magic_prime,
                            longest_doc=max(len(d) for d in docs), **common)
        else:
            ds = DocDataset(docs, _checked, **common)
        ds.summary = stats.summary()
    else:
        docs, starts, stats = load_sft(data_file, vocab_size, ctx_len, tokenizer, sft_field,
                                       sft_template, strict)
        ds = DocDataset(docs, _checked, loss_start=starts, **common)
        ds.summary = stats.summary()
    if rank == 0:
        print(f"data: {ds.summary}", file=sys.stderr)
    return ds
