"""Tokenizers: the RWKV World vocab (fast, exact) and any Hugging Face tokenizer.json.

The World tokenizer is a greedy longest-match over byte strings. The `rwkv` package does
it in pure Python (a few hundred thousand tokens/s), too slow for large jsonl files, so the
same walk runs in a small C trie (trie.c) compiled once with the system C compiler and
loaded with ctypes. Without a compiler it falls back to a pure-Python walk with identical
output; `tests/test_data_tokenizer.py` checks both against `rwkv` itself.
"""

from __future__ import annotations

import ast
import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import warnings
from array import array
from pathlib import Path

import numpy as np

WORLD_VOCAB = "rwkv_vocab_v20230424.txt"
WORLD_VOCAB_SIZE = 65536  # embedding rows of every World model; ids used are 0..65529
END_TOKEN = 0  # RWKV's end-of-document token (also the padding id; padding is masked)

_C_SOURCE = Path(__file__).with_name("trie.c")
_INT32_ZERO = array("i", [0])  # C int: int32 on every platform torch supports


def world_vocab_path() -> str:
    """Path of the World vocab file shipped by the `rwkv` pip package."""
    try:
        import rwkv
    except ImportError as e:
        raise ImportError("tokenizer 'world' needs the `rwkv` package (pip install rwkv)") from e
    path = Path(rwkv.__file__).with_name(WORLD_VOCAB)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: World vocab missing from the installed rwkv package")
    return str(path)


@functools.lru_cache(maxsize=2)
def load_world_vocab(path: str) -> dict[int, bytes]:
    """Parse the `idx repr(token) byte_length` lines of an rwkv vocab file (cached: treat
    the result as read-only)."""
    vocab: dict[int, bytes] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                idx = int(line[: line.index(" ")])
                tok = ast.literal_eval(line[line.index(" ") : line.rindex(" ")].strip())
                tok = tok.encode("utf-8") if isinstance(tok, str) else tok
                if not isinstance(tok, bytes) or len(tok) != int(line[line.rindex(" ") :]):
                    raise ValueError("length mismatch")
            except (ValueError, SyntaxError) as e:
                raise ValueError(f"{path}:{lineno}: expected 'id repr(token) length' ({e})") from e
            vocab[idx] = tok
    return vocab


def check_vocab_range(ids: np.ndarray, vocab_size: int, where: str) -> None:
    """One-line error when a token id does not fit the model's vocab."""
    if len(ids) and int(ids.max()) >= vocab_size:
        raise ValueError(f"{where}: token id {int(ids.max())} >= model vocab_size {vocab_size} "
                         "(tokenizer and model do not match)")


def _cache_dir() -> Path:
    return Path(os.environ.get("RWKV_PEFT_CACHE", Path.home() / ".cache" / "rwkv_peft"))


@functools.lru_cache(maxsize=1)
def _load_trie_lib() -> ctypes.CDLL | None:
    """Compile trie.c once per source version (atomic rename) and load it; None if no cc."""
    try:
        src = _C_SOURCE.read_bytes()
    except OSError as e:  # e.g. an install that left out package data
        warnings.warn(f"{_C_SOURCE} missing ({e}); using the slow Python World tokenizer",
                      stacklevel=3)
        return None
    tag = hashlib.sha1(src + sys.platform.encode()).hexdigest()[:12]
    lib_path = _cache_dir() / f"trie_{tag}.so"
    if not lib_path.exists():
        cc, tmp = os.environ.get("CC", "cc"), None
        try:
            lib_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib_path.parent)
            os.close(fd)
            subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(_C_SOURCE)],
                           check=True, capture_output=True)
            os.replace(tmp, lib_path)
        except (OSError, subprocess.CalledProcessError) as e:
            if tmp and os.path.exists(tmp):
                os.unlink(tmp)
            warnings.warn(f"could not compile {_C_SOURCE} ({e}); using the slow Python "
                          "World tokenizer", stacklevel=3)
            return None
    try:
        lib = ctypes.CDLL(str(lib_path))
    except OSError as e:
        warnings.warn(f"could not load {lib_path} ({e}); using the slow Python World "
                      "tokenizer", stacklevel=3)
        return None
    lib.trie_build.restype = ctypes.c_void_p
    lib.trie_build.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.trie_encode.restype = ctypes.c_int64
    lib.trie_encode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int64, ctypes.c_void_p]
    lib.trie_encode_docs.restype = ctypes.c_int64
    lib.trie_encode_docs.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p,
                                     ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p,
                                     ctypes.c_void_p]
    lib.trie_free.restype = None
    lib.trie_free.argtypes = [ctypes.c_void_p]
    return lib


