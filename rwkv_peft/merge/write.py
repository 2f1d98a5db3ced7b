"""Writing a merged (or unmerged) checkpoint as a stream, one base tensor at a time.

Tensors the adapter leaves alone go from the base file to the output as bytes (rwkv_peft.model.stream);
each edited weight is read once into fp32 (CRC-checked), folded in place, checked for NaN/inf and
cast to the base's dtype chunk by chunk as it is written. Worker threads read and fold the next
edited tensor while this one is written, and read the copied ones through to check their CRC-32,
so disk and arithmetic overlap; at most two edited tensors are in memory. The output goes to a temp
file (rwkv_peft.files) renamed only after every check passed.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from rwkv_peft import files
from rwkv_peft.integrity import Span, check_crc
from rwkv_peft.merge.plan import Edit, MergedView, model_class, plan_edits, read_adapter, target_weights
from rwkv_peft.model import detect_version
from rwkv_peft.model.checkpoint import all_finite, meta_state_dict, open_checkpoint, read_specs, tensor_specs
from rwkv_peft.model.stream import (
    Spec,
    drop_pages,
    mapped_ranges,
    prefetch,
    read_float,
    release_pages,
    tensor_layout,
    write_pth,
    write_safetensors,
)
from rwkv_peft.peft.folder import adapter_file

PREFETCH = 1 << 29  # bytes of the base read ahead of the merge (page cache, not this process's memory)


class _Source:
    """The output's tensors in order: spans copied as bytes, and edited tensors in fp32, each folded in
    a worker thread one edited tensor ahead of the writer."""

    def __init__(self, base: Mapping[str, torch.Tensor], edits: Mapping[str, Edit], specs: list[Spec],
                 spans: Mapping[str, Span], unmerge: bool, name: str, log: Callable[[str], None] | None,
                 mapped: list[tuple[int, int]], adapter_mapped: list[tuple[int, int]]):
        self.base, self.edits, self.specs, self.spans = base, edits, specs, spans
        self.unmerge, self.name, self.log = unmerge, name, log
        self.mapped, self.adapter_mapped = mapped, adapter_mapped

    def edited(self, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The new tensor in fp32, checked to hold no NaN/inf, also once cast to ``dtype``."""
        edit, span = self.edits[key], self.spans.get(key)
        src = None if span else self.base[key]
        new = edit.apply(read_float(span, dtype, shape) if span else src, self.unmerge, owned=span is not None)
        for lo, hi in self.adapter_mapped:  # each adapter tensor is used once
            drop_pages(lo, hi)
        if not all_finite(new, dtype):
            stored = read_float(span, dtype, shape) if span else src
            cause = "the base tensor itself holds NaN/inf" if not all_finite(stored) else "check the adapter's values"
            raise ValueError(f"{self.name}: {key} would contain NaN/inf after "
                             f"{'unmerging' if self.unmerge else 'merging'} {edit.source} ({cause})")
        if src is not None:
            release_pages(src, self.mapped)
        return new

    def pieces(self, pool: ThreadPoolExecutor) -> Iterator[torch.Tensor | Span]:
        """What the writer writes, key by key. Spans are copied inside the kernel while a worker reads them
        through to check their CRC-32 (all checked before the last piece is handed over)."""
        todo = iter([s for s in self.specs if s[0] in self.edits])
        ahead: deque[Future] = deque()
        checks: list[Future] = []

        def start_next() -> None:
            if (spec := next(todo, None)) is not None:
                ahead.append(pool.submit(self.edited, *spec))

        reads = iter([self.spans[k] for k, _, _ in self.specs if k in self.spans])
        window = 0  # bytes asked for ahead of the one being written: the disk reads while we compute
        start_next()
        for k, _, _ in self.specs:
            while window < PREFETCH and (nxt := next(reads, None)) is not None:
                prefetch(nxt)
                window += nxt.nbytes
            window -= self.spans[k].nbytes if k in self.spans else 0
            if k in self.edits:
                done = ahead.popleft()
                start_next()  # folded while this one is written
                done.result()  # a fold's error surfaces here
                if self.log:  # from this thread, in key order (folds finish in any order, on any worker)
                    self.log(f"{'unmerged' if self.unmerge else 'merged'} {self.edits[k].source} -> {k}")
                yield done.result()
                del done  # the writer has written it: free it before the next is awaited
            elif k in self.spans:
                checks.append(pool.submit(check_crc, self.spans[k], k))
                yield self.spans[k]
            else:
                t = self.base[k]
                yield t
                release_pages(t, self.mapped)
                del t
        for c in checks:
            c.result()


def _check_written(path: Path, specs: list[Spec], name: str) -> None:
    """Re-open the written file (metadata only) and compare keys, dtypes and shapes with the base's."""
    want = {k: (d, tuple(s)) for k, d, s in specs}
    got = {k: (d, tuple(s)) for k, d, s in read_specs(path)}
    if got != want:
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        wrong = [f"{k} is {got[k]}, expected {want[k]}" for k in want.keys() & got.keys() if got[k] != want[k]]
        raise RuntimeError(f"{name}: written tensors differ from the base's (missing {missing[:5]}, "
                           f"extra {extra[:5]}, {wrong[:3]})")


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
    specs: list[Spec] | None = None,
) -> Path:
    """Write ``base`` with ``edits`` applied to ``output`` (temp file, checks, rename).

    ``specs``: the output's (key, dtype, shape) (default: ``base``'s). ``spans`` (``tensor_spans`` of
    the base file): unchanged tensors found there are copied from the file as bytes, never loaded,
    and changed ones are read from it (CRC-checked, read ahead); the others come from ``base``.
    ``mapped``: where ``base`` is memory-mapped (``mapped_ranges``), pages dropped once a tensor is
    done; ``adapter_mapped``: the adapter's mapping, dropped after each edit. ``check`` gets the
    complete temp file before the rename (--verify); an exception there leaves no output.
    """
    output = Path(output)
    specs = specs or tensor_specs(base)
    source = _Source(base, edits, specs, spans or {}, unmerge, name, log, mapped, adapter_mapped)
    safetensors = output.suffix == ".safetensors"
    with files.atomic_path(output) as tmp:
        pool = ThreadPoolExecutor(2, thread_name_prefix="merge")
        try:
            with open(tmp, "wb") as f:
                (write_safetensors if safetensors else write_pth)(f, specs, source.pieces(pool))
        finally:
            pool.shutdown(cancel_futures=True)
        _check_written(tmp, specs, name)
        if check is not None:
            check(tmp)
    return output


