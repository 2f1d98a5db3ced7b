"""Fold adapters into a base checkpoint (and back out), streamed tensor by tensor.

    python -m rwkv_peft.merge --base_model BASE.pth --peft_checkpoint OUT/rwkv-N.pth --output MERGED.pth
    python -m rwkv_peft.merge --unmerge --base_model MERGED.pth --peft_checkpoint OUT/rwkv-N.pth --output BASE.pth

The result is an ordinary RWKV checkpoint: the base's keys, shapes and dtypes, no adapter keys.
Peak memory stays near one tensor's fp32 copies: tensors the adapter leaves alone are copied from
the base file to the output as bytes (rwkv_peft.model.stream: our own writer of torch's zip format
for ``.pth`` and of the safetensors layout), each adapted weight is read once, merged in fp32 and
cast back to the base's dtype. The output goes to a temp file (``rwkv_peft.files``) renamed only
after every check passed; ``--verify`` runs on that temp file, so a merge over its tolerance leaves
no output.

Adapter keys: each method's suffixes (``<linear>.miss``, RWKV-PEFT's ``.disha`` / ``.bone``,
``.lora_A`` / ``.lora_B`` ...), grouped per linear and handed to the method that owns them (its
record in rwkv_peft.peft.registry checks them and folds them), and plain base keys (train_parts),
which replace the base tensor. The formulas live in rwkv_peft.peft.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import mmap
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from rwkv_peft import files
from rwkv_peft.model import config_from_state_dict, detect_version, read_state_dict
from rwkv_peft.model.checkpoint import all_finite
from rwkv_peft.model.stream import Span, prefetch, read_float, tensor_spans, write_pth, write_safetensors
from rwkv_peft.peft.config import Fold
from rwkv_peft.peft.registry import METHODS, adapter_keys, merge_flags, method_for_keys

ARCH_FIELDS = ("n_layer", "n_embd", "vocab_size", "head_size", "dim_ffn")
PREFETCH = 1 << 29  # bytes of the base read ahead of the merge (page cache, not this process's memory)


# ----------------------------------------------------------------------------- the plan


@dataclass
class Edit:
    """What happens to one base tensor: an adapter folded in (``fold``) or a replacement (train_parts)."""

    key: str  # the base key it changes
    source: str  # adapter key(s), for messages
    fold: Fold | None = None
    replacement: torch.Tensor | None = None

    def apply(self, weight: torch.Tensor, unmerge: bool) -> torch.Tensor:
        """The new tensor in fp32 from the base (or merged) ``weight``."""
        if self.fold is None:
            return self.replacement.float()
        return (self.fold.unmerge if unmerge else self.fold.merge)(weight.float())


def adapter_config_path(adapter_path: str | os.PathLike) -> Path:
    """adapter_config.json beside the adapter checkpoint."""
    return Path(adapter_path).with_name("adapter_config.json")


def read_adapter_config(adapter_path: str | os.PathLike) -> dict:
    """The adapter_config.json beside ``adapter_path``, or {} when there is none (foreign adapters)."""
    path = adapter_config_path(adapter_path)
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _split(key: str) -> tuple[str, str]:
    prefix, _, suffix = key.rpartition(".")
    return prefix, suffix


def _model_class(version: str) -> type[torch.nn.Module]:
    """The rwkv_peft.model class that declares ``version`` (its ``peft_targets`` say what is adaptable)."""
    import rwkv_peft.model as models

    for c in vars(models).values():
        if isinstance(c, type) and issubclass(c, torch.nn.Module) and getattr(c, "version", None) == version:
            return c
    raise ValueError(f"RWKV {version}: no model class in rwkv_peft.model declares this version")


def _targets(keys: Iterator[str], model_cls: type) -> set[str]:
    """Paths of the Linear layers (``<path>.weight`` keys) that the model class declares adaptable."""
    out = set()
    for k in keys:
        path, _, leaf = k.rpartition(".")
        parent, _, name = path.rpartition(".")
        if leaf == "weight" and name in model_cls.peft_targets.get(parent.rpartition(".")[2], ()):
            out.add(path)
    return out


def _check_arch(base: Mapping[str, torch.Tensor], cfg: dict, base_name: str, cfg_name: str) -> type:
    """The base's model class; ValueError if adapter_config's "base" describes another architecture."""
    version = detect_version(base, base_name)
    model_cfg = config_from_state_dict(base, base_name)
    have = {"version": version} | {f: getattr(model_cfg, f) for f in ARCH_FIELDS}
    want = cfg.get("base") or {}
    diff = [f"{k} {want[k]} (base has {have[k]})" for k in have if k in want and want[k] != have[k]]
    if diff:
        raise ValueError(
            f"{cfg_name}: adapter was trained for another architecture than {base_name}: " + ", ".join(diff)
        )
    return _model_class(version)


def plan_edits(
    base: Mapping[str, torch.Tensor],
    adapter: Mapping[str, torch.Tensor],
    config: dict | None = None,
    base_name: str = "base",
    adapter_name: str = "adapter",
    unmerge: bool = False,
) -> dict[str, Edit]:
    """Check the adapter against the base (metadata only) and say what changes in each base tensor.

    ``config`` is adapter_config.json's content plus overrides: "mode" for ``.miss`` keys (and to
    force a mode for ``.disha``), "alpha" for LoRA/PiSSA, "base" for the architecture check.
    """
    config = dict(config or {})
    cfg_name = config.pop("_source", "adapter_config.json")
    for m in METHODS.values():
        if m.no_fold and (config.get("method") == m.name or any(_split(k)[1] in m.keys for k in adapter)):
            raise ValueError(f"{adapter_name}: {m.no_fold}")
    model_cls = _check_arch(base, config, base_name, cfg_name)
    targets = _targets(iter(base), model_cls)
    if not adapter:
        raise ValueError(f"{adapter_name}: the adapter holds no tensors")
    if config.get("method") != "full" and not any(_split(k)[1] in adapter_keys() for k in adapter):
        if set(base) <= set(adapter) or not config.get("method"):  # a whole model, or nothing says otherwise
            raise ValueError(
                f"{adapter_name}: holds no adapter tensors (.miss, .lora_A, ...) but {len(adapter)} plain model "
                "tensors: is it a base model? Pass the adapter the trainer wrote (e.g. OUT/rwkv-final.pth); a "
                '--peft full checkpoint needs its adapter_config.json ("method": "full") beside it'
            )

    edits: dict[str, Edit] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}  # linear path -> {key suffix: tensor}
    suffixes = adapter_keys()
    for k, t in adapter.items():
        linear, suffix = _split(k)
        if suffix in suffixes:
            groups.setdefault(linear, {})[suffix] = t
        elif k in base:
            if unmerge:
                raise ValueError(
                    f"{adapter_name}: {k} replaced the base tensor (train_parts); the original is not in the "
                    "adapter, so the base cannot be recovered"
                )
            if tuple(t.shape) != tuple(base[k].shape):
                raise ValueError(
                    f"{adapter_name}: {k} has shape {tuple(t.shape)}, base {base_name} has {tuple(base[k].shape)}"
                )
            edits[k] = Edit(k, k, replacement=t)
        else:
            raise ValueError(f"{adapter_name}: adapter key {k} has no base tensor in {base_name}")

    for linear, tensors in groups.items():
        keys = ", ".join(f"{linear}.{s}" for s in tensors)
        wkey = f"{linear}.weight"
        if wkey not in base:
            raise ValueError(f"{adapter_name}: adapter key {keys} has no base tensor {wkey} in {base_name}")
        if linear not in targets:
            raise ValueError(
                f"{adapter_name}: adapter key {keys}: {linear} is not a PEFT target of RWKV {model_cls.version} "
                f"(targets: {model_cls.peft_targets})"
            )
        if wkey in edits:
            raise ValueError(f"{adapter_name}: {wkey} is changed by both {edits[wkey].source} and {keys}")
        method = method_for_keys(set(tensors))
        if method is None:
            raise ValueError(f"{adapter_name}: {keys} mix adapter tensors of different methods on one linear")
        fold = method.fold(base[wkey], tensors, config, f"{adapter_name}: {linear}", cfg_name)
        if unmerge and fold.unmerge is None:
            raise ValueError(f"{adapter_name}: {linear}: {fold.no_unmerge}")
        edits[wkey] = Edit(wkey, keys, fold=fold)
    return edits


# ----------------------------------------------------------------------------- streaming I/O


class _SafetensorsReader(Mapping):
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


def open_checkpoint(
    path: str | os.PathLike, safetensors: bool | None = None, crc: bool = True
) -> Mapping[str, torch.Tensor]:
    """A checkpoint whose tensors are read lazily: memory-mapped .pth, or per-tensor .safetensors.
    ``crc=False``: no CRC pass over the whole file first (the streamed merge checks each record it reads)."""
    path = Path(path)
    if safetensors if safetensors is not None else path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint file not found")
        return _SafetensorsReader(path)
    return read_state_dict(path, mmap=True, crc=crc)


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


def _release(t: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Drop the resident pages of a tensor read from a memory-mapped file (re-read from disk if touched again).

    Without this, every page of the base that was read stays in our RSS until exit, and peak
    memory grows to the whole model even though each tensor is needed only once. Only pages
    inside ``mapped`` (the base file's read-only private mapping) are touched, never heap memory.
    """
    if not mapped or t.device.type != "cpu" or t.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = t.untyped_storage().data_ptr()
    end = start + t.untyped_storage().nbytes()
    lo, hi = start - start % page, end + (-end) % page
    if any(m_lo <= lo and hi <= m_hi for m_lo, m_hi in mapped):
        _drop(lo, hi)


