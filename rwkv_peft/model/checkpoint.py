"""Reading and writing official RWKV checkpoints (.pth / .safetensors) safely and atomically."""

from __future__ import annotations

import mmap
import os
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from rwkv_peft.files import atomic_path
from rwkv_peft.integrity import check_zip
from rwkv_peft.model.stream import FROM_SAFETENSORS, Spec, tensor_layout


def load_checked(path: str | os.PathLike, mmap: bool = False, crc: bool = True) -> object:
    """``torch.load(weights_only=True)`` of a file whose zip CRCs were verified first; never unpickles
    objects. Every failure (missing, truncated, corrupt, holds objects) is a ValueError naming the file.
    ``crc=False`` (with ``mmap``) skips the CRC pass, for a caller that checks each record as it reads it
    (the streamed merge)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = head == b"PK\x03\x04"  # torch's format since 1.6; older files are pickle streams (protocol 2+)
    if is_zip and crc:
        check_zip(path)
    elif not is_zip and head[:1] != b"\x80":
        raise ValueError(f"{path}: not a .pth checkpoint (neither torch's zip format nor its older pickle format"
                         f"{'; the file is empty' if not head else ''})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as e:
        lines = [x.strip() for x in str(e).splitlines() if "GLOBAL" in x]  # not torch's advice to trust it
        why = lines[0].removeprefix("WeightsUnpickler error: ").split(" Please use")[0] if lines else "a pickle"
        raise ValueError(
            f"{path}: refused to load: the file holds Python objects, not only tensors ({why})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        first = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}" if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable .pth checkpoint (truncated or corrupt: {first})") from None


def read_state_dict(path: str | os.PathLike, mmap: bool = True, crc: bool = True) -> dict[str, torch.Tensor]:
    """Load a checkpoint as a plain dict of tensors, integrity-checked (zip CRCs unless ``crc=False``, see
    ``load_checked``; safetensors header and size); never unpickles objects. A Hugging Face model folder
    (``rwkv_peft.export.hf``) reads as the checkpoint it holds."""
    path = Path(path)
    if path.is_dir():
        return dict(_hf_folder(path))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable .safetensors file ({e})") from None
    else:
        sd = load_checked(path, mmap=mmap, crc=crc)
    if not isinstance(sd, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise ValueError(f"{path}: expected a dict of name -> tensor, got {type(sd).__name__}")
    return sd


def map_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file as a view of the file mapped into memory (copy-on-write, so the
    views are writable and the file is never changed): nothing read until used, no copy of the file.

    The header and size are checked first (safetensors' own reader); a tensor whose bytes are not
    aligned for its dtype is copied alone.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    SafetensorsReader(path)  # checks the header against the file's size; an error names the file
    specs, spans = tensor_layout(path)
    with open(path, "rb") as f:
        data = torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.uint8)
    out = {}
    for key, dtype, shape in specs:
        span = spans.get(key)
        raw = data[span.offset : span.offset + span.nbytes] if span else data[:0]
        out[key] = (raw if span is None or span.offset % dtype.itemsize == 0 else raw.clone()).view(dtype).view(shape)
    return out


class SafetensorsReader(Mapping):
    """Lazy name -> tensor view of a .safetensors file (each tensor read when asked for)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        try:
            self._f = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a readable .safetensors file ({e})") from None
        self._keys = list(self._f.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def specs(self) -> list[Spec]:
        """Every tensor's key, dtype and shape from the header (no data read)."""
        out = []
        for k in self._keys:
            s = self._f.get_slice(k)
            out.append((k, FROM_SAFETENSORS[s.get_dtype()], tuple(s.get_shape())))
        return out


def open_checkpoint(path: str | os.PathLike, crc: bool = True) -> Mapping[str, torch.Tensor]:
    """A checkpoint whose tensors are read lazily: memory-mapped .pth, or per-tensor .safetensors.
    ``crc=False``: no CRC pass over the whole file first (for a reader that checks each record it reads).
    A Hugging Face model folder opens as the BlinkDL checkpoint it holds, read a tensor at a time."""
    path = Path(path)
    if path.is_dir():
        return _hf_folder(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint file not found")
        return SafetensorsReader(path)
    return read_state_dict(path, mmap=True, crc=crc)


def _hf_folder(path: Path) -> Mapping[str, torch.Tensor]:
    from rwkv_peft.export.hf import HFCheckpoint

    return HFCheckpoint(path)


def tensor_specs(sd: Mapping[str, torch.Tensor]) -> list[Spec]:
    """(key, dtype, shape) of every tensor, in order, without reading data (mapped or lazy checkpoints)."""
    if hasattr(sd, "specs"):
        return sd.specs()
    return [(k, v.dtype, tuple(v.shape)) for k, v in sd.items()]


def read_specs(path: str | os.PathLike) -> list[Spec]:
    """(key, dtype, shape) of every tensor in a checkpoint file, from its metadata (no CRC pass, no data read:
    for files already checked or just written)."""
    return tensor_specs(open_checkpoint(path, crc=False))


def meta_state_dict(specs: list[Spec]) -> dict[str, torch.Tensor]:
    """Data-less tensors of these keys, dtypes and shapes: what planning from metadata alone needs."""
    return {k: torch.empty(shape, dtype=dtype, device="meta") for k, dtype, shape in specs}


def all_finite(t: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """No NaN/inf in ``t`` (nor once it is cast to ``dtype``, which can overflow): one min/max pass (both
    propagate NaN; no overflow, unlike a sum) instead of a slow elementwise isfinite. Rounding is
    monotone, so if the extremes cast to finite values, every element does."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    if dtype is not None and dtype.is_floating_point:
        lo, hi = lo.to(dtype), hi.to(dtype)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def first_nonfinite(sd: Mapping[str, torch.Tensor]) -> str | None:
    """The first key of ``sd`` whose tensor holds NaN/inf, or None."""
    return next((k for k, v in sd.items() if not all_finite(v)), None)


def tensor_shape(sd: Mapping[str, torch.Tensor], key: str, name: str) -> tuple[int, ...]:
    """Shape of ``sd[key]``, for reading an architecture; a missing key is an error naming the file."""
    if key not in sd:
        raise ValueError(f"{name}: missing key {key!r}, needed to read the architecture")
    return tuple(sd[key].shape)


def block_count(sd: Mapping[str, torch.Tensor]) -> int:
    """Number of layers: one more than the highest ``blocks.<i>.`` index (0 when there is none)."""
    return 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)


def fits(stored: tuple[int, ...], want: tuple[int, ...], key: str) -> bool:
    """Whether a tensor stored as ``stored`` loads into a parameter of shape ``want``.

    The official runtime squeezes size-1 dimensions out of the per-channel vectors (every key not
    ending in ``weight``/``bias``: ``x_r``, ``time_mix_k``, ``time_decay``, ``time_faaaa``...),
    so files differing only there (e.g. x052 ``time_decay`` stored (H, N, 1)) are the same model.
    """
    if stored == want:
        return True
    if key.rpartition(".")[2] in ("weight", "bias"):
        return False
    return [d for d in stored if d != 1] == [d for d in want if d != 1]


def write_state_dict(sd: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write ``sd`` to ``path`` (.pth, or .safetensors by name) via a temp file and rename."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: output directory {path.parent} does not exist")
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in sd.items()}, tmp)
        else:
            with open(tmp, "wb") as f:  # a file object: the archive's inner name is "archive", not the temp's
                torch.save(sd, f)
    return path
