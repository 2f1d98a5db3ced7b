"""Checkpoint files written as a stream, with unchanged tensors copied from the input as bytes.

A torch ``.pth`` is a zip of stored (uncompressed) records: ``data.pkl``, the pickled dict whose
tensors name their storage records, and one ``data/<n>`` record per storage, 64-byte aligned. A
``.safetensors`` file is a JSON header and then the tensors' bytes. Both hold a tensor as its plain
little-endian bytes, so a tensor that a merge leaves alone goes from the input file to the output
as bytes: no decode, no dtype round trip, no page of it in this process (``os.copy_file_range``).

``tensor_spans`` says where those bytes lie (read from the zip's and the pickle's metadata with
torch's own ``weights_only`` loader on the meta device: nothing else is unpickled, no data read);
``write_pth`` / ``write_safetensors`` take, per key of the output, a tensor or such a span.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import io
import json
import mmap
import os
import pickle
import struct
import sys
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from rwkv_peft.integrity import READ_CHUNK, Span, read_chunks, read_mapped, record_start

# legacy storage classes as torch.save pickles them (the weights_only loader allows exactly these)
STORAGE_TYPES = {
    torch.float32: torch.FloatStorage,
    torch.float64: torch.DoubleStorage,
    torch.float16: torch.HalfStorage,
    torch.bfloat16: torch.BFloat16Storage,
    torch.int64: torch.LongStorage,
    torch.int32: torch.IntStorage,
    torch.int16: torch.ShortStorage,
    torch.int8: torch.CharStorage,
    torch.uint8: torch.ByteStorage,
    torch.bool: torch.BoolStorage,
}
SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
FROM_SAFETENSORS = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
ALIGN = 64  # torch.save's storage alignment: records start on 64-byte boundaries (mmap loads rely on it)
CHUNK = READ_CHUNK  # bytes per read or cast when bytes pass through this process (tests lower it)
MAP_MIN = 1 << 20  # tensors of at least this many bytes are read through a mapping (tests lower it)

Spec = tuple[str, torch.dtype, tuple[int, ...]]  # key, dtype, shape of one output tensor


def tensor_spans(path: str | os.PathLike) -> dict[str, Span]:
    """Keys of ``path`` whose tensor is exactly the bytes of one stored region, and where those lie.

    Tensors that are views (offset into, or part of, a larger storage) or stored big-endian are
    left out; a caller writes those from the loaded tensor instead.
    """
    return tensor_layout(path)[1]


def tensor_layout(path: str | os.PathLike) -> tuple[list[Spec], dict[str, Span]]:
    """Every tensor's (key, dtype, shape) in the file's order, and ``tensor_spans``, from one read of the
    metadata; ``([], {})`` for a file this cannot read (the loader that reads the tensors says why)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _safetensors_layout(path)
    if not zipfile.is_zipfile(path):
        return [], {}  # not a zip checkpoint (legacy format, or no file): every tensor is written from memory
    try:
        meta = torch.load(path, map_location="meta", weights_only=True)
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            records = {record_start(f.fileno(), info.header_offset): info
                       for info in z.infolist() if info.compress_type == zipfile.ZIP_STORED}
            order = [z.read(i) for i in z.infolist() if i.filename.endswith("/byteorder")]
    except (OSError, RuntimeError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError):
        return [], {}
    if not isinstance(meta, dict) or not all(isinstance(t, torch.Tensor) for t in meta.values()):
        return [], {}
    specs = [(k, t.dtype, tuple(t.shape)) for k, t in meta.items()]
    if order and order[0].decode() != sys.byteorder or not order and sys.byteorder != "little":
        return specs, {}
    spans = {}
    for key, t in meta.items():
        s = t.untyped_storage()
        info = records.get(getattr(s, "_checkpoint_offset", None))
        if info and t.is_contiguous() and t.storage_offset() == 0 and t.nbytes == s.nbytes() == info.file_size > 0:
            spans[key] = Span(path, s._checkpoint_offset, t.nbytes, info.CRC)
    return specs, spans


def _safetensors_layout(path: Path) -> tuple[list[Spec], dict[str, Span]]:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        start, specs, spans = 8 + n, [], {}
        for k, v in header.items():
            if k == "__metadata__":
                continue
            lo, hi = v["data_offsets"]
            specs.append((k, FROM_SAFETENSORS[v["dtype"]], tuple(v["shape"])))
            if hi > lo:
                spans[k] = Span(path, start + lo, hi - lo)
        return specs, spans
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return [], {}


