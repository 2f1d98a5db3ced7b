"""binidx: the Megatron / RWKV-LM `MMIDIDX` token format (`PREFIX.bin` + `PREFIX.idx`).

`.bin` holds the tokens of all documents back to back. `.idx` (little endian):

    magic   b"MMIDIDX\\x00\\x00"          9 bytes
    version <Q  = 1
    dtype   <B  code (1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 8 u16)
    n_docs  <Q  number of entries in sizes / pointers
    n_idx   <Q  number of entries in doc_idx
    sizes   int32[n_docs]      tokens per document
    pointers int64[n_docs]     byte offset of each document in .bin
    doc_idx int64[n_idx]       0, 1, ..., n_docs (document boundaries)

The reader memory-maps both files, so memory stays constant whatever their size; the
writer streams documents to a temporary file and renames both files only when complete.
"""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path

import numpy as np

from rwkv_peft import files

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n_docs, n_idx (34 bytes)
DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    8: np.dtype(np.uint16),
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


def split_prefix(path: str) -> str:
    """`x`, `x.bin` and `x.idx` all name the pair with prefix `x`."""
    return path[:-4] if path.endswith((".bin", ".idx")) else path


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest dtype RWKV-LM reads for ids < vocab_size (uint16 covers the World vocab)."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


class BinIdx:
    """Read-only view of a binidx pair: `tokens` (flat memmap), `sizes`, `pointers`."""

    def __init__(self, path: str):
        self.prefix = split_prefix(os.fspath(path))
        self.bin_path, self.idx_path = self.prefix + ".bin", self.prefix + ".idx"
        for p in (self.idx_path, self.bin_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: missing (binidx data needs both PREFIX.bin and "
                                        f"PREFIX.idx; got data_file {path!r})")
        self._open()

    def _open(self) -> None:
        idx_bytes = os.path.getsize(self.idx_path)
        with open(self.idx_path, "rb") as f:
            head = f.read(HEADER.size)
        if head[:9] != MAGIC:
            raise ValueError(f"{self.idx_path}: not an MMIDIDX index (magic {head[:9]!r}, "
                             f"expected {MAGIC!r})")
        if len(head) < HEADER.size:
            raise ValueError(f"{self.idx_path}: truncated header ({len(head)} of "
                             f"{HEADER.size} bytes)")
        _, version, code, n_docs, n_idx = HEADER.unpack(head)
        if version != VERSION:
            raise ValueError(f"{self.idx_path}: index version {version}, expected {VERSION}")
        if code not in DTYPES:
            raise ValueError(f"{self.idx_path}: dtype code {code} is not a token dtype "
                             f"(expected one of {sorted(DTYPES)})")
        self.dtype = DTYPES[code]
        want = HEADER.size + n_docs * 12 + n_idx * 8
        if idx_bytes != want:
            raise ValueError(f"{self.idx_path}: {idx_bytes} bytes, expected {want} for "
                             f"{n_docs} documents (truncated or corrupt index)")
        if n_docs == 0:
            raise ValueError(f"{self.idx_path}: contains no documents")
        idx = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        off = HEADER.size
        self.sizes = idx[off : off + 4 * n_docs].view(np.int32)
        off += 4 * n_docs
        self.pointers = idx[off : off + 8 * n_docs].view(np.int64)
        off += 8 * n_docs
        self.doc_idx = idx[off : off + 8 * n_idx].view(np.int64)

        item = self.dtype.itemsize
        self.num_tokens = int(self.sizes.sum(dtype=np.int64))
        start = int(self.pointers[0])
        end = int(self.pointers[-1]) + int(self.sizes[-1]) * item
        if end != start + self.num_tokens * item or (self.sizes < 0).any():
            raise ValueError(f"{self.idx_path}: documents are not stored back to back "
                             "(pointers disagree with sizes)")
        bin_bytes = os.path.getsize(self.bin_path)
        if bin_bytes < end:
            raise ValueError(f"{self.bin_path}: truncated: {bin_bytes} bytes, the index needs "
                             f"{end} ({self.num_tokens} tokens of {self.dtype.name})")
        if self.num_tokens == 0:
            raise ValueError(f"{self.bin_path}: all {n_docs} documents are empty")
        self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", offset=start,
                                shape=(self.num_tokens,))
        self._starts = (self.pointers - start) // item  # token offset of each document

    def __getstate__(self) -> dict:
        # reopen the memmaps in DataLoader workers instead of pickling their contents
        return {"prefix": self.prefix, "bin_path": self.bin_path, "idx_path": self.idx_path}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        s = int(self._starts[i])
        return self.tokens[s : s + int(self.sizes[i])]

    def doc_of(self, pos: int) -> int:
        """Index of the document holding token position `pos` of the stream."""
        return int(np.searchsorted(self._starts, pos, side="right")) - 1

    def check_ids(self, vocab_size: int, start: int = 0, ids: np.ndarray | None = None) -> None:
        """Raise if a token id in `ids` (default: the whole file, chunked) is >= vocab_size."""
        if self.dtype.kind == "u" and np.iinfo(self.dtype).max < vocab_size:
            return  # nothing this dtype can hold is out of range
        if ids is None:
            step = 1 << 24
            for s in range(0, self.num_tokens, step):
                self.check_ids(vocab_size, s, np.asarray(self.tokens[s : s + step]))
            return
        bad = np.flatnonzero((ids >= vocab_size) | (ids < 0))
        if len(bad):
            pos = start + int(bad[0])
            doc = self.doc_of(pos)
            at = pos - int(self._starts[doc])
            raise ValueError(f"{self.bin_path}: document {doc} (token {at}) has id "
                             f"{int(ids[bad[0]])}, outside the model vocab [0, {vocab_size})")


    def check_doc(self, vocab_size: int, d: int, ids: np.ndarray) -> None:
        """check_ids for (a prefix of) document d."""
        self.check_ids(vocab_size, int(self._starts[d]), ids)


