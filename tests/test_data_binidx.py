"""binidx format: writer/reader round trip, a hand-built pair, and every bad-file error."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest

from rwkv_peft.data import build_dataset
from rwkv_peft.data.binidx import BinIdx, BinIdxWriter

DOCS = [[5, 6, 7, 0], [9, 0], [65535, 1, 2, 3, 0]]


def hand_built(prefix: str, docs: list[list[int]], code: int = 8, dtype: str = "<u2") -> None:
    """A binidx pair written straight from the format description, not via our writer."""
    item = np.dtype(dtype).itemsize
    sizes = [len(d) for d in docs]
    pointers = [sum(sizes[:i]) * item for i in range(len(docs))]
    with open(prefix + ".bin", "wb") as f:
        for d in docs:
            f.write(np.array(d, dtype=dtype).tobytes())
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", code))
        f.write(struct.pack("<Q", len(docs)))
        f.write(struct.pack("<Q", len(docs) + 1))
        f.write(struct.pack(f"<{len(docs)}i", *sizes))
        f.write(struct.pack(f"<{len(docs)}q", *pointers))
        f.write(struct.pack(f"<{len(docs) + 1}q", *range(len(docs) + 1)))


def write(prefix: str, docs: list[list[int]], dtype=np.uint16) -> None:
    with BinIdxWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_round_trip(tmp_path, dtype):
    docs = DOCS + [[70000, 0]] if dtype == np.int32 else DOCS
    write(str(tmp_path / "d"), docs, dtype)
    r = BinIdx(str(tmp_path / "d.bin"))  # .bin / .idx suffixes name the same pair
    assert r.dtype == np.dtype(dtype) and len(r) == len(docs)
    assert [r[i].tolist() for i in range(len(r))] == docs
    assert r.tokens.tolist() == sum(docs, [])
    assert r.doc_idx.tolist() == list(range(len(docs) + 1))
    assert r.doc_of(0) == 0 and r.doc_of(4) == 1 and r.doc_of(6) == 2
    r2 = pickle.loads(pickle.dumps(r))  # DataLoader workers reopen by path
    assert r2.tokens.tolist() == r.tokens.tolist()


def test_writer_matches_hand_built_bytes(tmp_path):
    write(str(tmp_path / "ours"), DOCS)
    hand_built(str(tmp_path / "ref"), DOCS)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
    r = BinIdx(str(tmp_path / "ref"))
    assert [r[i].tolist() for i in range(3)] == DOCS


def test_hand_built_int32_reads_back(tmp_path):
    docs = [[1, 2, 100000], [0]]
    hand_built(str(tmp_path / "x"), docs, code=4, dtype="<i4")
    r = BinIdx(str(tmp_path / "x.idx"))
    assert [r[i].tolist() for i in range(2)] == docs and r.dtype == np.int32


def test_writer_error_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="does not fit uint16"):
        write(str(tmp_path / "d"), [[1, 2], [70000]])
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="output directory"):
        BinIdxWriter(str(tmp_path / "no" / "d"))


@pytest.mark.parametrize("missing", [".idx", ".bin"])
def test_missing_file(tmp_path, missing):
    write(str(tmp_path / "d"), DOCS)
    os.unlink(tmp_path / f"d{missing}")
    with pytest.raises(FileNotFoundError, match=rf"d\{missing}: missing"):
        BinIdx(str(tmp_path / "d"))


def test_truncated_bin(tmp_path):
    write(str(tmp_path / "d"), DOCS)
    with open(tmp_path / "d.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=r"d\.bin: truncated: 10 bytes, the index needs 22"):
        BinIdx(str(tmp_path / "d"))


def test_bad_magic_and_truncated_idx(tmp_path):
    write(str(tmp_path / "d"), DOCS)
    raw = (tmp_path / "d.idx").read_bytes()
    (tmp_path / "d.idx").write_bytes(b"NOTANIDX\x00" + raw[9:])
    with pytest.raises(ValueError, match=r"d\.idx: not an MMIDIDX index"):
        BinIdx(str(tmp_path / "d"))
    (tmp_path / "d.idx").write_bytes(raw[:-8])
    with pytest.raises(ValueError, match=r"d\.idx: .* bytes, expected"):
        BinIdx(str(tmp_path / "d"))
    (tmp_path / "d.idx").write_bytes(raw[:9] + struct.pack("<Q", 2) + raw[17:])
    with pytest.raises(ValueError, match="version 2"):
        BinIdx(str(tmp_path / "d"))


def test_token_id_outside_vocab(tmp_path):
    write(str(tmp_path / "d"), DOCS)
    with pytest.raises(ValueError, match=r"d\.bin: document 2 \(token 0\) has id 65535"):
        build_dataset(str(tmp_path / "d"), "binidx", "pad", ctx_len=4, vocab_size=1000,
                      samples_per_epoch=4, seed=0)
    # per-window check used for files too big to scan up front
    r = BinIdx(str(tmp_path / "d"))
    r.check_ids(1000, 0, r.tokens[:6])
    with pytest.raises(ValueError, match="document 2"):
        r.check_ids(1000, 6, r.tokens[6:])