def read_float(span: Span, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor stored at ``span`` (``dtype``, ``shape``) in fp32, CRC-checked where the CRC is known. fp32/bf16
    tensors of ``MAP_MIN`` bytes or more are read through a private mapping (``read_mapped``), others a chunk
    at a time: memory peaks at the fp32 result plus at most one chunk, not the stored copy as well."""
    if _nbytes(dtype, shape) != span.nbytes:
        raise ValueError(f"{span.path}: {span.nbytes} bytes at {span.offset} cannot hold {dtype} {tuple(shape)}")
    out, size, done = torch.empty(shape, dtype=torch.float32), dtype.itemsize, 0
    if span.nbytes >= MAP_MIN and dtype in (torch.float32, torch.bfloat16) and read_mapped(span, size, out):
        return out
    flat = out.view(-1)
    for view in read_chunks(span, size, chunk=CHUNK):
        n = len(view) // size
        flat[done : done + n].copy_(torch.frombuffer(view, dtype=dtype))
        done += n
    return out


def prefetch(span: Span) -> None:
    """Ask the kernel to start reading ``span`` now (it arrives while other work goes on)."""
    fd = os.open(span.path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, span.offset, span.nbytes, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- process memory


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def mapped_ranges(path: str | os.PathLike) -> list[tuple[int, int]]:
    """Address ranges where this process has ``path`` memory-mapped (Linux; [] elsewhere)."""
    maps = Path("/proc/self/maps")
    if sys.platform != "linux" or not maps.is_file():
        return []
    target, out = os.path.realpath(path), []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, hi))
    return out


def release_pages(t: torch.Tensor, mapped: Iterable[tuple[int, int]]) -> None:
    """Drop the resident pages of a tensor read from a memory-mapped file (re-read from disk if touched again).

    Without this, every page of the base that was read stays in our RSS until exit, and peak
    memory grows to the whole model even though each tensor is needed only once. Only pages
    inside ``mapped`` (a file's read-only private mapping) are touched, never heap memory.
    """
    if not mapped or t.device.type != "cpu" or t.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = t.untyped_storage().data_ptr()
    end = start + t.untyped_storage().nbytes()
    lo, hi = start - start % page, end + (-end) % page
    if any(m_lo <= lo and hi <= m_hi for m_lo, m_hi in mapped):
        drop_pages(lo, hi)


def drop_pages(lo: int, hi: int) -> None:
    """MADV_DONTNEED over [lo, hi): only for ranges of a read-only file mapping (see ``release_pages``)."""
    _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)


def reuse_heap() -> None:
    """Make this process keep freed memory for the next tensor instead of handing it back (glibc only).

    Each merged tensor needs fp32 temporaries of its size; glibc maps big ones fresh and unmaps them
    on free, and fresh memory costs a page fault per 4 KiB (about a second per GB, more than the
    merge arithmetic). Served from a heap that is never trimmed, the next tensor reuses the same
    pages: peak memory is unchanged (one tensor's temporaries), the faults are gone. Process-wide,
    so only the merge CLI calls it.
    """
    mallopt = getattr(_libc(), "mallopt", None) if sys.platform == "linux" else None
    if mallopt is not None:
        mallopt(-4, 0)  # M_MMAP_MAX: no allocation gets its own mapping
        mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD (a C int): keep up to 2 GiB of free heap


# ----------------------------------------------------------------------------- writing


def _next(pieces: Iterator[torch.Tensor | Span], key: str) -> torch.Tensor | Span:
    """The next piece, never bound in the writer's loop: a written tensor is freed before the next is made."""
    piece = next(pieces, None)
    if piece is None:
        raise ValueError(f"{key}: no data given for it")
    return piece


def _no_more(pieces: Iterator[torch.Tensor | Span]) -> None:
    if next(pieces, None) is not None:
        raise ValueError("more tensors given than keys")


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


class _Copier:
    """Writes pieces to ``f``: bytes from memory, or a Span copied from its file inside the kernel.

    A copied span keeps the CRC-32 its input recorded; checking the input against it is the caller's
    (``check_crc``, e.g. on another thread while the kernel copies).
    """

    def __init__(self, f: BinaryIO):
        self.f, self._fds = f, {}
        self._cast: torch.Tensor | None = None

    def write(self, piece: torch.Tensor | Span, dtype: torch.dtype, want: int, key: str, crc: bool) -> int | None:
        """Write one tensor's bytes as ``dtype``; returns their CRC-32 when ``crc`` (None: unknown, not needed)."""
        if isinstance(piece, Span):
            if piece.nbytes != want:
                raise ValueError(f"{piece.path}: {key} holds {piece.nbytes} bytes, expected {want}")
            if crc and piece.crc is None:  # a zip record needs the CRC-32 a .safetensors input lacks
                return self._copy_through(piece, key)
            self._copy_in_kernel(piece)
            return piece.crc
        flat = piece.detach().contiguous().reshape(-1)
        if flat.numel() * dtype.itemsize != want:
            raise ValueError(f"{key}: {flat.numel() * dtype.itemsize} bytes computed, expected {want}")
        if flat.dtype == dtype:
            return self._put(memoryview(flat.view(torch.uint8).numpy()), 0 if crc else None)
        step = max(1, CHUNK // dtype.itemsize)  # cast a chunk at a time: no stored-dtype copy of the whole tensor
        if self._cast is None or self._cast.dtype != dtype:
            self._cast = torch.empty(step, dtype=dtype)
        c = 0 if crc else None
        for i in range(0, flat.numel(), step):
            part = self._cast[: min(step, flat.numel() - i)]
            part.copy_(flat[i : i + step])
            c = self._put(memoryview(part.view(torch.uint8).numpy()), c)
        return c

    def _put(self, data: memoryview, crc: int | None) -> int | None:
        """Write ``data``; returns the running CRC-32 ``crc`` continued over it (None: not computed)."""
        self.f.write(data)
        return None if crc is None else zlib.crc32(data, crc)

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def _short(self, span: Span) -> ValueError:
        return ValueError(f"{span.path}: truncated (a tensor's bytes end past the end of the file)")

    def _copy_through(self, span: Span, key: str) -> int:
        """Copy ``span`` through this process, computing its CRC-32."""
        crc = 0
        for view in read_chunks(span, what=key, chunk=CHUNK):
            crc = zlib.crc32(view, crc)
            self.f.write(view)
        return crc

    def _copy_in_kernel(self, span: Span) -> None:
        self.f.flush()
        src, dst, done = self._fd(span.path), self.f.fileno(), 0
        while done < span.nbytes:
            try:
                n = os.copy_file_range(src, dst, span.nbytes - done, span.offset + done)
            except OSError as e:  # filesystems / kernels without it: sendfile does the same
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                n = os.sendfile(dst, src, span.offset + done, span.nbytes - done)
            if n == 0:
                raise self._short(span)
            done += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _ZipWriter:
    """A zip of stored records in the layout torch.load reads: ``archive/<name>``, data 64-byte aligned,
    zip64 fields for sizes and offsets from ``limit`` (4 GiB - 1) on."""

    limit = 0xFFFFFFFF

    def __init__(self, f: BinaryIO):
        self.f, self.entries = f, []

    def _clip(self, v: int, full: int = 0xFFFFFFFF) -> int:
        return full if v >= self.limit else v

    def add(self, name: str, size: int, write: Callable[[], int]) -> None:
        """Write the local header, then ``write()`` (which returns the CRC-32), then patch that CRC in."""
        name_b = f"archive/{name}".encode()
        start = self.f.tell()
        zip64 = struct.pack("<HHQQ", 1, 16, size, size) if size >= self.limit else b""
        pad = (-(start + 30 + len(name_b) + len(zip64) + 4)) % ALIGN
        extra = zip64 + struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # padding field "FB", as torch's writer
        self.f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, 0, 0, 0, 0x21, 0,
                                 self._clip(size), self._clip(size), len(name_b), len(extra)) + name_b + extra)
        crc = write()
        end = self.f.tell()
        self.f.seek(start + 14)
        self.f.write(struct.pack("<I", crc))
        self.f.seek(end)
        self.entries.append((name_b, size, crc, start))

    def add_bytes(self, name: str, data: bytes) -> None:
        def write() -> int:
            self.f.write(data)
            return zlib.crc32(data)

        self.add(name, len(data), write)

    def close(self) -> None:
        """The central directory and end records (zip64 ones where counts, sizes or offsets need them)."""
        cd_start = self.f.tell()
        for name_b, size, crc, offset in self.entries:
            big = [v for v in (size, size, offset) if v >= self.limit]
            extra = struct.pack(f"<HH{len(big)}Q", 1, 8 * len(big), *big) if big else b""
            self.f.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45 if big else 20, 0, 0, 0, 0x21, crc,
                                     self._clip(size), self._clip(size), len(name_b), len(extra), 0, 0, 0, 0,
                                     self._clip(offset)) + name_b + extra)
        cd_end = self.f.tell()
        n, cd_size = len(self.entries), cd_end - cd_start
        if n >= 0xFFFF or cd_end >= self.limit:
            self.f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_size, cd_start))
            self.f.write(struct.pack("<IIQI", 0x07064B50, 0, cd_end, 1))
        count = 0xFFFF if n >= 0xFFFF else n
        self.f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, self._clip(cd_size),
                                 self._clip(cd_start), 0))


