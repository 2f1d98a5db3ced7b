"""Hugging Face model folders <-> the official RWKV keys (BlinkDL's ``blocks.N.att.receptance.weight``).

Three published layouts, each one table or rename rule here, used both ways:

- ``fla``: RWKV-7 as flash-linear-attention writes it (fla's ``utils/convert_from_rwkv7.py``; the
  ``fla-hub/rwkv7-*`` folders; ``rwkv7-hf`` loads it): ``model.layers.N.attn.r_proj`` etc., the low-rank
  matrices as ``nn.Linear`` weights (transposed), ``w0/a0/v0`` as their biases, per-channel vectors flat
  except the token-shift mixes, ``ln_x`` as ``g_norm``. Layer 0 has no value-residual path there, so the
  ``v0/v1/v2`` some files carry in layer 0 (never used) are left out.
- ``native``: the official ``RWKV/RWKV7-*`` folders: the BlinkDL keys and shapes under ``rwkv7.``
  (``head.weight`` bare).
- ``rwkv``: ``RWKV/v6-Finch-*-HF`` (and the RWKV-5 ones): BlinkDL shapes, renamed (``emb`` ->
  ``embeddings``, ``ln0`` -> ``pre_ln``, ``att`` -> ``attention``, ``ffn`` -> ``feed_forward``) under ``rwkv.``.

Safetensors headers do not keep an order, so reading back gives the keys in the released files' order
(``BLOCK_ORDER``): a .pth -> HF -> .pth round trip is bit-identical, keys and order included.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from rwkv_peft.integrity import Span

# x070 per block: (BlinkDL leaf in the released file order, fla leaf, form). Forms: "" as stored,
# "t" transposed, "v" a (1, 1, C) vector stored flat as (C,).
FLA_BLOCK = (
    ("ln1.weight", "attn_norm.weight", ""), ("ln1.bias", "attn_norm.bias", ""),
    ("ln2.weight", "ffn_norm.weight", ""), ("ln2.bias", "ffn_norm.bias", ""),
    ("ln0.weight", "pre_norm.weight", ""), ("ln0.bias", "pre_norm.bias", ""),
    *((f"att.x_{c}", f"attn.x_{c}", "") for c in "rwkvag"),
    *((f"att.{p}{i}", f"attn.{p}_lora.lora.{j}", form) for p in "wav"
      for i, j, form in (("1", "0.weight", "t"), ("2", "2.weight", "t"), ("0", "2.bias", "v"))),
    ("att.g1", "attn.g_lora.lora.0.weight", "t"), ("att.g2", "attn.g_lora.lora.2.weight", "t"),
    ("att.k_k", "attn.k_k", "v"), ("att.k_a", "attn.k_a", "v"), ("att.r_k", "attn.r_k", ""),
    ("att.receptance.weight", "attn.r_proj.weight", ""), ("att.key.weight", "attn.k_proj.weight", ""),
    ("att.value.weight", "attn.v_proj.weight", ""), ("att.output.weight", "attn.o_proj.weight", ""),
    ("att.ln_x.weight", "attn.g_norm.weight", ""), ("att.ln_x.bias", "attn.g_norm.bias", ""),
    ("ffn.x_k", "ffn.x_k", "v"), ("ffn.key.weight", "ffn.key.weight", ""), ("ffn.value.weight", "ffn.value.weight", ""),
)
FLA_OUTER = (("emb.weight", "model.embeddings.weight"), ("ln_out.weight", "model.norm.weight"),
             ("ln_out.bias", "model.norm.bias"), ("head.weight", "lm_head.weight"))
FLA_UNUSED = ("att.v0", "att.v1", "att.v2")  # layer 0 only: fla has no value-residual path there

_LN = ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "ln0.weight", "ln0.bias")
# The released files' order of each block's keys (RWKV-LM's parameter order), per version.
BLOCK_ORDER = {
    "x070": tuple(b for b, _, _ in FLA_BLOCK),
    "x060": (*_LN, *(f"att.time_maa_{c}" for c in "xwkvrg"), "att.time_maa_w1", "att.time_maa_w2",
             "att.time_decay", "att.time_decay_w1", "att.time_decay_w2", "att.time_faaaa",
             *(f"att.{n}.weight" for n in ("receptance", "key", "value", "output", "gate")),
             "att.ln_x.weight", "att.ln_x.bias", "ffn.time_maa_k", "ffn.time_maa_r",
             "ffn.key.weight", "ffn.receptance.weight", "ffn.value.weight"),
    "x052": (*_LN, *(f"att.time_mix_{c}" for c in "kvrg"), "att.time_decay", "att.time_faaaa",
             *(f"att.{n}.weight" for n in ("receptance", "key", "value", "output", "gate")),
             "att.ln_x.weight", "att.ln_x.bias", "ffn.time_mix_k", "ffn.time_mix_r",
             "ffn.key.weight", "ffn.receptance.weight", "ffn.value.weight"),
}
OUTER_ORDER = ("emb.weight", "ln_out.weight", "ln_out.bias", "head.weight")  # emb first, the rest after the blocks
VOCAB_FILE = "rwkv_vocab_v20230424.txt"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_FLA_TO = {b: (h, f) for b, h, f in FLA_BLOCK}
_FLA_FROM = {h: (b, f) for b, h, f in FLA_BLOCK}
_RWKV_RENAMES = (("att.", "attention."), ("ffn.", "feed_forward."), ("ln0.", "pre_ln."))


@dataclass(frozen=True)
class Layout:
    """One HF layout: key mapping both ways (None: the key has no place there) and its config.json."""

    name: str
    versions: tuple[str, ...]
    to_hf: Callable[[str], tuple[str, str] | None]
    from_hf: Callable[[str], tuple[str, str] | None]
    config: Callable[..., dict]


def _fla_to(key: str) -> tuple[str, str] | None:
    if m := _BLOCK.fullmatch(key):
        i, leaf = m.groups()
        if i == "0" and leaf in FLA_UNUSED:
            return None
        hit = _FLA_TO.get(leaf)
        return (f"model.layers.{i}.{hit[0]}", hit[1]) if hit else None
    outer = dict(FLA_OUTER).get(key)
    return (outer, "") if outer else None


def _fla_from(key: str) -> tuple[str, str] | None:
    if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key):
        hit = _FLA_FROM.get(m[2])
        return (f"blocks.{m[1]}.{hit[0]}", hit[1]) if hit else None
    outer = {h: b for b, h in FLA_OUTER}.get(key)
    return (outer, "") if outer else None


def _native_to(key: str) -> tuple[str, str]:
    return (key if key == "head.weight" else f"rwkv7.{key}"), ""


def _native_from(key: str) -> tuple[str, str] | None:
    if key == "head.weight":
        return key, ""
    return (key.removeprefix("rwkv7."), "") if key.startswith("rwkv7.") else None


def _renamed(leaf: str, renames: tuple[tuple[str, str], ...]) -> str:
    for old, new in renames:
        leaf = new + leaf.removeprefix(old) if leaf.startswith(old) else leaf
    return leaf


def _rwkv_to(key: str) -> tuple[str, str]:
    if key == "head.weight":
        return key, ""
    if m := _BLOCK.fullmatch(key):
        return f"rwkv.blocks.{m[1]}.{_renamed(m[2], _RWKV_RENAMES)}", ""
    return "rwkv." + ("embeddings.weight" if key == "emb.weight" else key), ""


def _rwkv_from(key: str) -> tuple[str, str] | None:
    if key == "head.weight":
        return key, ""
    if not key.startswith("rwkv."):
        return None
    key = key.removeprefix("rwkv.")
    if m := _BLOCK.fullmatch(key):
        return f"blocks.{m[1]}.{_renamed(m[2], tuple((new, old) for old, new in _RWKV_RENAMES))}", ""
    return ("emb.weight" if key == "embeddings.weight" else key), ""


def _fla_config(cfg, dtype: str) -> dict:
    return {
        "architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer, "head_dim": cfg.head_size,
        "num_heads": cfg.n_head, "intermediate_size": cfg.dim_ffn, "hidden_ratio": cfg.dim_ffn / cfg.n_embd,
        "decay_low_rank_dim": cfg.d_decay, "a_low_rank_dim": cfg.d_aaa, "v_low_rank_dim": cfg.d_mv,
        "gate_low_rank_dim": cfg.d_gate, "value_dim": [cfg.n_embd] * cfg.n_layer,
        # LayerNorm eps; fla's group norm uses head_dim * norm_eps, RWKV's 64e-5: equal at head size 64
        "norm_eps": 1e-5, "norm_bias": True, "norm_first": True, "hidden_act": "sqrelu",
        "attn_mode": "chunk", "fuse_norm": False, "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "torch_dtype": dtype,
    }


def _native_config(cfg, dtype: str) -> dict:
    return {
        "architectures": ["Rwkv7ForCausalLM"], "model_type": "rwkv7", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer, "num_heads": cfg.n_head,
        "head_dim": cfg.head_size, "intermediate_size": cfg.dim_ffn, "decay_low_rank_dim": cfg.d_decay,
        "a_low_rank_dim": cfg.d_aaa, "v_low_rank_dim": cfg.d_mv, "gate_low_rank_dim": cfg.d_gate,
        "norm_eps": 1e-5, "norm_bias": True, "use_cache": True, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "dtype": dtype,
    }


def _rwkv_config(cfg, dtype: str) -> dict:
    v6 = hasattr(cfg, "d_mix")  # x060; x052 otherwise
    return {
        "architectures": ["Rwkv6ForCausalLM" if v6 else "Rwkv5ForCausalLM"], "model_type": "rwkv6" if v6 else "rwkv5",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
        "attention_hidden_size": cfg.n_embd, "num_attention_heads": cfg.n_head, "head_size": cfg.head_size,
        "head_size_divisor": 8, "intermediate_size": cfg.dim_ffn, "layer_norm_epsilon": 1e-5,
        "rescale_every": 0,  # the weights are stored unscaled; 0: runtimes do not rescale either
        "tie_word_embeddings": False, "use_cache": True, "bos_token_id": 0, "eos_token_id": 0,
        "torch_dtype": dtype,
    }


LAYOUTS = {
    "fla": Layout("fla", ("x070",), _fla_to, _fla_from, _fla_config),
    "native": Layout("native", ("x070",), _native_to, _native_from, _native_config),
    "rwkv": Layout("rwkv", ("x060", "x052"), _rwkv_to, _rwkv_from, _rwkv_config),
}
DEFAULT_LAYOUT = {"x070": "fla", "x060": "rwkv", "x052": "rwkv"}


def hf_module_name(path: str, layout: str = "fla") -> str:
    """The HF module path of a BlinkDL linear (``blocks.3.att.receptance`` -> ``model.layers.3.attn.r_proj``),
    for adapters named after HF modules (peft)."""
    hit = LAYOUTS[layout].to_hf(f"{path}.weight")
    if hit is None or hit[1]:
        raise ValueError(f"{path}: no linear of that name in the {layout} layout")
    return hit[0].removesuffix(".weight")


def blinkdl_module_name(path: str, layout: str = "fla") -> str:
    """Inverse of ``hf_module_name``."""
    hit = LAYOUTS[layout].from_hf(f"{path}.weight")
    if hit is None or hit[1]:
        raise ValueError(f"{path}: not a linear of the {layout} layout")
    return hit[0].removesuffix(".weight")


def to_hf(t: torch.Tensor, form: str) -> torch.Tensor:
    """A BlinkDL tensor as the HF layout stores it."""
    return t.t().contiguous() if form == "t" else t.reshape(-1) if form == "v" else t


def from_hf(t: torch.Tensor, form: str) -> torch.Tensor:
    """An HF-layout tensor as the BlinkDL file stores it."""
    return t.t().contiguous() if form == "t" else t.reshape(1, 1, -1) if form == "v" else t


def hf_shape(shape: tuple[int, ...], form: str, inverse: bool = False) -> tuple[int, ...]:
    if form == "t":
        return shape[::-1]
    if form == "v":
        return (1, 1, shape[-1]) if inverse else (shape[-1],)
    return shape


def order_key(key: str, version: str) -> tuple:
    """Sort key giving the released files' order: emb, blocks by index (each in BLOCK_ORDER), ln_out, head."""
    if m := _BLOCK.fullmatch(key):
        order = BLOCK_ORDER[version]
        leaf = m[2]
        return (1, int(m[1]), order.index(leaf) if leaf in order else len(order), leaf)
    rank = OUTER_ORDER.index(key) if key in OUTER_ORDER else len(OUTER_ORDER)
    return (0 if rank == 0 else 2, rank, 0, key)


