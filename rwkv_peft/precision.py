"""``--precision auto``: bf16 where the hardware computes it natively, fp32 everywhere else.

bf16 halves the bytes of every frozen weight and activation, and on hardware with bf16 arithmetic
its matmuls run at 2-3x the fp32 rate (measured 2.7x for torch ``mm`` on an EPYC with
``avx512_bf16``). Without it, bf16 is emulated through fp32 conversions and is slower than fp32,
so ``auto`` only picks it where the instructions exist: on x86 CPUs with ``avx512_bf16`` or AMX
(``amx_bf16``), on NVIDIA GPUs of compute capability 8.0 (Ampere) and later. fp16 is never chosen
automatically (it needs loss scaling and overflows where bf16 does not).
"""

from __future__ import annotations

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic
CPUINFO = "/proc/cpuinfo"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The feature flags of the first CPU in ``cpuinfo`` (default /proc/cpuinfo; empty where it does not exist)."""
    try:
        with open(cpuinfo or CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def native_bf16(device: str | torch.device, cpuinfo: str | None = None) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and the fact that decided it (for the run's log)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major >= 8, f"compute capability {major}.{minor}, bf16 needs >= 8.0"
    found = sorted(cpu_flags(cpuinfo) & set(BF16_CPU_FLAGS))
    if found:
        return True, f"this CPU has {' and '.join(found)}"
    return False, f"this CPU has neither {' nor '.join(BF16_CPU_FLAGS)}"


def resolve_precision(precision: str, device: str | torch.device, cpuinfo: str | None = None) -> tuple[str, str]:
    """(fp32|bf16|fp16, why): ``auto`` resolved for ``device``; an explicit choice is kept as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision: expected one of {'|'.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision, "as given"
    native, why = native_bf16(device, cpuinfo)
    return ("bf16" if native else "fp32"), f"auto: {why}"


def set_masters(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> None:
    """Give DeepSpeed's fp32 master copies of ``params`` the fp32 ``values`` they had before the engine
    cast the module to bf16/fp16 (its masters start from the rounded copies: a resumed run, and any
    non-zero initialisation, would lose the low bits). A no-op for parameters without a master (fp32)."""
    from deepspeed.utils import safe_set_full_fp32_param

    for p, v in zip(params, values, strict=True):
        safe_set_full_fp32_param(p, v.to(p.device, torch.float32))


def master(param: torch.nn.Parameter) -> torch.Tensor:
    """The fp32 master copy of a trainable parameter under a bf16/fp16 engine, else the parameter
    itself: what the optimizer updates, and what an adapter file keeps (collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    return param if full is None else full