def _drop(lo: int, hi: int) -> None:
    _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED


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




def _check_written(path: Path, safetensors: bool, specs, name: str) -> None:
    """Re-open the written file (metadata only) and compare keys, shapes and dtypes with the base."""
    got = open_checkpoint(path, safetensors, crc=False)
    want_keys, got_keys = [k for k, _, _ in specs], list(got)
    missing, extra = sorted(set(want_keys) - set(got_keys)), sorted(set(got_keys) - set(want_keys))
    if missing or extra:
        raise RuntimeError(f"{name}: written keys differ from the base's (missing {missing[:5]}, extra {extra[:5]})")
    if not safetensors:
        for k, dtype, shape in specs:
            if got[k].dtype != dtype or tuple(got[k].shape) != tuple(shape):
                raise RuntimeError(
                    f"{name}: written {k} is {got[k].dtype} {tuple(got[k].shape)}, expected {dtype} {shape}"
                )


def _prepare_output(output: Path, inputs: list[Path]) -> None:
    """Before reading anything big: the output directory exists and is writable, has room for a file
    the size of the base (``inputs[0]``), and temps of merges killed there before are removed."""
    files.check_writable_dir(output.parent, f"--output {output}", create=False)
    if output.suffix not in (".pth", ".safetensors"):
        raise ValueError(f"{output}: --output must end in .pth or .safetensors")
    for p in inputs:
        if p.exists() and output.exists() and os.path.samefile(p, output):
            raise ValueError(f"{output}: --output must differ from the input {p}")
    files.note_removed(files.remove_stale_temps(output.parent, output.name))
    files.check_free_space(output.parent, inputs[0].stat().st_size, f"--output {output}")


