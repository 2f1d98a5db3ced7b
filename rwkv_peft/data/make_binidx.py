"""jsonl -> binidx (RWKV-PEFT's json2binidx).

    python -m rwkv_peft.data.make_binidx --input X.jsonl --output PREFIX --tokenizer world

One document per line (`{"text": ...}`), token 0 appended to each as RWKV-LM does.
Streams line by line (memory: the 4-byte size of each document), shows a progress bar over
the input bytes, prints a summary of documents, tokens and skipped lines.

`--data_type chat` (or `--chat`): one conversation per line (rwkv_peft/data/chat.py:
`{"messages": [...]}` or `{"text": "User: ...\n\nAssistant: ..."}`), rendered with the chat
template; the per-token loss flags (uint8, 1 = trained) go to a second pair PREFIX.mask.bin/.idx
with the same document sizes, which `--data_type chat --data_file PREFIX` reads. Each data type's
record (rwkv_peft/data/types.py) says whether make_binidx writes it, and what.
"""

from __future__ import annotations

from rwkv_peft.cli import ArgumentParser, fail

from .binidx import split_prefix
from .types import DATA_TYPES, get_data_type
from .writers import make_binidx, make_chat_binidx

__all__ = ["main", "make_binidx", "make_chat_binidx"]


def main(argv: list[str] | None = None) -> None:
    writable = [name for name, t in DATA_TYPES.items() if t.write is not None]
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="jsonl file, one document per line")
    ap.add_argument("--output", required=True, help="output PREFIX (writes PREFIX.bin/.idx)")
    ap.add_argument("--tokenizer", default="world",
                    help="'world' (RWKV World vocab) or a Hugging Face tokenizer.json path")
    ap.add_argument("--data_type", default="jsonl", help=f"the input's format: {' | '.join(writable)}")
    ap.add_argument("--field", default="text", help="jsonl field holding the document text")
    ap.add_argument("--chat", action="store_true", help="the same as --data_type chat")
    ap.add_argument("--chat_template", default="",
                    help="JSON file overriding the RWKV chat template (with --data_type chat)")
    ap.add_argument("--strict", action="store_true",
                    help="fail on a bad line instead of skipping and counting it")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        kind = get_data_type("chat" if args.chat else args.data_type)
        if kind.write is None:
            raise ValueError(f"--data_type {kind.name}: make_binidx cannot write it (expected {'|'.join(writable)})")
        stats = kind.write(args)
    except (OSError, ValueError) as e:
        fail(e)
    print(stats.summary())
    print(f"wrote {kind.writes.replace('PREFIX', split_prefix(args.output))}")


if __name__ == "__main__":
    main()