def prepare_output(output: Path, inputs: dict[Path, str]) -> None:
    """Before reading anything big: the output is none of the inputs (each mapped to its flag), its
    directory exists and is writable, has room for a file the size of the base (the first input), and
    temps of merges killed there before are removed."""
    files.check_writable_dir(output.parent, f"--output {output}", create=False)
    if output.suffix not in (".pth", ".safetensors"):
        raise ValueError(f"{output}: --output must end in .pth or .safetensors")
    files.check_not_input({output: f"--output {output}"}, inputs)
    files.note_removed(files.remove_stale_temps(output.parent, output.name))
    files.check_free_space(output.parent, next(iter(inputs)).stat().st_size, f"--output {output}")


def _merge_folder(base_path: Path, adapter_path: Path, output: Path, config: dict | None, quant: str | None,
                  unmerge: bool, log: Callable[[str], None] | None, check: Callable[[Path], None] | None) -> Path:
    """A Hugging Face base folder: the merge is written as a folder of the same layout, files and key set."""
    from rwkv_peft.export.hf import HFCheckpoint, write_folder

    what = f"--output {output}"
    if quant is not None or check is not None:
        raise ValueError(f"--base_model {base_path}: a Hugging Face folder; --quant and --verify take .pth bases "
                         f"(export it with python -m rwkv_peft.export --format pth first)")
    if output.suffix in (".pth", ".safetensors") or output.is_file():
        raise ValueError(f"{what}: the base is a Hugging Face folder, so the merge is one too: give a folder path")
    if not adapter_path.exists():
        raise FileNotFoundError(f"{adapter_path}: --peft_checkpoint file (or peft adapter folder) not found")
    files.check_writable_dir(output.parent, what, create=False)
    files.check_not_input({output: what}, {base_path: f"--base_model {base_path}",
                                           adapter_path: f"--peft_checkpoint {adapter_path}"})
    files.note_removed(files.remove_stale_temps(output.parent, output.name))
    files.check_free_space(output.parent, sum(p.stat().st_size for p in base_path.iterdir() if p.is_file()), what)
    base = HFCheckpoint(base_path)
    adapter, cfg = read_adapter(adapter_path, config)
    edits = plan_edits(meta_state_dict(base.specs()), adapter, cfg, str(base_path), str(adapter_path), unmerge=unmerge)
    for k, e in edits.items():
        if log:
            log(f"{'unmerged' if unmerge else 'merged'} {e.source} -> {k}")
    spans = {k: v for k, v in base.spans().items() if k not in edits}
    write_folder(MergedView(base, edits, unmerge), output, like=base, spans=spans, name=str(output))
    return output


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
    if base_path.is_dir():
        return _merge_folder(base_path, adapter_path, output, config, quant, unmerge, log, check)
    if not base_path.is_file():
        raise FileNotFoundError(f"{base_path}: --base_model file not found")
    if not adapter_path.exists():
        raise FileNotFoundError(f"{adapter_path}: --peft_checkpoint file (or peft adapter folder) not found")
    prepare_output(output, {base_path: f"--base_model {base_path}",
                             adapter_path: f"--peft_checkpoint {adapter_path}"})
    adapter, cfg = read_adapter(adapter_path, config)
    specs, spans = tensor_layout(base_path)  # every tensor, and where its bytes lie (CRC checked as they stream)
    base: Mapping[str, torch.Tensor] = {}
    if quant is not None or not specs or len(spans) < len(specs):  # tensors read from a loaded checkpoint
        base = open_checkpoint(base_path)  # a .pth read through its mapping: every CRC checked first
        specs = tensor_specs(base)
    edits = plan_edits(meta_state_dict(specs), adapter, cfg, str(base_path), str(adapter_path), unmerge=unmerge)
    if quant is not None:  # trained with --quant: fold into the dequantized weights training used
        from rwkv_peft.quant import RoundtripView

        rounded = {f"{p}.weight" for p in target_weights(base, model_class(detect_version(base, str(base_path))))}
        base = RoundtripView(base, rounded, quant)
        spans = {k: v for k, v in spans.items() if k not in rounded}
    return write_edited(base, edits, output, unmerge=unmerge, name=str(output), log=log, check=check, specs=specs,
                        mapped=mapped_ranges(base_path), spans=spans,
                        adapter_mapped=mapped_ranges(adapter_file(adapter_path)))


def unmerge_adapter(
    merged_path: str | os.PathLike,
    adapter_path: str | os.PathLike,
    output_path: str | os.PathLike,
    config: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Recover the base from a merged checkpoint and its adapter (Bat via the inverse of I + D)."""
    return merge_adapter(merged_path, adapter_path, output_path, config, unmerge=True, log=log)