def write_edited(
    base: Mapping[str, torch.Tensor],
    edits: Mapping[str, Edit],
    output: str | os.PathLike,
    unmerge: bool = False,
    name: str = "merge",
    log: Callable[[str], None] | None = None,
    mapped: list[tuple[int, int]] = (),
    check: Callable[[Path], None] | None = None,
    spans: Mapping[str, Span] | None = None,
    adapter_mapped: list[tuple[int, int]] = (),
) -> Path:
    """Write ``base`` with ``edits`` applied to ``output`` (temp file, checks, rename).

    Each changed tensor is computed in fp32, checked for NaN/inf and stored in the base's dtype.
    ``spans`` (``tensor_spans`` of the base file): unchanged tensors found there are copied from
    the file as bytes, never loaded, and changed ones are read from it (CRC-checked, read ahead);
    the others come from ``base``. ``mapped``: where ``base`` is memory-mapped (``mapped_ranges``);
    those pages are dropped once a tensor is written. ``adapter_mapped``: the adapter's mapping,
    dropped after each edit (each adapter tensor is used once; a 7B adapter is ~150 MB).
    ``check`` gets the complete temp file before the rename (--verify); an exception there leaves no
    output.
    """
    output = Path(output)
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in base.items()]
    spans = spans or {}

    def edited(k: str, dtype: torch.dtype, shape: tuple[int, ...], src: torch.Tensor | None) -> torch.Tensor:
        # what every fold takes: fp32; from the file, one CRC-checked read, not page faults on a mapping
        w = read_float(spans[k], dtype, shape) if src is None else src.float()
        new = edits[k].apply(w, unmerge)
        del w
        for lo, hi in adapter_mapped:
            _drop(lo, hi)
        out = new.to(dtype)
        del new
        if not all_finite(out):  # checked after the cast, which can overflow too (fp16)
            stored = read_float(spans[k], dtype, shape) if src is None else src
            cause = "the base tensor itself holds NaN/inf" if not all_finite(stored) else "check the adapter's values"
            raise ValueError(
                f"{name}: {k} would contain NaN/inf after {'unmerging' if unmerge else 'merging'} "
                f"{edits[k].source} ({cause})"
            )
        if log:
            log(f"{'unmerged' if unmerge else 'merged'} {edits[k].source} -> {k}")
        return out

    ahead = iter([spans[k] for k, _, _ in specs if k in spans])
    window = 0  # bytes asked for ahead of the one being written: the disk reads while we compute

    def tensors() -> Iterator[torch.Tensor | Span]:
        nonlocal window
        for k, dtype, shape in specs:
            while window < PREFETCH and (nxt := next(ahead, None)) is not None:
                prefetch(nxt)
                window += nxt.nbytes
            window -= spans[k].nbytes if k in spans else 0
            src = None if k in spans else base[k]
            if k in edits:
                yield edited(k, dtype, shape, src)
            else:
                yield spans[k] if src is None else src
            if src is not None:
                _release(src, mapped)

    safetensors = output.suffix == ".safetensors"
    with files.atomic_path(output) as tmp:
        with open(tmp, "wb") as f:
            (write_safetensors if safetensors else write_pth)(f, specs, tensors(), check=True)
        _check_written(tmp, safetensors, specs, name)
        if check is not None:
            check(tmp)
    return output