class BinIdxWriter:
    """Streams documents into PREFIX.bin/.idx; files appear only after a clean close()."""

    def __init__(self, prefix: str, dtype: np.dtype | type = np.uint16):
        self.prefix = split_prefix(os.fspath(prefix))
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"binidx dtype {self.dtype} unsupported; use one of "
                             f"{[str(d) for d in DTYPE_CODES]}")
        out_dir = Path(self.prefix).parent
        if not out_dir.is_dir():
            raise FileNotFoundError(f"{out_dir}: output directory does not exist")
        self._lo, self._hi = np.iinfo(self.dtype).min, np.iinfo(self.dtype).max
        self._pending = files.PendingFile(self.prefix + ".bin")  # renamed by close(), dropped by abort()
        self._bin = open(self._pending.tmp, "wb")
        self.sizes = array("i")
        self.num_tokens = 0

    def add_document(self, ids: np.ndarray | list[int]) -> None:
        ids = np.asarray(ids)
        self.add_documents(ids, np.array([len(ids)]))

    def add_documents(self, ids: np.ndarray, sizes: np.ndarray) -> None:
        """Append documents stored back to back in ids, sizes[d] tokens each."""
        if len(ids) and (ids.min() < self._lo or ids.max() > self._hi):
            bad = int(ids.max()) if ids.max() > self._hi else int(ids.min())
            raise ValueError(f"{self.prefix}.bin: token id {bad} does not fit "
                             f"{self.dtype.name}")
        if len(sizes) and sizes.max() >= 2**31:
            raise ValueError(f"{self.prefix}.bin: document of {sizes.max()} tokens exceeds "
                             "int32")
        self._bin.write(ids.astype(self.dtype, copy=False).tobytes())
        self.sizes.extend(sizes.astype(np.int32).tolist())
        self.num_tokens += len(ids)

    def close(self) -> None:
        """Write the index and move both files into place (rwkv_peft.files: temp names, then renames)."""
        self._bin.close()
        sizes = np.frombuffer(self.sizes, dtype=np.int32) if len(self.sizes) else \
            np.zeros(0, np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1], out=pointers[1:])
        pointers *= self.dtype.itemsize
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
        try:
            with files.atomic_path(self.prefix + ".idx") as idx_tmp:
                with open(idx_tmp, "wb") as f:
                    f.write(HEADER.pack(MAGIC, VERSION, DTYPE_CODES[self.dtype], len(sizes), len(doc_idx)))
                    f.write(sizes.tobytes())
                    f.write(pointers.tobytes())
                    f.write(doc_idx.tobytes())
                self._pending.commit()  # .bin into place first: readers open the .idx first
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop everything written so far."""
        self._bin.close()
        self._pending.discard()

    def __enter__(self) -> BinIdxWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
