"""The binidx writers make_binidx runs (the data type records name them): jsonl text, and chat with its
per-token loss flags in PREFIX.mask.bin/.idx beside PREFIX.bin/.idx."""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rwkv_peft import files

from .binidx import BinIdxWriter, split_prefix, token_dtype
from .chat import EXPECTED, MASK_SUFFIX, ChatTemplate, iter_conversations
from .jsonl import JsonlStats, iter_jsonl_batches
from .tokenizer import END_TOKEN, get_tokenizer

BYTES_PER_TOKEN = 4  # about what World and GPT-NeoX tokens average in jsonl text: the free-space estimate


def _check_files(input_path: str, output_prefix: str, tokenizer: str, template: str | None,
                 suffixes: tuple[str, ...]) -> None:
    """Before the tokenizer loads: --input exists, no output (PREFIX + each suffix, .bin/.idx) is one of
    the inputs, the output directory takes files; temps of killed runs there are removed."""
    if not os.path.isfile(input_path):
        raise FileNotFoundError(f"{input_path}: --input jsonl file not found")
    prefix, flag = split_prefix(output_prefix), f"--output {output_prefix}"
    outputs = [Path(prefix + s + ext) for s in suffixes for ext in (".bin", ".idx")]
    inputs = {input_path: f"--input {input_path}"}
    for path, name in ((tokenizer, "--tokenizer"), (template, "--chat_template")):
        if path and os.path.isfile(path):
            inputs[path] = f"{name} {path}"
    files.check_not_input(dict.fromkeys(outputs, flag), inputs)
    files.check_writable_dir(outputs[0].parent, flag, create=False)
    for p in outputs:
        files.note_removed(files.remove_stale_temps(p.parent, p.name))


def _check_space(input_path: str, output_prefix: str, itemsize: int) -> None:
    """Room for the estimated output (tokens, and one flag byte each for a chat's loss mask)."""
    need = os.path.getsize(input_path) // BYTES_PER_TOKEN * itemsize
    files.check_free_space(Path(split_prefix(output_prefix)).parent, need, f"--output {output_prefix}")


def make_binidx(input_path: str, output_prefix: str, tokenizer: str = "world",
                field: str = "text", strict: bool = False, progress: bool = True) -> JsonlStats:
    """Tokenize input_path into output_prefix.bin/.idx; returns the counts."""
    _check_files(input_path, output_prefix, tokenizer, None, ("",))
    tok = get_tokenizer(tokenizer)
    _check_space(input_path, output_prefix, token_dtype(tok.vocab_size).itemsize)
    stats = JsonlStats(input_path)
    bar = tqdm(total=os.path.getsize(input_path), unit="B", unit_scale=True,
               disable=not progress, desc="tokenizing")
    with BinIdxWriter(output_prefix, token_dtype(tok.vocab_size)) as out:
        # ~1 MB of lines per step: one JSON parse, one tokenizer call, one write
        for _, values, done in iter_jsonl_batches(input_path, (field,), stats, strict):
            if values:
                ids, sizes = tok.encode_documents([v[0] for v in values], END_TOKEN)
                out.add_documents(ids, sizes)
                stats.keep(len(ids), documents=len(sizes))
            bar.update(done - bar.n)
        bar.close()
        if stats.documents == 0:
            raise ValueError(f"{input_path}: no usable documents with a string field "
                             f"'{field}' ({stats.summary(with_path=False)}); nothing written")
    return stats


def make_chat_binidx(input_path: str, output_prefix: str, tokenizer: str = "world",
                     chat_template: str | None = None, strict: bool = False,
                     progress: bool = True) -> JsonlStats:
    """Tokenize a chat jsonl into PREFIX.bin/.idx and its loss flags PREFIX.mask.bin/.idx."""
    _check_files(input_path, output_prefix, tokenizer, chat_template, ("", MASK_SUFFIX))
    template = ChatTemplate.load(chat_template)
    tok = get_tokenizer(tokenizer)
    _check_space(input_path, output_prefix, token_dtype(tok.vocab_size).itemsize + 1)
    stats = JsonlStats(input_path)
    stats.trained = 0
    prefix = split_prefix(output_prefix)
    with ExitStack() as stack, tqdm(unit=" conversations", disable=not progress,
                                    desc="tokenizing") as bar:
        # closed in reverse order: the tokens land after their flags, and on error neither
        out = stack.enter_context(BinIdxWriter(prefix, token_dtype(tok.vocab_size)))
        flags_out = stack.enter_context(BinIdxWriter(prefix + MASK_SUFFIX, np.uint8))
        for _, ids, flags in iter_conversations(input_path, tokenizer, template, stats, strict):
            out.add_document(ids)
            flags_out.add_document(flags)
            stats.keep(len(ids), int(flags.sum()))
            bar.update(1)
        if stats.documents == 0:
            raise ValueError(f"{input_path}: no usable conversations "
                             f"({stats.summary(with_path=False)}); expected {EXPECTED}; "
                             "nothing written")
    return stats
