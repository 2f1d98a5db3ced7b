"""Quantized frozen base (``--quant int8|nf4``): target linear weights stored in 8 or 4 bits.

The storage formats are bitsandbytes' (``pip install bitsandbytes>=0.50``; its CPU backend and
its CUDA kernels alike): ``int8`` is LLM.int8()'s row-wise absmax quantization (one fp32 scale per
output row), ``nf4`` is QLoRA's NormalFloat4 with one fp32 absmax per block of 64 weights.

A quantized weight is a ``QuantWeight`` module that takes the place of the ``weight`` parameter
in the very layer that held it (nn.Linear or an adapter layer), so the layers need no change:
``F.linear(x, weight)`` on it runs ``dequant_linear``, which dequantizes for the matmul and again
in backward instead of keeping a full-precision copy alive between the two; any other use of the
weight (``.float()``, Bat's block products, merging) sees the dequantized tensor. Adapters and
every other parameter keep their precision. Merging a model trained this way must start from the
same dequantized weights: ``quant_roundtrip`` gives them, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from rwkv_peft.peft.inject import target_slots
from rwkv_peft.peft.registry import METHODS, get_method

FORMATS = ("int8", "nf4")
NF4_BLOCKSIZE = 64
REQUIREMENT = "bitsandbytes>=0.50"  # tested here with 0.50.2 (CPU backend)


def _bnb():
    """bitsandbytes.functional, imported on first use so the rest of the package never needs it."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as e:
        raise ImportError(f"--quant needs bitsandbytes: pip install '{REQUIREMENT}' ({e})") from None
    return bnbf


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"--quant: expected one of {'|'.join(FORMATS)}, got {fmt!r}")


class _DequantLinear(torch.autograd.Function):
    """y = x W^T for a frozen quantized W: backward dequantizes again rather than saving W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: QuantWeight) -> torch.Tensor:
        ctx.qweight = qweight
        return F.linear(x, qweight.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.qweight.dequantize(grad.dtype), None


def dequant_linear(x: torch.Tensor, qweight: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, W, bias) with W dequantized on the fly in forward and in backward."""
    y = _DequantLinear.apply(x, qweight)
    return y if bias is None else y + bias.to(y.dtype)


class QuantWeight(nn.Module):
    """A frozen (out, in) weight kept in bitsandbytes' int8 or nf4 format, standing in for the tensor.

    Buffers: ``qweight`` (int8 (out, in) or packed uint8 nf4) and ``scale`` (fp32 per row for int8,
    per 64-block absmax for nf4); being integer/fp32 buffers they follow ``.to(device)`` and are left
    alone by mixed-precision casts of parameters. ``shape``/``dtype``/``device`` describe the original
    weight; torch functions receiving this object compute on the dequantized weight.
    """

    def __init__(self, weight: torch.Tensor, fmt: str):
        super().__init__()
        _check_format(fmt)
        if weight.dim() != 2:
            raise ValueError(f"--quant: expected a 2-D linear weight, got shape {tuple(weight.shape)}")
        self.fmt, self.shape, self.dtype = fmt, weight.shape, weight.dtype
        qweight, scale = quantize(weight.detach(), fmt)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def requires_grad(self) -> bool:
        return False

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full-precision weight (``dtype`` default: the original weight's)."""
        return dequantize(self.qweight, self.scale, self.fmt, self.shape, dtype or self.dtype)

    def float(self) -> torch.Tensor:
        return self.dequantize(torch.float32)

    def t(self) -> torch.Tensor:
        return self.dequantize().t()

    @property
    def T(self) -> torch.Tensor:  # noqa: N802 - torch.Tensor's name
        return self.t()

    def detach(self) -> torch.Tensor:
        return self.dequantize()

    def dim(self) -> int:
        return 2

    def size(self, d: int | None = None) -> torch.Size | int:
        return self.shape if d is None else self.shape[d]

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        """Bytes actually stored (quantized data plus scales)."""
        return self.qweight.nbytes + self.scale.nbytes

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """F.linear(x, self) -> ``dequant_linear``; any other torch function -> on the dequantized weight."""
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and isinstance(args[1], QuantWeight):
            if not isinstance(args[0], QuantWeight):
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return dequant_linear(args[0], args[1], bias)

        def plain(a):
            if isinstance(a, QuantWeight):
                return a.dequantize()
            if isinstance(a, (list, tuple)):
                return type(a)(plain(b) for b in a)
            return a

        return func(*plain(args), **{k: plain(v) for k, v in kwargs.items()})

    def _apply(self, fn, recurse: bool = True) -> QuantWeight:
        """Follow device moves only: a dtype cast (``model.bfloat16()``) must not touch the stored format."""
        for name, buf in self._buffers.items():
            self._buffers[name] = buf.to(fn(buf).device)
        return self

    def extra_repr(self) -> str:
        return f"{self.fmt}, shape={tuple(self.shape)}, dtype={self.dtype}"


def quantize(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, scale) of an (out, in) weight in bitsandbytes' ``fmt`` (int8 row-wise or nf4 blocks of 64)."""
    _check_format(fmt)
    bnbf = _bnb()
    if fmt == "int8":
        if weight.abs().max() > torch.finfo(torch.float16).max:
            raise ValueError("--quant int8: weights beyond the float16 range cannot be quantized row-wise")
        qweight, scale, _ = bnbf.int8_vectorwise_quant(weight.half().contiguous())  # LLM.int8() takes fp16
        return qweight, scale.float()
    qweight, state = bnbf.quantize_4bit(weight.float().contiguous(), blocksize=NF4_BLOCKSIZE, quant_type="nf4")
    return qweight, state.absmax.float()


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, fmt: str, shape: torch.Size, dtype: torch.dtype
               ) -> torch.Tensor:
    """The (out, in) weight that ``quantize`` encoded, as ``dtype``."""
    _check_format(fmt)
    bnbf = _bnb()
    if fmt == "int8":
        return bnbf.int8_vectorwise_dequant(qweight, scale).to(dtype)
    out_dtype = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    state = bnbf.QuantState(absmax=scale, shape=shape, code=bnbf.get_4bit_type("nf4", device=qweight.device),
                            blocksize=NF4_BLOCKSIZE, quant_type="nf4", dtype=out_dtype)
    return bnbf.dequantize_4bit(qweight, state).to(dtype)


