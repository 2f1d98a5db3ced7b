"""Streaming jsonl reader shared by make_binidx and the in-memory datasets.

A bad line (not UTF-8, not JSON, not an object, a field missing or not a string) is
skipped and counted by reason; with strict=True it is an error naming the file and line
instead. Empty documents are always skipped and counted: they are harmless.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class JsonlStats:
    """What a pass over a jsonl file kept and skipped (reason -> count, first lines)."""

    path: str
    documents: int = 0
    tokens: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_line: dict = field(default_factory=dict)

    def skip(self, reason: str, lineno: int) -> None:
        self.skipped[reason] += 1
        self.first_line.setdefault(reason, lineno)

    def summary(self) -> str:
        s = f"{self.path}: {self.documents} documents, {self.tokens} tokens"
        if self.skipped:
            parts = [f"{n} {r} (first at line {self.first_line[r]})"
                     for r, n in self.skipped.most_common()]
            s += f"; skipped {sum(self.skipped.values())} lines: " + ", ".join(parts)
        return s


def iter_jsonl(path: str, fields: tuple[str, ...], stats: JsonlStats, strict: bool = False,
               allow_empty: tuple[str, ...] = ()) -> Iterator[tuple[int, tuple[str, ...], int]]:
    """Yield (line number, field values, bytes read so far) for each usable line.

    A value may be empty only for fields named in allow_empty; a line whose values are all
    empty, or whose required ones are, counts as an empty document.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: jsonl file not found")
    done = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            done += len(raw)
            if not raw.strip():
                continue  # blank lines (e.g. a trailing newline) are not documents
            reason = None
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                reason = "not UTF-8"
            except json.JSONDecodeError:
                reason = "not JSON"
            if reason is None and not isinstance(obj, dict):
                reason = "not a JSON object"
            if reason is None:
                for k in fields:
                    if k not in obj:
                        reason = f"missing field '{k}'"
                    elif not isinstance(obj[k], str):
                        reason = f"field '{k}' not a string"
                    else:
                        continue
                    break
            if reason is None:
                values = tuple(obj[k] for k in fields)
                if not all(v or k in allow_empty for k, v in zip(fields, values, strict=True)) \
                        or not any(values):
                    reason = "empty document"
            if reason is not None:
                if strict and reason != "empty document":
                    raise ValueError(f"{path}:{lineno}: {reason} (expected a JSON object with "
                                     f"string field(s) {', '.join(fields)})")
                stats.skip(reason, lineno)
                continue
            yield lineno, values, done