class _Slot:
    """Stands in for one tensor while pickling data.pkl (no data needed)."""

    def __init__(self, index: int, dtype: torch.dtype, shape: tuple[int, ...]):
        self.index, self.dtype, self.shape = index, dtype, shape

    def __reduce__(self):
        stride, acc = [], 1
        for n in reversed(self.shape):
            stride.insert(0, acc)
            acc *= n
        storage = _StorageRef(str(self.index), STORAGE_TYPES[self.dtype], acc)
        return torch._utils._rebuild_tensor_v2, (storage, 0, self.shape, tuple(stride), False, OrderedDict())


@dataclass
class _StorageRef:
    key: str
    storage_type: type
    numel: int


class _HeaderPickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> tuple | None:
        if isinstance(obj, _StorageRef):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def pth_header(specs: list[Spec]) -> bytes:
    """data.pkl of torch.save({key: tensor}) for tensors with these dtypes/shapes, each its own storage."""
    for key, dtype, _ in specs:
        if dtype not in STORAGE_TYPES:
            raise ValueError(f"{key}: dtype {dtype} cannot be written by the streaming .pth writer")
    buf = io.BytesIO()
    _HeaderPickler(buf, protocol=2).dump({k: _Slot(i, d, tuple(s)) for i, (k, d, s) in enumerate(specs)})
    return buf.getvalue()


