"""What every command line of the project shares: bad input ends in one ``error: ...`` line and a
non-zero exit, argparse's own complaints (a missing or malformed flag) included."""

from __future__ import annotations

import argparse
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
