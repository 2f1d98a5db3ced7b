"""What every command line of the project shares: bad input ends in one ``error: ...`` line and a
non-zero exit, argparse's own complaints (a missing or malformed flag) included."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from rwkv_peft import files


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one ``error: ...`` line on stderr (exit 2), like the tools' own;
    argparse's usage block is left to ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def fail(e: BaseException) -> NoReturn:
    """End the program on an expected failure: one line naming the file or flag (``files.describe``)."""
    raise SystemExit(f"error: {files.describe(e)}") from None


class UserText:
    """Text a person handed over (a flag value, a file, stdin lines) as a str that tokenizers can encode:
    bytes that are not UTF-8 become U+FFFD, said once on stderr. A Latin-1 file piped into a chat must
    not end it with a traceback."""

    def __init__(self) -> None:
        self.noted = False

    def __call__(self, raw: bytes | str, what: str) -> str:
        if isinstance(raw, str):  # from argv: undecodable bytes arrive as lone surrogates (surrogateescape)
            try:
                raw = raw.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                raw = raw.encode("utf-8", "surrogatepass")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if not self.noted:
                self.noted = True
                print(f"note: {what} is not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at offset {e.start}); "
                      "undecodable bytes are read as U+FFFD", file=sys.stderr, flush=True)
            return raw.decode("utf-8", "replace")