def write_pth(f: BinaryIO, specs: list[Spec], pieces: Iterable[torch.Tensor | Span]) -> None:
    """Stream a torch.load-able .pth: the dict ``{key: tensor}`` of ``specs``, bytes from ``pieces`` in order.

    Spans keep their CRC-32 from the input zip, so a corrupt input stays detectable in the output
    (``check_crc`` reads an input through to find it before writing on). No ``.format_version`` record: with it,
    torch.load computes record offsets from miniz's layout (data descriptors) instead of reading them.
    """
    z, out = _ZipWriter(f), _Copier(f)
    try:
        z.add_bytes("data.pkl", pth_header(specs))
        z.add_bytes("byteorder", sys.byteorder.encode())
        pieces = iter(pieces)
        for i, (key, dtype, shape) in enumerate(specs):
            size = _nbytes(dtype, shape)
            z.add(f"data/{i}", size, lambda n=size, k=key, d=dtype: out.write(_next(pieces, k), d, n, k, crc=True))
        _no_more(pieces)
        z.add_bytes("version", b"3\n")
        z.close()
    finally:
        out.close()


def write_safetensors(f: BinaryIO, specs: list[Spec], pieces: Iterable[torch.Tensor | Span],
                      metadata: dict[str, str] | None = None) -> None:
    """Stream the safetensors layout (8-byte length, JSON header, data in order) from ``pieces``;
    ``metadata``: the header's ``__metadata__`` (transformers wants ``{"format": "pt"}``)."""
    header, offset = ({"__metadata__": metadata} if metadata else {}), 0
    for key, dtype, shape in specs:
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{key}: dtype {dtype} cannot be written to .safetensors")
        n = _nbytes(dtype, shape)
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-len(text)) % 8)
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    out = _Copier(f)
    try:
        pieces = iter(pieces)
        for key, dtype, shape in specs:
            out.write(_next(pieces, key), dtype, _nbytes(dtype, shape), key, crc=False)
        _no_more(pieces)
    finally:
        out.close()