# ----------------------------------------------------------------------------- public API


def _resolve_config(adapter_path: Path, config: dict | None) -> dict:
    """adapter_config.json beside the adapter, with ``config`` overriding it key by key."""
    cfg = read_adapter_config(adapter_path)
    if cfg:
        cfg["_source"] = str(adapter_config_path(adapter_path))
    for k, v in (config or {}).items():
        if v is not None:
            cfg[k] = v
    return cfg


def merge_adapter(
    base_path: str | os.PathLike,
    adapter_path: str | os.PathLike,
    output_path: str | os.PathLike,
    config: dict | None = None,
    quant: str | None = None,
    unmerge: bool = False,
    log: Callable[[str], None] | None = None,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Fold the adapter at ``adapter_path`` into ``base_path`` and write ``output_path``.

    ``config`` overrides adapter_config.json (e.g. {"mode": "bat_col"} or {"alpha": 32});
    ``unmerge=True`` does the inverse, reading a merged file as ``base_path``; ``check`` sees the
    finished temp file before its rename (see write_edited).
    """
    if quant is not None and unmerge:
        raise ValueError(f"--quant {quant}: merges onto the quantized base; it does not apply to --unmerge")
    base_path, adapter_path, output = Path(base_path), Path(adapter_path), Path(output_path)
    for path, flag in ((base_path, "--base_model"), (adapter_path, "--peft_checkpoint")):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {flag} file not found")
    _prepare_output(output, [base_path, adapter_path])
    cfg = _resolve_config(adapter_path, config)
    spans = tensor_spans(base_path)  # where tensors can be copied from as bytes, and read with their CRC
    base = open_checkpoint(base_path, crc=False)  # each record's CRC is checked as the stream reads it
    if quant is not None or not spans.keys() >= base.keys():  # tensors read through the mapping: CRCs first
        base = open_checkpoint(base_path)
    if quant is not None:  # trained with --quant: fold into the dequantized weights training used
        from rwkv_peft.quant import RoundtripView

        model_cls = _model_class(detect_version(base, str(base_path)))
        rounded = {f"{p}.weight" for p in _targets(iter(base), model_cls)}
        base = RoundtripView(base, rounded, quant)
        spans = {k: v for k, v in spans.items() if k not in rounded}
    adapter = read_state_dict(adapter_path)
    edits = plan_edits(base, adapter, cfg, str(base_path), str(adapter_path), unmerge=unmerge)
    return write_edited(base, edits, output, unmerge=unmerge, name=str(output), log=log, check=check,
                        mapped=mapped_ranges(base_path), spans=spans, adapter_mapped=mapped_ranges(adapter_path))


def unmerge_adapter(
    merged_path: str | os.PathLike,
    adapter_path: str | os.PathLike,
    output_path: str | os.PathLike,
    config: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Recover the base from a merged checkpoint and its adapter (Bat via the inverse of I + D)."""
    return merge_adapter(merged_path, adapter_path, output_path, config, unmerge=True, log=log)


def merge_state_dict(
    base: Mapping[str, torch.Tensor], adapter: Mapping[str, torch.Tensor], config: dict | None = None,
    unmerge: bool = False,
) -> dict[str, torch.Tensor]:
    """In-memory merge (same checks and math as the file version) for models already loaded."""
    edits = plan_edits(base, adapter, config, unmerge=unmerge)
    return {k: edits[k].apply(v, unmerge).to(v.dtype) if k in edits else v for k, v in base.items()}


# ----------------------------------------------------------------------------- verification

DEMO_QUESTION = "Tom has 3 apples. He gets 5 more. How many apples does Tom have now?"


def peft_config_from_edits(edits: Mapping[str, Edit], config: dict, model: torch.nn.Module) -> tuple[str, object]:
    """(method, PeftConfig) that rebuilds the adapted model the edits came from (works for foreign files too)."""
    from rwkv_peft.peft.inject import parse_peft_config

    folds = {k: e.fold for k, e in edits.items() if e.fold is not None}
    methods = {f.method for f in folds.values()}
    if len(methods) > 1:
        raise ValueError(f"the adapter mixes methods {sorted(methods)}; one adapted model cannot rebuild it")
    if not methods:
        return "full", parse_peft_config("full", "{}")
    paths = [k.rpartition(".")[0] for k in folds]
    parts = sorted({p.rpartition(".")[0].rpartition(".")[2] for p in paths})
    train_parts = sorted({model.train_part(k) for k, e in edits.items() if e.fold is None} - {None})
    spec = {"parts": parts, "train_parts": train_parts} | next(iter(folds.values())).spec
    method = methods.pop()
    return method, parse_peft_config(method, json.dumps(spec))


def adapted_model(
    base_path: str | os.PathLike, adapter_path: str | os.PathLike, config: dict | None = None, op: str = "torch",
    quant: str | None = None,
) -> torch.nn.Module:
    """The base in fp32 with the adapter applied the training way (apply_peft + load_adapter, then
    quantize_base with ``quant``), in eval mode."""
    from rwkv_peft.model import load_model
    from rwkv_peft.peft.inject import apply_peft, load_adapter

    cfg = _resolve_config(Path(adapter_path), config)
    model = load_model(base_path, dtype=torch.float32, op=op)
    adapter = read_state_dict(adapter_path)
    edits = plan_edits(read_state_dict(base_path), adapter, cfg, str(base_path), str(adapter_path))  # stored shapes
    method, peft_cfg = peft_config_from_edits(edits, cfg, model)
    if method == "full":
        load_adapter(model, adapter)
    else:
        apply_peft(model, method, peft_cfg)
        load_adapter(model, adapter)
        if quant is not None:
            from rwkv_peft.quant import quantize_base

            quantize_base(model, quant)
    return model.eval()


@torch.no_grad()
def verify_merged(
    merged_path: str | os.PathLike,
    base_path: str | os.PathLike,
    adapter_path: str | os.PathLike,
    config: dict | None = None,
    question: str | None = None,
    n_tokens: int = 32,
    quant: str | None = None,
    tol: float | None = None,
) -> float:
    """Load the merged file in the `rwkv` runtime (cpu fp32) and compare it with the adapted model.

    Prints the max logit difference on the SFT-formatted demo prompt and the runtime's greedy
    continuation (World tokenizer); returns the difference. A difference that is NaN or over ``tol``
    is a ValueError (default: ``verify_tolerance`` of the merged dtype and the logits' scale).
    """
    from rwkv_peft.data import DEFAULT_SFT_TEMPLATE, get_tokenizer, render_sft
    from rwkv_peft.runtime import load_runtime, runtime_generate, runtime_logits

    prompt = render_sft(DEFAULT_SFT_TEMPLATE, ("question", "answer"), question or DEMO_QUESTION, "")[0]
    tok = get_tokenizer("world")
    tokens = tok.encode(prompt)
    model = adapted_model(base_path, adapter_path, config, quant=quant)
    if max(tokens) >= model.cfg.vocab_size:
        raise ValueError(f"{base_path}: vocab_size {model.cfg.vocab_size} is too small for the World tokenizer")
    ours = model(torch.tensor([tokens]))[0]
    runtime = load_runtime(merged_path, model.version)
    theirs = runtime_logits(runtime, tokens, "seq")
    diff = float((ours - theirs).abs().max())
    dtype = next(iter(read_state_dict(merged_path).values())).dtype
    note = "" if dtype == torch.float32 else f" (merged weights stored in {dtype}, adapted model in fp32)"
    print(f"max |logit diff|, rwkv runtime (merged) vs adapted model: {diff:.3g} over {len(tokens)} tokens{note}")
    limit = tol if tol is not None else verify_tolerance(dtype, float(ours.abs().max()))
    if not diff <= limit:  # NaN fails too
        raise ValueError(f"--verify: max |logit diff| {diff:.3g} is over the tolerance {limit:.3g} "
                         f"({'--verify_tol' if tol is not None else f'the default for {dtype}; see --verify_tol'}): "
                         "the merged file does not compute what the adapted model does")
    new = runtime_generate(runtime, tokens, n_tokens)
    if 0 in new:
        new = new[: new.index(0)]
    print(f"prompt: {prompt!r}")
    print(f"rwkv runtime, greedy: {tok.decode(new)!r}")
    return diff


def verify_tolerance(dtype: torch.dtype, logit_scale: float) -> float:
    """Default --verify tolerance: fp32 files differ from the adapted model by summation order only
    (~1e-6 measured); a 16-bit file rounds every weight once (bf16 2^-9 relative), which on a 2-layer
    model moved the logits by ~0.3% of their largest magnitude; 2^-4 of it leaves room for depth."""
    return (1e-3 if dtype == torch.float32 else 2**-4) * max(1.0, logit_scale)


# ----------------------------------------------------------------------------- CLI


def _parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--base_model", required=True, help="base checkpoint (.pth/.safetensors); the merged one with --unmerge"
    )
    p.add_argument("--peft_checkpoint", required=True, help="adapter checkpoint, e.g. OUT/rwkv-N.pth")
    p.add_argument("--output", required=True, help="output checkpoint (.pth, or .safetensors by name)")
    for f in merge_flags():  # what the methods' merges can take from the command line
        p.add_argument(f.flag, dest=f.key, **f.kwargs)
    p.add_argument("--quant", choices=("int8", "nf4"),
                   help="the adapter was trained with --quant: merge onto the same dequantized base weights")
    p.add_argument("--unmerge", action="store_true", help="recover the base from --base_model (a merged file)")
    p.add_argument("--verify", action="store_true", help="after merging, compare in the rwkv runtime (see --prompt)")
    p.add_argument("--prompt", default=None, help="question for --verify (SFT template); default: a demo question")
    p.add_argument("--n_tokens", type=int, default=32, help="greedy tokens to print with --verify")
    p.add_argument("--verify_tol", type=float, default=None,
                   help="max |logit diff| --verify accepts (default: 1e-3 for fp32 files, 2^-4 for bf16/fp16, "
                        "times max(1, max |logit|))")
    p.add_argument("--quiet", action="store_true", help="do not list each merged tensor")
    return p


def main(argv: list[str] | None = None, description: str = "Fold a PEFT adapter into an RWKV checkpoint") -> None:
    a = _parser(description).parse_args(argv)
    reuse_heap()
    overrides = {f.key: getattr(a, f.key) for f in merge_flags()}
    log = None if a.quiet else print
    output = Path(a.output)

    def verify(tmp: Path) -> None:
        try:
            verify_merged(tmp, a.base_model, a.peft_checkpoint, overrides, a.prompt, a.n_tokens, quant=a.quant,
                          tol=a.verify_tol)
        except ValueError as e:
            raise ValueError(f"{output}: {e}; not written") from None

    try:
        out = merge_adapter(a.base_model, a.peft_checkpoint, output, overrides, quant=a.quant, unmerge=a.unmerge,
                            log=log, check=verify if a.verify else None)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {files.describe(e)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
