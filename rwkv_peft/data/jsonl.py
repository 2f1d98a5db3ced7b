"""Streaming jsonl reader shared by make_binidx and the in-memory datasets.

A bad line (not UTF-8, not JSON, not an object, a field missing or not a string) is
skipped and counted by reason; with strict=True it is an error naming the file and line
instead. Empty documents are always skipped and counted: they are harmless.
"""

from __future__ import annotations

import codecs
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
    trained: int | None = None  # tokens carrying loss, where a mask decides (chat)
    skipped: Counter = field(default_factory=Counter)
    first_line: dict = field(default_factory=dict)
    kept_changed: Counter = field(default_factory=Counter)  # kept but altered, e.g. truncated
    unit: str = "documents"  # what a kept record is (preference: pairs)

    def skip(self, reason: str, lineno: int) -> None:
        self.skipped[reason] += 1
        self.first_line.setdefault(reason, lineno)

    def keep(self, n_tokens: int, trained: int | None = None, documents: int = 1) -> None:
        """Count kept documents and their tokens (``trained`` of them carrying loss, where a mask decides)."""
        self.documents += documents
        self.tokens += n_tokens
        if trained is not None:
            self.trained += trained

    def summary(self, with_path: bool = True) -> str:
        s = f"{self.documents} {self.unit}, {self.tokens} tokens"
        if self.trained is not None:
            s += f" ({self.trained} trained)"
        s = f"{self.path}: {s}" if with_path else s
        for what, n in self.kept_changed.most_common():
            s += f"; {n} {what}"
        if self.skipped:
            parts = [f"{n} {r} (first at line {self.first_line[r]})"
                     for r, n in self.skipped.most_common()]
            s += f"; skipped {sum(self.skipped.values())} lines: " + ", ".join(parts)
        return s


def _line_object(raw: bytes) -> tuple[str | None, dict | None]:
    """(reason to skip or None, the JSON object) of one line; reason '' for a blank line."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8", None
    except json.JSONDecodeError:
        return ("" if raw.isspace() else "not JSON"), None
    if not isinstance(obj, dict):
        return "not a JSON object", None
    return None, obj


def _line_values(raw: bytes, fields: tuple[str, ...], allow_empty: tuple[str, ...]
                 ) -> tuple[str | None, tuple[str, ...] | None]:
    """(reason to skip or None, field values) of one line; reason '' for a blank line."""
    reason, obj = _line_object(raw)
    if obj is None:
        return reason, None
    for k in fields:
        if k not in obj:
            return f"missing field '{k}'", None
        if not isinstance(obj[k], str):
            return f"field '{k}' not a string", None
    values = tuple(obj[k] for k in fields)
    return _empty(values, fields, allow_empty), values


def _empty(values: tuple[str, ...], fields: tuple[str, ...], allow_empty: tuple[str, ...]
           ) -> str | None:
    if any(values) and all(v or k in allow_empty for k, v in zip(fields, values, strict=True)):
        return None
    return "empty document"


def _batch_values(lines: list[bytes], fields: tuple[str, ...]) -> list[tuple] | None:
    """Field values of a batch of lines parsed as one JSON array (far fewer Python calls).

    None unless every line is one JSON object whose fields are all strings; the caller
    then takes the line-by-line path, which names the reason for each bad line.
    """
    try:
        objs = json.loads(b"[" + b",".join(lines) + b"]")
        if len(objs) != len(lines):  # e.g. a line holding '{...},{...}'
            return None
        values = [tuple(o[k] for k in fields) for o in objs]
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError):
        return None
    if not all(type(v) is str for t in values for v in t):
        return None
    return values


def iter_jsonl_batches(path: str, fields: tuple[str, ...], stats: JsonlStats,
                       strict: bool = False, allow_empty: tuple[str, ...] = (),
                       batch_bytes: int = 1 << 20
                       ) -> Iterator[tuple[list[int], list[tuple[str, ...]], int]]:
    """Yield (line numbers, field values, bytes read so far) for the usable lines of each
    ~batch_bytes chunk of the file.

    A value may be empty only for fields named in allow_empty; a line whose values are all
    empty, or whose required ones are, counts as an empty document.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: jsonl file not found")
    done, first = 0, 1
    with open(path, "rb") as f:
        while lines := f.readlines(batch_bytes):
            done += sum(len(x) for x in lines)
            if first == 1 and lines[0].startswith(codecs.BOM_UTF8):
                lines[0] = lines[0][len(codecs.BOM_UTF8):]  # files saved by some editors
            linenos, values = [], []
            fast = _batch_values(lines, fields)
            if fast is not None and not allow_empty and all(all(v) for v in fast):
                # the common case: every line good, nothing to count
                yield list(range(first, first + len(lines))), fast, done
                first += len(lines)
                continue
            for i, raw in enumerate(lines):
                if fast is None:
                    reason, vals = _line_values(raw, fields, allow_empty)
                else:
                    vals = fast[i]
                    reason = _empty(vals, fields, allow_empty)
                if reason is None:
                    linenos.append(first + i)
                    values.append(vals)
                elif reason:
                    if strict and reason != "empty document":
                        raise ValueError(f"{path}:{first + i}: {reason} (expected a JSON object"
                                         f" with string field(s) {', '.join(fields)})")
                    stats.skip(reason, first + i)
            first += len(lines)
            yield linenos, values, done


def iter_jsonl(path: str, fields: tuple[str, ...], stats: JsonlStats, strict: bool = False,
               allow_empty: tuple[str, ...] = ()) -> Iterator[tuple[int, tuple[str, ...]]]:
    """Yield (line number, field values) for each usable line (see iter_jsonl_batches)."""
    for linenos, values, _ in iter_jsonl_batches(path, fields, stats, strict, allow_empty):
        yield from zip(linenos, values, strict=True)


def reject(stats: JsonlStats, reason: str, lineno: int, strict: bool, expected: str) -> None:
    """Count a bad line (skipped), or with strict=True raise the one-line error naming it."""
    if strict:
        raise ValueError(f"{stats.path}:{lineno}: {reason} (expected {expected})")
    stats.skip(reason, lineno)


def iter_jsonl_objects(path: str, stats: JsonlStats, strict: bool = False,
                       expected: str = "a JSON object") -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each line holding a JSON object; the caller checks
    its fields (and calls `reject` for bad ones). Blank lines are ignored."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: jsonl file not found")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            reason, obj = _line_object(raw)
            if obj is not None:
                yield lineno, obj
            elif reason:
                reject(stats, reason, lineno, strict, expected)
