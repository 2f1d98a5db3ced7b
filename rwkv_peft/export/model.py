"""``python -m rwkv_peft.export --model MODEL [--adapter A.pth] --format hf|gguf|pth|safetensors --output PATH``.

MODEL is a .pth / .safetensors checkpoint or a Hugging Face folder (rwkv_peft.export.hf); an adapter is
merged on the way, a tensor at a time (its edits as ``merge`` plans them, each folded tensor cast to the
base's dtype as a merged file would hold it). Every output is written atomically, named, and re-read for
a one-line self-check of its tensors and metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from rwkv_peft import cli, files
from rwkv_peft.export.gguf import QTYPES, write_gguf
from rwkv_peft.export.hf import LAYOUTS, HFCheckpoint, write_folder
from rwkv_peft.merge.plan import MergedView, plan_edits, read_adapter
from rwkv_peft.model import config_from_state_dict, detect_version
from rwkv_peft.model.checkpoint import meta_state_dict, open_checkpoint, read_specs, tensor_specs
from rwkv_peft.model.stream import tensor_layout
from rwkv_peft.peft.registry import merge_flags

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SUFFIX = {"gguf": ".gguf", "pth": ".pth", "safetensors": ".safetensors"}


def open_model(path: Path, adapter: Path | None, overrides: dict) -> tuple[Mapping[str, torch.Tensor], dict]:
    """The model to export (lazy) and where its unchanged tensors' bytes lie (for byte copies)."""
    base = open_checkpoint(path)
    spans = base.spans() if isinstance(base, HFCheckpoint) else tensor_layout(path)[1]
    if adapter is None:
        return base, spans
    tensors, cfg = read_adapter(adapter, overrides)
    edits = plan_edits(meta_state_dict(tensor_specs(base)), tensors, cfg, str(path), str(adapter))
    return MergedView(base, edits), {k: v for k, v in spans.items() if k not in edits}


def _check_output(out: Path, fmt: str, inputs: dict) -> None:
    what = f"--output {out}"
    if fmt == "hf":
        if out.exists() and not out.is_dir():
            raise ValueError(f"{what}: --format hf writes a folder, and this is a file")
    elif out.suffix != SUFFIX[fmt]:
        raise ValueError(f"{what}: --format {fmt} writes a {SUFFIX[fmt]} file; name it so")
    elif out.is_dir():
        raise ValueError(f"{what}: is a folder; --format {fmt} writes a file")
    files.check_writable_dir(out.parent, what, create=False)
    files.check_not_input({out: what}, inputs)
    files.note_removed(files.remove_stale_temps(out.parent, out.name))


def _self_check(out: Path, fmt: str, src: Mapping[str, torch.Tensor], dropped: list[str], dtype) -> str:
    """Re-read what was written: tensors (keys, shapes, dtypes) and the metadata that runtimes read."""
    cfg = config_from_state_dict(meta_state_dict(tensor_specs(src)))
    if fmt == "gguf":
        from gguf import GGUFReader

        r = GGUFReader(out)
        arch = r.fields["general.architecture"].contents()
        fields = {k: r.fields[f"{arch}.{k}"].contents() for k in ("block_count", "embedding_length")}
        n_tokens = len(r.fields["tokenizer.ggml.tokens"].data)
        want = {"block_count": cfg.n_layer, "embedding_length": cfg.n_embd}
        if fields != want or n_tokens != cfg.vocab_size:
            raise ValueError(f"{out}: re-read metadata {fields}, {n_tokens} tokens; expected {want}, {cfg.vocab_size}")
        return f"{len(r.tensors)} tensors, {arch} {cfg.n_layer} layers x {cfg.n_embd}, {n_tokens} tokens"
    want = [(k, dtype if dtype is not None and d.is_floating_point else d, s)
            for k, d, s in tensor_specs(src) if k not in dropped]
    got = HFCheckpoint(out).specs() if fmt == "hf" else read_specs(out)
    if fmt != "pth":  # safetensors headers keep no order
        want, got = sorted(want), sorted(got)
    if got != want:
        bad = next((f"{g} vs {w}" for g, w in zip(got, want, strict=False) if g != w), f"{len(got)} vs {len(want)}")
        raise ValueError(f"{out}: re-read tensors differ from the model's ({bad})")
    extra = ""
    if fmt == "hf":
        back = config_from_state_dict(meta_state_dict(HFCheckpoint(out).specs()))
        if back != cfg:
            raise ValueError(f"{out}: re-read architecture {back} differs from the model's {cfg}")
        extra = f", {HFCheckpoint(out).layout.name} layout"
    return f"{len(got)} tensors with the model's keys, shapes and dtypes{extra}"


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m rwkv_peft.export", description="Export an RWKV model (optionally "
                           "with an adapter merged in) as an HF folder, GGUF, .pth or .safetensors")
    p.add_argument("--model", required=True, help="checkpoint (.pth/.safetensors) or Hugging Face folder")
    p.add_argument("--adapter", help="adapter to merge on the way (e.g. OUT/rwkv-final.pth, or a peft folder)")
    p.add_argument("--format", required=True, choices=("hf", "gguf", "pth", "safetensors"))
    p.add_argument("--output", required=True, help="folder (hf) or file (.gguf/.pth/.safetensors)")
    p.add_argument("--dtype", help="gguf: f32|f16|bf16|q8_0 (default f16); others: fp32|fp16|bf16 "
                                   "(default: as stored)")
    p.add_argument("--layout", choices=tuple(LAYOUTS), help="hf: fla (x070 default), native (rwkv7.-prefixed), "
                                                            "rwkv (x060/x052)")
    p.add_argument("--shard_size", type=float, default=5.0, help="hf: GiB per model-*.safetensors shard")
    for f in merge_flags():
        p.add_argument(f.flag, dest=f.key, **f.kwargs)
    return p