def is_hf_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in WEIGHT_FILES)


def _weight_map(folder: Path) -> dict[str, Path]:
    """HF key -> the file holding it (single file, or sharded with an index)."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / index).is_file():
            try:
                wm = json.loads((folder / index).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{folder / index}: not a readable weight index ({e})") from None
            return {k: folder / v for k, v in wm.items()}
        if (folder / single).is_file():
            from rwkv_peft.model.checkpoint import read_specs

            return {k: folder / single for k, _, _ in read_specs(folder / single)}
    raise FileNotFoundError(f"{folder}: no model.safetensors / pytorch_model.bin (or their .index.json) in the folder")


def detect_layout(keys: list[str], name: str) -> Layout:
    """The layout whose mapping takes every key of the folder."""
    for layout in LAYOUTS.values():
        if keys and all(layout.from_hf(k) is not None for k in keys):
            return layout
    raise ValueError(f"{name}: not an RWKV Hugging Face folder in a known layout (fla model.layers.N.attn..., "
                     f"native rwkv7.blocks.N..., rwkv.blocks.N... of RWKV-6/5); first keys: {', '.join(keys[:4])}")


class HFCheckpoint(Mapping):
    """An HF model folder read lazily as the BlinkDL checkpoint it holds (keys in the released order)."""

    def __init__(self, folder: str | os.PathLike):
        from rwkv_peft.model import detect_version
        from rwkv_peft.model.checkpoint import open_checkpoint, tensor_specs

        self.folder = Path(folder)
        where = _weight_map(self.folder)
        self.layout = detect_layout(list(where), str(self.folder))
        self._files = {p: open_checkpoint(p) for p in dict.fromkeys(where.values())}
        hf_specs = {k: (d, s) for f in self._files.values() for k, d, s in tensor_specs(f)}
        missing = [k for k in where if k not in hf_specs]
        if missing:
            raise ValueError(f"{self.folder}: the weight index names tensors its files lack: {', '.join(missing[:4])}")
        self._src: dict[str, tuple[str, str, Path]] = {}
        specs = {}
        for k, p in where.items():
            key, form = self.layout.from_hf(k)
            self._src[key] = (k, form, p)
            specs[key] = (hf_specs[k][0], hf_shape(hf_specs[k][1], form, inverse=True))
        self.version = detect_version(specs, str(self.folder))
        if self.version not in self.layout.versions:
            raise ValueError(f"{self.folder}: an {self.version} model in the {self.layout.name} layout, which "
                             f"holds {'/'.join(self.layout.versions)} only")
        keys = sorted(specs, key=lambda k: order_key(k, self.version))
        self._specs = [(k, *specs[k]) for k in keys]

    def __getitem__(self, key: str) -> torch.Tensor:
        hf_key, form, path = self._src[key]
        return from_hf(self._files[path][hf_key], form)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _, _ in self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def specs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return list(self._specs)

    def spans(self) -> dict[str, Span]:
        """Where the bytes of each tensor stored unchanged but for its shape lie (for byte copies)."""
        from rwkv_peft.model.stream import tensor_layout

        found = {p: tensor_layout(p)[1] for p in self._files}
        out = {}
        for key, (hf_key, form, path) in self._src.items():
            if form != "t" and hf_key in found[path]:
                out[key] = found[path][hf_key]
        return out

    def config(self) -> dict:
        p = self.folder / "config.json"
        try:
            return json.loads(p.read_text()) if p.is_file() else {}
        except (OSError, ValueError) as e:
            raise ValueError(f"{p}: not readable JSON ({e})") from None


def _shards(plan: list[tuple], limit: int) -> list[list[tuple]]:
    """Consecutive groups of at most ``limit`` bytes (a bigger tensor alone)."""
    out: list[list[tuple]] = [[]]
    size = 0
    for item in plan:
        n = item[3].itemsize * torch.Size(item[4]).numel()
        if out[-1] and size + n > limit:
            out.append([])
            size = 0
        out[-1].append(item)
        size += n
    return out


def _plan(specs: list, lay: Layout, dtype: torch.dtype | None, name: str) -> tuple[list[tuple], list[str]]:
    """(BlinkDL key, HF key, form, written dtype, HF shape, stored dtype) per tensor, and the keys left out."""
    plan, dropped = [], []
    for k, d, s in specs:
        hit = lay.to_hf(k)
        if hit is None:
            if not (k.startswith("blocks.0.") and k.removeprefix("blocks.0.") in FLA_UNUSED):
                raise ValueError(f"{name}: {k} has no place in the {lay.name} layout")
            dropped.append(k)
            continue
        out_dtype = dtype if dtype is not None and d.is_floating_point else d
        plan.append((k, hit[0], hit[1], out_dtype, hf_shape(s, hit[1]), d))
    return plan, dropped


def _write_weights(folder: Path, sd: Mapping[str, torch.Tensor], plan: list[tuple], spans: Mapping[str, Span],
                   shard_bytes: int) -> None:
    """model.safetensors (or shards and their index), a tensor at a time; unchanged bytes copied from ``spans``."""
    from rwkv_peft.model.stream import write_safetensors

    groups = _shards(plan, shard_bytes)
    names = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]

    def pieces(group: list[tuple]) -> Iterator[torch.Tensor | Span]:
        for k, _, form, out_dtype, _, stored in group:
            yield spans[k] if k in spans and form != "t" and out_dtype == stored else to_hf(sd[k], form)

    for group, fname in zip(groups, names, strict=True):
        with open(folder / fname, "wb") as f:
            write_safetensors(f, [(p[1], p[3], p[4]) for p in group], pieces(group), metadata={"format": "pt"})
    if len(groups) > 1:
        total = sum(p[3].itemsize * torch.Size(p[4]).numel() for p in plan)
        index = {"metadata": {"total_size": total},
                 "weight_map": {p[1]: fname for group, fname in zip(groups, names, strict=True) for p in group}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_files(folder: Path, config: dict, like: HFCheckpoint | None) -> None:
    """config.json, and the folder the model came from's other files (tokenizer, generation settings) or,
    for a new folder, the World vocab."""
    from rwkv_peft import files
    from rwkv_peft.data.tokenizer import world_vocab_path

    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if like is None:
        files.copy_file(world_vocab_path(), folder / VOCAB_FILE)
        return
    for p in like.folder.iterdir():
        if p.is_file() and not p.name.startswith(".") and p.name != "config.json" and not (
                p.name in WEIGHT_FILES or re.fullmatch(r"(model|pytorch_model)-\d+-of-\d+\.\w+", p.name)):
            files.copy_file(p, folder / p.name)


def write_folder(
    sd: Mapping[str, torch.Tensor],
    output: str | os.PathLike,
    layout: str | None = None,
    dtype: torch.dtype | None = None,
    like: HFCheckpoint | None = None,
    spans: Mapping[str, Span] | None = None,
    shard_bytes: int = 5 << 30,
    name: str = "model",
) -> list[str]:
    """Write the BlinkDL checkpoint ``sd`` (read a tensor at a time) as an HF folder at ``output``, atomically.

    ``layout`` defaults to ``like``'s (the folder the model came from, whose other files and config.json
    are kept) or the version's usual one; ``dtype`` (default: as stored) casts floating tensors; ``spans``
    (where ``sd``'s bytes lie) lets tensors stored as they are be copied as bytes. Returns the keys that have
    no place in the layout and were left out (x070's unused layer-0 v0/v1/v2 in fla's).
    """
    from rwkv_peft import files
    from rwkv_peft.model import config_from_state_dict, detect_version
    from rwkv_peft.model.checkpoint import meta_state_dict, tensor_specs

    specs = tensor_specs(sd)
    meta = meta_state_dict(specs)
    version = detect_version(meta, name)
    lay = LAYOUTS[layout or (like.layout.name if like else DEFAULT_LAYOUT[version])]
    if version not in lay.versions:
        raise ValueError(f"{name}: an {version} model has no {lay.name} layout (it holds {'/'.join(lay.versions)})")
    plan, dropped = _plan(specs, lay, dtype, name)
    like = like if like is not None and like.layout is lay else None
    dtypes = {p[3] for p in plan if p[3].is_floating_point}
    dtype_name = str(max(dtypes, key=lambda t: t.itemsize) if dtypes else torch.float32).removeprefix("torch.")
    config = (like.config() if like else {}) or lay.config(config_from_state_dict(meta, name), dtype_name)
    for field in ("torch_dtype", "dtype"):
        if field in config:
            config[field] = dtype_name
    with files.atomic_dir(output) as tmp:
        _write_weights(tmp, sd, plan, spans or {}, shard_bytes)
        _write_files(tmp, config, like)
        got = {k: (d, torch.Size(s).numel()) for k, d, s in HFCheckpoint(tmp).specs()}
        if got != {p[0]: (p[3], torch.Size(p[4]).numel()) for p in plan}:
            raise ValueError(f"{output}: the folder read back does not hold the tensors written; not written")
    return dropped