def quant_roundtrip(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """What training on a ``--quant fmt`` base computes with instead of ``weight`` (fp32): for merging."""
    qweight, scale = quantize(weight, fmt)
    return dequantize(qweight, scale, fmt, weight.shape, torch.float32)


class RoundtripView(Mapping):
    """A state dict whose ``keys`` read as ``quant_roundtrip`` (in their stored dtype), computed on access.

    Merging an adapter trained with ``--quant fmt`` starts from this view of the original base, so the
    merged checkpoint holds exactly the weights the adapter was trained against.
    """

    def __init__(self, sd: Mapping[str, torch.Tensor], keys: set[str], fmt: str):
        _check_format(fmt)
        self.sd, self.keys_, self.fmt = sd, set(keys), fmt

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self.sd[key]
        return quant_roundtrip(t, self.fmt).to(t.dtype) if key in self.keys_ else t

    def __iter__(self) -> Iterator[str]:
        return iter(self.sd)

    def __len__(self) -> int:
        return len(self.sd)


def quantize_base(model: nn.Module, fmt: str) -> str:
    """Quantize every frozen target linear weight in place (call after ``apply_peft``); returns a report.

    Each such module's ``weight`` parameter becomes a ``QuantWeight`` submodule; trainable weights
    (``--peft full``) are refused, since only a frozen base can live in low precision.
    """
    _check_format(fmt)
    method = get_method(model.peft_method) if hasattr(model, "peft_method") else None
    before = after = count = 0
    for path, parent, attr in target_slots(model):
        module = getattr(parent, attr)
        w = module.weight
        if isinstance(w, QuantWeight):
            raise ValueError(f"--quant {fmt}: {path} is already quantized ({w.fmt})")
        why = method.no_quant(module) if method is not None else ""
        if why:
            raise ValueError(f"--quant {fmt}: {path} is {why}")
        if w.requires_grad:
            frozen = "|".join(m.name for m in METHODS.values() if not m.replaces_base)
            raise ValueError(f"--quant {fmt}: {path}.weight is trainable; quantize only a frozen base "
                             f"(--peft {frozen}, applied before quantizing)")
        q = QuantWeight(w, fmt)
        before, after, count = before + w.nbytes, after + q.nbytes, count + 1
        del module._parameters["weight"]
        module.weight = q
    return (f"quantized {count} frozen linear weights to {fmt}: {before / 2**20:.1f} MiB -> "
            f"{after / 2**20:.1f} MiB")