class WorldTokenizer:
    """RWKV World tokenizer; output equals rwkv.rwkv_tokenizer.TRIE_TOKENIZER."""

    def __init__(self, vocab_file: str | None = None, use_c: bool = True):
        self.vocab_file = vocab_file or world_vocab_path()
        self.idx2token = load_world_vocab(self.vocab_file)
        self.vocab_size = max(WORLD_VOCAB_SIZE, max(self.idx2token) + 1)
        self._byte_len = np.zeros(self.vocab_size, dtype=np.int64)
        self._byte_len[list(self.idx2token)] = [len(t) for t in self.idx2token.values()]
        self._lib = _load_trie_lib() if use_c else None
        self._trie = None
        if self._lib is not None:
            ids = np.fromiter(self.idx2token.keys(), dtype=np.int32)
            toks = list(self.idx2token.values())
            offsets = np.zeros(len(toks) + 1, dtype=np.int64)
            np.cumsum([len(t) for t in toks], out=offsets[1:])
            data = np.frombuffer(b"".join(toks), dtype=np.uint8)
            self._trie = self._lib.trie_build(data.ctypes.data, offsets.ctypes.data,
                                              ids.ctypes.data, len(toks))
            if not self._trie:
                raise MemoryError("could not allocate the World tokenizer trie")
        else:
            # every prefix of a token -> id of the token it spells, or -1 if none
            self._prefixes: dict[bytes, int] = {}
            for tok in self.idx2token.values():
                for j in range(1, len(tok)):
                    self._prefixes.setdefault(tok[:j], -1)
            for idx, tok in self.idx2token.items():
                self._prefixes[tok] = idx

    def __del__(self) -> None:
        if getattr(self, "_trie", None):
            self._lib.trie_free(self._trie)
            self._trie = None

    def __getstate__(self) -> dict:
        # the C trie is a raw pointer: rebuild it in the receiving process
        return {"vocab_file": self.vocab_file, "use_c": self._lib is not None}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["vocab_file"], state["use_c"])

    @property
    def compiled(self) -> bool:
        """True when the C trie is in use."""
        return self._trie is not None

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids as an int32 array (skips the list conversion on the hot path)."""
        src = text.encode("utf-8")
        if self._trie is None:
            return np.asarray(self._encode_py(src), dtype=np.int32)
        out, k = self._encode_c(src)
        return np.frombuffer(out, dtype=np.int32, count=k)

    def encode_bytes(self, src: bytes) -> list[int]:
        if self._trie is None:
            return self._encode_py(src)
        out, k = self._encode_c(src)
        return out[:k].tolist()

    def _encode_c(self, src: bytes) -> tuple[array, int]:
        # array.array: cheaper to allocate and address than numpy for short texts
        out = _INT32_ZERO * max(len(src), 1)
        k = self._lib.trie_encode(self._trie, src, len(src), out.buffer_info()[0])
        if k < 0:
            raise ValueError(f"no World token matches byte {-k - 1} of the input")
        return out, k

    def encode_documents(self, texts: list[str], eod: int = END_TOKEN
                         ) -> tuple[np.ndarray, np.ndarray]:
        """All texts back to back, each followed by eod: (int32 ids, tokens per document).

        One C call for the whole batch keeps per-document Python overhead small.
        """
        if self._trie is None:
            docs = [self._encode_py(t.encode("utf-8")) + [eod] for t in texts]
            sizes = np.array([len(d) for d in docs], dtype=np.int64)
            return np.array([i for d in docs for i in d], dtype=np.int32), sizes
        raw = [t.encode("utf-8") for t in texts]
        offsets = np.zeros(len(raw) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in raw], out=offsets[1:])
        out = np.empty(int(offsets[-1]) + len(raw), dtype=np.int32)
        sizes = np.empty(len(raw), dtype=np.int64)
        total = self._lib.trie_encode_docs(self._trie, b"".join(raw), offsets.ctypes.data,
                                           len(raw), eod, out.ctypes.data, sizes.ctypes.data)
        if total < 0:
            raise ValueError(f"no World token matches byte {-total - 1} of the batch")
        return out[:total], sizes

    def _encode_py(self, src: bytes) -> list[int]:
        prefixes, out, i, n = self._prefixes, [], 0, len(src)
        while i < n:
            best, end, j = -1, i, i + 1
            while j <= n:
                v = prefixes.get(src[i:j])
                if v is None:
                    break
                if v >= 0:
                    best, end = v, j
                j += 1
            if best < 0:
                raise ValueError(f"no World token matches byte {i} of the input")
            out.append(best)
            i = end
        return out

    def encode(self, text: str) -> list[int]:
        return self.encode_bytes(text.encode("utf-8"))

    def encode_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, character offset in `text` where each token starts): masks by text span."""
        src = text.encode("utf-8")
        ids = self.encode_array(text)
        byte_start = np.zeros(len(ids), dtype=np.int64)
        np.cumsum(self._byte_len[ids[:-1]], out=byte_start[1:])
        # UTF-8: every byte that is not a continuation byte (10xxxxxx) starts a character
        char_of_byte = np.cumsum((np.frombuffer(src, dtype=np.uint8) & 0xC0) != 0x80) - 1
        return ids, char_of_byte[byte_start] if len(ids) else byte_start

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.idx2token[i] for i in ids if i != END_TOKEN).decode(
            "utf-8", errors="replace")


class HFTokenizer:
    """Any Hugging Face `tokenizer.json` (e.g. the GPT-NeoX 20B one of the Pile models)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: tokenizer file not found (expected 'world' or a "
                                    "Hugging Face tokenizer.json)")
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on bad json
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({e})") from e
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, character offset in `text` where each token starts)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return (np.asarray(enc.ids, dtype=np.int64),
                np.asarray([o[0] for o in enc.offsets], dtype=np.int64))

    def encode_documents(self, texts: list[str], eod: int = END_TOKEN
                         ) -> tuple[np.ndarray, np.ndarray]:
        """All texts back to back, each followed by eod: (int64 ids, tokens per document)."""
        docs = [e.ids + [eod] for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        sizes = np.array([len(d) for d in docs], dtype=np.int64)
        return np.array([i for d in docs for i in d], dtype=np.int64), sizes

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


@functools.lru_cache(maxsize=4)
def get_tokenizer(name: str = "world") -> WorldTokenizer | HFTokenizer:
    """`world` (RWKV World vocab) or a path to a Hugging Face tokenizer.json; cached."""
    if name == "world":
        return WorldTokenizer()
    if name.endswith(".txt") and os.path.isfile(name):
        return WorldTokenizer(name)  # an rwkv-style vocab file
    return HFTokenizer(name)
