"""Integrity of what we read: a file's bytes read in chunks through one reused buffer, each span checked
against its recorded CRC-32 (torch's .pth files are zip archives that record one per tensor), or read
through a private mapping in one pass with the CRC, and whole zip checkpoints verified in a few threads."""

from __future__ import annotations

import ctypes
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

READ_CHUNK = 1 << 23  # bytes per read when a file's bytes pass through this process


@dataclass(frozen=True)
class Span:
    """A run of bytes inside a file (a zip record's data, one tensor's bytes) and, when known, the CRC-32
    recorded for them."""

    path: Path
    offset: int
    nbytes: int
    crc: int | None = None


def record_start(fd: int, header_offset: int) -> int:
    """Where a zip record's data starts: after its local header (whose name and extra lengths may differ
    from the central directory's). ValueError if no local header is there."""
    head = os.pread(fd, 30, header_offset)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise ValueError(f"no zip record header at byte {header_offset}")
    name_len, extra_len = struct.unpack_from("<HH", head, 26)
    return header_offset + 30 + name_len + extra_len


def read_chunks(span: Span, multiple: int = 1, what: str = "", chunk: int = READ_CHUNK) -> Iterator[memoryview]:
    """The bytes at ``span``, ``chunk`` bytes (a multiple of ``multiple``) at a time, read into one reused
    buffer (no mmap: what is read adds nothing to RSS); at the end, a ValueError naming ``what`` if they
    differ from their recorded CRC-32."""
    buf = bytearray(min(chunk - chunk % multiple, span.nbytes))
    crc, done = 0, 0
    fd = os.open(span.path, os.O_RDONLY)
    try:
        while done < span.nbytes:
            view = memoryview(buf)[: min(len(buf), span.nbytes - done)]
            got = 0
            while got < len(view):
                m = os.preadv(fd, [view[got:]], span.offset + done + got)
                if m == 0:
                    raise ValueError(f"{span.path}: truncated (a tensor's bytes end past the end of the file)")
                got += m
            if span.crc is not None:
                crc = zlib.crc32(view, crc)
            yield view
            done += len(view)
    finally:
        os.close(fd)
    if span.crc is not None and crc != span.crc:
        raise ValueError(f"{span.path}: corrupt: CRC-32 mismatch in {what or f'the tensor at byte {span.offset}'} "
                         f"(read {crc:08x}, recorded {span.crc:08x})")


def check_crc(span: Span, what: str = "") -> None:
    """Read ``span`` through and compare it with its recorded CRC-32 (a no-op without one)."""
    if span.crc is not None:
        for _ in read_chunks(span, what=what):
            pass


def check_zip(path: str | os.PathLike) -> None:
    """Verify the CRC-32 of every record of a zip checkpoint (torch's .pth format), in a few threads (reads
    and zlib release the GIL). ValueError naming the file and the first bad record: bit rot, a torn copy."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .pth checkpoint (truncated or corrupt: {e})") from None
    fd = os.open(path, os.O_RDONLY)
    try:
        length = os.fstat(fd).st_size

        def bad(info: zipfile.ZipInfo) -> str | None:
            if info.compress_type != zipfile.ZIP_STORED:  # torch stores; other writers may deflate
                try:
                    with zipfile.ZipFile(path) as z:
                        z.read(info)  # checks the CRC itself
                except (zipfile.BadZipFile, zlib.error):
                    return info.filename
                return None
            try:
                start = record_start(fd, info.header_offset)
                if start + info.file_size > length:
                    return info.filename
                check_crc(Span(path, start, info.file_size, info.CRC))
            except ValueError:
                return info.filename
            return None

        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            failed = [b for b in pool.map(bad, infos) if b]
    finally:
        os.close(fd)
    if failed:
        raise ValueError(f"{path}: corrupt: CRC-32 mismatch in record {failed[0].partition('/')[2] or failed[0]}"
                         + (f" and {len(failed) - 1} more" if len(failed) > 1 else "")
                         + " (the file changed after it was written: bit rot or a damaged copy)")


def read_mapped(span: Span, itemsize: int, out: torch.Tensor) -> bool:
    """The fp32 (itemsize 4) or bf16 (2) tensor at ``span`` into the fp32 ``out`` through a private mapping
    (csrc/mapped_read.cpp: no read buffer, widened and CRC-summed in one pass); False where that library
    cannot run here. A file truncated under the mapping is the error a short read gives, not SIGBUS."""
    from rwkv_peft.ops.build import load_library

    try:
        lib = load_library("mapped_read")
    except (OSError, RuntimeError, ImportError):  # no compiler here: the chunked reads do it
        return False
    lib.mapped_read_ready.restype = lib.mapped_read.restype = ctypes.c_int64
    if not lib.mapped_read_ready():
        return False
    crc = ctypes.c_uint32(0)
    status = lib.mapped_read(os.fsencode(span.path), ctypes.c_int64(span.offset), ctypes.c_int64(span.nbytes),
                             ctypes.c_int64(itemsize), ctypes.c_void_p(out.data_ptr()), ctypes.byref(crc))
    if status == 1:
        raise ValueError(f"{span.path}: truncated (a tensor's bytes end past the end of the file)")
    if status < 0:
        raise OSError(-status, f"{span.path}: {os.strerror(-status)}")
    if span.crc is not None and crc.value != span.crc:
        raise ValueError(f"{span.path}: corrupt: CRC-32 mismatch in the tensor at byte {span.offset} "
                         f"(read {crc.value:08x}, recorded {span.crc:08x})")
    return True
