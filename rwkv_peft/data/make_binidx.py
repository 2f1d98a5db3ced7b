"""jsonl -> binidx (RWKV-PEFT's json2binidx).

    python -m rwkv_peft.data.make_binidx --input X.jsonl --output PREFIX --tokenizer world

One document per line (`{"text": ...}`), token 0 appended to each as RWKV-LM does.
Streams line by line (memory: the 4-byte size of each document), shows a progress bar over
the input bytes, prints a summary of documents, tokens and skipped lines.

`--chat`: one conversation per line (rwkv_peft/data/chat.py: `{"messages": [...]}` or
`{"text": "User: ...\n\nAssistant: ..."}`), rendered with the chat template; the per-token
loss flags (uint8, 1 = trained) go to a second pair PREFIX.mask.bin/.idx with the same
document sizes, which `--data_type chat --data_file PREFIX` reads.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rwkv_peft import files
from rwkv_peft.cli import ArgumentParser, fail

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


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="jsonl file, one document per line")
    ap.add_argument("--output", required=True, help="output PREFIX (writes PREFIX.bin/.idx)")
    ap.add_argument("--tokenizer", default="world",
                    help="'world' (RWKV World vocab) or a Hugging Face tokenizer.json path")
    ap.add_argument("--field", default="text", help="jsonl field holding the document text")
    ap.add_argument("--chat", action="store_true",
                    help="chat conversations; also writes the loss flags to PREFIX.mask.bin/.idx")
    ap.add_argument("--chat_template", default="",
                    help="JSON file overriding the RWKV chat template (with --chat)")
    ap.add_argument("--strict", action="store_true",
                    help="fail on a bad line instead of skipping and counting it")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        if args.chat:
            stats = make_chat_binidx(args.input, args.output, args.tokenizer,
                                     args.chat_template, args.strict, progress=not args.quiet)
        else:
            stats = make_binidx(args.input, args.output, args.tokenizer, args.field,
                                args.strict, progress=not args.quiet)
    except (OSError, ValueError) as e:
        fail(e)
    print(stats.summary())
    prefix = split_prefix(args.output)
    print(f"wrote {prefix}.bin and .idx" + (f", {prefix}{MASK_SUFFIX}.bin and .idx" if args.chat else ""))


if __name__ == "__main__":
    main()
