"""Generated text streamed as it becomes final: whole UTF-8 characters, cut at the first stop string."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence


class TextStream:
    """The text of the tokens generated so far, cut at the first stop string; ``on_text`` gets each part
    once it is final: whole UTF-8 characters, and no tail that could still become a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str], on_text: Callable[[str], None] | None):
        self.tokenizer, self.stop, self.on_text = tokenizer, [x for x in stop if x], on_text
        self.vocab = getattr(tokenizer, "idx2token", None)  # World: bytes per id, decoded incrementally
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if self.vocab is not None else None
        self.pending: list[int] = []  # HF tokenizers: tokens whose text does not decode cleanly yet
        self.text, self.emitted = "", 0

    def add(self, tok: int) -> bool:
        """Append ``tok``'s text; True when it completed a stop string (the text is then cut before it)."""
        before = len(self.text)
        if self.utf8 is not None:
            self.text += self.utf8.decode(self.vocab.get(tok, b""))  # unassigned ids: no text
        else:
            self.pending.append(tok)
            piece = self.tokenizer.decode(self.pending)
            if "\ufffd" not in piece:
                self.text, self.pending = self.text + piece, []
        hit = _find_stop(self.text, self.stop, before)
        if hit is not None:
            self.text = self.text[:hit]
            return True
        self._emit(len(self.text) - _held_back(self.text, self.stop))
        return False

    def finish(self, stopped: bool) -> str:
        """The whole text; without a stop string, what was held back (a stop-string prefix, an unfinished
        character) is flushed too."""
        if not stopped:
            self.text += self.utf8.decode(b"", final=True) if self.utf8 is not None else (
                self.tokenizer.decode(self.pending) if self.pending else "")
        self._emit(len(self.text))
        return self.text

    def _emit(self, end: int) -> None:
        if self.on_text is not None and end > self.emitted:
            self.on_text(self.text[self.emitted : end])
            self.emitted = end


def _find_stop(text: str, stop: Sequence[str], new_from: int) -> int | None:
    """Where the earliest stop string starts, looking only at matches that end in the new text."""
    hits = [j for s in stop if (j := text.find(s, max(0, new_from - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could still become a stop string."""
    return max((k for s in stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)