def _dtype(fmt: str, value: str | None):
    if fmt == "gguf":
        if (value or "f16") not in QTYPES:
            raise ValueError(f"--dtype {value}: GGUF takes {', '.join(QTYPES)}")
        return value or "f16"
    if value is not None and value not in DTYPES:
        raise ValueError(f"--dtype {value}: --format {fmt} takes {', '.join(DTYPES)}")
    return DTYPES.get(value)


def export(a) -> None:
    model, out = Path(a.model), Path(a.output)
    if not model.exists():
        raise FileNotFoundError(f"--model {model}: not found")
    adapter = Path(a.adapter) if a.adapter else None
    if adapter is not None and not adapter.exists():
        raise FileNotFoundError(f"--adapter {adapter}: file (or peft adapter folder) not found")
    dtype = _dtype(a.format, a.dtype)
    inputs = {model: f"--model {model}", **({adapter: f"--adapter {adapter}"} if adapter else {})}
    _check_output(out, a.format, inputs)
    src, spans = open_model(model, adapter, {f.key: getattr(a, f.key) for f in merge_flags()})
    like = src.base if isinstance(src, MergedView) else src
    like = like if isinstance(like, HFCheckpoint) else None
    version = detect_version(meta_state_dict(tensor_specs(src)), str(model))
    dropped: list[str] = []
    if a.format == "hf":
        dropped = write_folder(src, out, a.layout, dtype, like=like, spans=spans, name=str(model),
                               shard_bytes=int(a.shard_size * 2**30))
    elif a.format == "gguf":
        write_gguf(src, out, dtype, hparams=like.config() if like else None,
                   model_path=like.folder if like else model.with_suffix(""), name=str(model),
                   vocab_file=like.folder / "rwkv_vocab_v20230424.txt"
                   if like and (like.folder / "rwkv_vocab_v20230424.txt").is_file() else None)
    else:
        from rwkv_peft.merge.write import write_edited

        specs = [(k, dtype if dtype is not None and d.is_floating_point else d, s) for k, d, s in tensor_specs(src)]
        same = {k for (k, d, _), (_, d2, _) in zip(specs, tensor_specs(src), strict=True) if d == d2}
        write_edited(src, {}, out, name=str(out), specs=specs, spans={k: v for k, v in spans.items() if k in same})
    print(f"wrote {out} ({a.format}{f' {a.dtype}' if a.dtype else ''}, {version})")
    head_size = config_from_state_dict(meta_state_dict(tensor_specs(src))).head_size
    if a.format == "hf" and version == "x070" and head_size != 64 and (like.layout.name if like else a.layout) in (
            None, "fla"):
        print(f"note: fla's layout takes the group-norm eps as head_dim x norm_eps ({head_size}e-5); RWKV's is 64e-5, "
              f"so HF runtimes' logits differ slightly at head size {head_size}")
    if dropped:
        print(f"note: left out {', '.join(dropped)}: layer 0 never uses them and the "
              f"{a.layout or (like.layout.name if like else 'fla')} layout has no place for them")
    print(f"check: {out} re-read: {_self_check(out, a.format, src, dropped, dtype if a.format != 'gguf' else None)}")


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        export(a)
    except (ValueError, OSError) as e:
        cli.fail(e)
    return 0
