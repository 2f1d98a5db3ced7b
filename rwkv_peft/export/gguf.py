"""GGUF for llama.cpp, written directly with the ``gguf`` package (llama.cpp's own gguf-py).

Tensor names, transforms, types and metadata are those llama.cpp's ``convert_hf_to_gguf.py`` (its
``conversion/rwkv.py``) gives the HF folder of the same model, so the file runs in llama.cpp (and Ollama,
LM Studio) unchanged: the token-shift mixes fused into one ``time_mix_lerp_fused`` tensor, RWKV-7's
low-rank matrices as (out, in), ``r_k`` flat, layer 0's unused value-residual tensors filled with its
``a`` ones (llama.cpp loads v0/v1/v2 in every layer), per-channel vectors as 1-D F32, the World vocab
with ``tokenizer.ggml.model = "rwkv"``. The file is streamed: tensor infos first, then one tensor at a
time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from rwkv_peft import files

T = gguf.MODEL_TENSOR
QTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
# Kept F32 whatever the file type, as llama.cpp's converter does (besides 1-D tensors and norms).
ALWAYS_F32 = (T.TIME_MIX_FIRST, T.TIME_MIX_W1, T.TIME_MIX_W2, T.TIME_MIX_DECAY_W1, T.TIME_MIX_DECAY_W2,
              T.TIME_MIX_LERP_FUSED)
WORLD_EOT = 261  # "\n\n": llama.cpp's end of turn for the World vocab


def _sq(t: torch.Tensor) -> torch.Tensor:
    return t.squeeze()


def _t(t: torch.Tensor) -> torch.Tensor:
    return t.squeeze().t()


# BlinkDL leaf (or a tuple of leaves fused) -> (GGUF tensor, transform). Biases keep their suffix.
X070 = {
    "ln0": (T.TOKEN_EMBD_NORM, _sq), "ln1": (T.ATTN_NORM, _sq), "ln2": (T.ATTN_NORM_2, _sq),
    ("att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g"): (T.TIME_MIX_LERP_FUSED, None),
    "att.w0": (T.TIME_MIX_W0, _sq), "att.w1": (T.TIME_MIX_W1, _t), "att.w2": (T.TIME_MIX_W2, _t),
    "att.a0": (T.TIME_MIX_A0, _sq), "att.a1": (T.TIME_MIX_A1, _t), "att.a2": (T.TIME_MIX_A2, _t),
    "att.v0": (T.TIME_MIX_V0, _sq), "att.v1": (T.TIME_MIX_V1, _t), "att.v2": (T.TIME_MIX_V2, _t),
    "att.g1": (T.TIME_MIX_G1, _t), "att.g2": (T.TIME_MIX_G2, _t),
    "att.k_k": (T.TIME_MIX_K_K, _sq), "att.k_a": (T.TIME_MIX_K_A, _sq), "att.r_k": (T.TIME_MIX_R_K, torch.flatten),
    "att.receptance": (T.TIME_MIX_RECEPTANCE, _sq), "att.key": (T.TIME_MIX_KEY, _sq),
    "att.value": (T.TIME_MIX_VALUE, _sq), "att.output": (T.TIME_MIX_OUTPUT, _sq), "att.ln_x": (T.TIME_MIX_LN, _sq),
    "ffn.x_k": (T.CHANNEL_MIX_LERP_K, _sq), "ffn.key": (T.CHANNEL_MIX_KEY, _sq),
    "ffn.value": (T.CHANNEL_MIX_VALUE, _sq),
}
X060 = {
    "ln0": (T.TOKEN_EMBD_NORM, _sq), "ln1": (T.ATTN_NORM, _sq), "ln2": (T.ATTN_NORM_2, _sq),
    "att.time_maa_x": (T.TIME_MIX_LERP_X, _sq),
    tuple(f"att.time_maa_{c}" for c in "wkvrg"): (T.TIME_MIX_LERP_FUSED, None),
    "att.time_maa_w1": (T.TIME_MIX_W1, lambda t: t.t()),
    "att.time_maa_w2": (T.TIME_MIX_W2, lambda t: t.permute(0, 2, 1)),
    "att.time_decay": (T.TIME_MIX_DECAY, _sq), "att.time_decay_w1": (T.TIME_MIX_DECAY_W1, lambda t: t.t()),
    "att.time_decay_w2": (T.TIME_MIX_DECAY_W2, lambda t: t.t()), "att.time_faaaa": (T.TIME_MIX_FIRST, None),
    "att.receptance": (T.TIME_MIX_RECEPTANCE, None), "att.key": (T.TIME_MIX_KEY, None),
    "att.value": (T.TIME_MIX_VALUE, None), "att.output": (T.TIME_MIX_OUTPUT, None),
    "att.gate": (T.TIME_MIX_GATE, None), "att.ln_x": (T.TIME_MIX_LN, None),
    "ffn.time_maa_k": (T.CHANNEL_MIX_LERP_K, _sq), "ffn.time_maa_r": (T.CHANNEL_MIX_LERP_R, _sq),
    "ffn.key": (T.CHANNEL_MIX_KEY, None), "ffn.receptance": (T.CHANNEL_MIX_RECEPTANCE, None),
    "ffn.value": (T.CHANNEL_MIX_VALUE, None),
}
OUTER = {"emb": (T.TOKEN_EMBD, None), "ln_out": (T.OUTPUT_NORM, None), "head": (T.OUTPUT, None)}
ARCH = {"x070": (gguf.MODEL_ARCH.RWKV7, X070), "x060": (gguf.MODEL_ARCH.RWKV6, X060)}
RESCALED = (T.TIME_MIX_OUTPUT, T.CHANNEL_MIX_VALUE)  # x060 files with rescale_every > 0 (RWKV/v6-Finch-*-HF)


@dataclass(frozen=True)
class Item:
    """One GGUF tensor: its name and how it is made from BlinkDL tensors (``make`` works on meta tensors
    too, which gives its shape without reading data)."""

    name: str
    kind: T
    bid: int | None
    srcs: tuple[str, ...]
    fn: Callable | None
    rescale: int = 0

    def make(self, sd: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if len(self.srcs) > 1:  # token-shift mixes stacked as (n, 1, 1, C)
            return torch.stack([sd[k].reshape(1, 1, -1) for k in self.srcs])
        t = sd[self.srcs[0]]
        t = self.fn(t) if self.fn else t
        if self.rescale and self.kind in RESCALED:
            t = t / 2 ** (self.bid // self.rescale)
        return t


def _items(sd: Mapping[str, torch.Tensor], version: str, n_layer: int, rescale: int, name: str) -> list[Item]:
    """Every GGUF tensor of the model, checking that every key of ``sd`` has a place."""
    arch, table = ARCH[version]
    used, items = set(), []

    def add(kind: T, bid: int | None, keys: tuple[str, ...], fn: Callable | None) -> None:
        if len(keys) > 1 or keys[0] in sd:
            suffixes = [""]
        else:
            suffixes = [s for s in (".weight", ".bias") if f"{keys[0]}{s}" in sd] or [".weight"]
        for s in suffixes:
            srcs = tuple(k + s for k in keys)
            used.update(srcs)
            items.append(Item(gguf.TENSOR_NAMES[kind].format(bid=bid) + (s or ".weight"), kind, bid, srcs, fn, rescale))

    add(OUTER["emb"][0], None, ("emb",), None)
    for i in range(n_layer):
        for leaf, (kind, fn) in table.items():
            keys = tuple(f"blocks.{i}.{x}" for x in (leaf if isinstance(leaf, tuple) else (leaf,)))
            if leaf == "ln0" and i > 0:
                continue
            if i == 0 and kind in (T.TIME_MIX_V0, T.TIME_MIX_V1, T.TIME_MIX_V2):  # llama.cpp loads them; unused
                used.update(k for k in sd if k == keys[0])
                keys = (keys[0].replace(".att.v", ".att.a"),)
            add(kind, i, keys, fn)
    for leaf in ("ln_out", "head"):
        add(OUTER[leaf][0], None, (leaf,), None)
    missing = sorted(k for k in used if k not in sd)
    extra = [k for k in sd if k not in used]
    if missing or extra:
        raise ValueError(f"{name}: cannot be written as GGUF {arch.name.lower()}: " + "; ".join(
            f"{w} {', '.join(v[:4])}" for w, v in (("missing", missing), ("no GGUF tensor for", extra)) if v))
    return items


def _qtype(tname: str, shape: tuple[int, ...], ftype: str) -> gguf.GGMLQuantizationType:
    """The tensor's GGML type under llama.cpp's converter rules (Q8_0 rows not a multiple of 32: F16)."""
    if len(shape) <= 1 or tname.endswith("_norm.weight") or not tname.endswith(".weight") or any(
            tname == gguf.TENSOR_NAMES[k].format(bid=tname.split(".")[1]) + ".weight" for k in ALWAYS_F32):
        return gguf.GGMLQuantizationType.F32
    q = QTYPES[ftype]
    block = gguf.GGML_QUANT_SIZES[q][0]
    return q if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _array(t: torch.Tensor, q: gguf.GGMLQuantizationType) -> np.ndarray:
    """As the converter does: fp16 stays fp16, other dtypes go to fp32, then gguf quantizes."""
    t = t.detach().to("cpu")
    t = t if t.dtype in (torch.float16, torch.float32) else t.float()
    return gguf.quants.quantize(t.contiguous().numpy(), q)


def world_tokens(vocab_size: int, vocab_file: str | os.PathLike, name: str) -> tuple[list[bytes], list[int]]:
    """The World vocab as llama.cpp lists it: ``<s>`` (control) at 0, each token's ``repr`` text, padding."""
    from rwkv_peft.data.tokenizer import load_world_vocab

    vocab = load_world_vocab(str(vocab_file))
    n = max(vocab) + 1
    if vocab_size < n:
        raise ValueError(f"{name}: vocab size {vocab_size} cannot hold the World vocab's {n} tokens "
                         f"(GGUF tokenizer.ggml.model rwkv); export this model as hf or pth instead")
    tokens = [b"<s>"] + [repr(vocab[i])[2:-1].encode() for i in range(1, n)]
    tokens += [f"[PAD{i}]".encode() for i in range(n, vocab_size)]
    types = [gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (n - 1) + [gguf.TokenType.UNUSED] * (vocab_size - n)
    return tokens, [int(t) for t in types]


def _metadata(w: gguf.GGUFWriter, cfg, version: str, hparams: dict, model_path: Path, ftype: str) -> None:
    total, shared, expert, count = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, model_path, None, total)
    meta.name = meta.name or model_path.name
    meta.size_label = meta.size_label or gguf.size_label(total, shared, expert, count)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)
    w.add_context_length(1048576)  # RWKV has no context limit
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_layer_norm_eps(hparams.get("norm_eps", hparams.get("layer_norm_epsilon", 1e-5)))
    if version == "x060":
        w.add_rescale_every_n_layers(hparams.get("rescale_every", 0))
    w.add_wkv_head_size(cfg.head_size)
    if version == "x070":
        w.add_decay_lora_rank(cfg.d_decay)
        w.add_iclr_lora_rank(cfg.d_aaa)
        w.add_value_residual_mix_lora_rank(cfg.d_mv)
        w.add_gate_lora_rank(cfg.d_gate)
    else:
        w.add_time_mix_extra_dim(cfg.d_mix)
        w.add_time_decay_extra_dim(cfg.d_decay)
    w.add_feed_forward_length(cfg.dim_ffn)
    w.add_file_type(FILE_TYPES[ftype])
    w.add_head_count(0)  # required by llama.cpp, unused
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _vocab(w: gguf.GGUFWriter, vocab_size: int, vocab_file: Path, hparams: dict, folder: Path | None,
           name: str) -> None:
    tokens, types = world_tokens(vocab_size, vocab_file, name)
    w.add_tokenizer_model("rwkv")
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=False) if folder else None
    ids = dict(special.special_token_ids) if special else {}
    if not special:
        ids.update({k: hparams[f"{k}_token_id"] for k in ("bos", "eos", "pad") if f"{k}_token_id" in hparams})
    ids.update({"eot": ids.get("eot", WORLD_EOT), "bos": 0, "eos": 0})  # as llama.cpp's converter sets them
    for k, v in ids.items():
        getattr(w, f"add_{k}_token_id")(v)
    w.add_chat_template((special.chat_template if special else None) or "rwkv-world")


def write_gguf(
    sd: Mapping[str, torch.Tensor],
    output: str | os.PathLike,
    ftype: str = "f16",
    hparams: dict | None = None,
    model_path: str | os.PathLike | None = None,
    vocab_file: str | os.PathLike | None = None,
    name: str = "model",
) -> Path:
    """Write ``sd`` (BlinkDL keys, x070 or x060, read a tensor at a time) as a GGUF file, atomically.

    ``hparams``: the HF config.json the converter would read (ours for a .pth; eps, rescale_every, token
    ids); ``model_path``: the HF folder (or the .pth without suffix) that names the model in the metadata
    as the converter names it from its folder; ``vocab_file``: the World vocab (default: the rwkv package's).
    """
    from rwkv_peft.data.tokenizer import world_vocab_path
    from rwkv_peft.model import config_from_state_dict, detect_version
    from rwkv_peft.model.checkpoint import meta_state_dict, tensor_specs

    meta = meta_state_dict(tensor_specs(sd))
    version = detect_version(meta, name)
    if version not in ARCH:
        raise ValueError(f"{name}: llama.cpp has no {version} architecture; GGUF is written for x070 and x060")
    if ftype not in QTYPES:
        raise ValueError(f"--dtype {ftype}: GGUF takes {', '.join(QTYPES)}")
    cfg = config_from_state_dict(meta, name)
    if hparams is None:  # what our HF folder of the model says (the converter reads it from there)
        from rwkv_peft.export.hf import DEFAULT_LAYOUT, LAYOUTS

        hparams = LAYOUTS[DEFAULT_LAYOUT[version]].config(cfg, "float32")
    rescale = hparams.get("rescale_every", 0) if version == "x060" else 0
    items = _items(sd, version, cfg.n_layer, max(rescale, 0), name)
    folder = Path(model_path) if model_path and Path(model_path).is_dir() else None
    output = Path(output)
    with files.atomic_path(output) as tmp:
        w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[ARCH[version][0]])
        for item in items:  # infos from shapes alone (meta tensors): no data read yet
            shape = tuple(item.make(meta).shape)
            q = _qtype(item.name, shape, ftype)
            byte_shape = gguf.quant_shape_to_byte_shape(shape, q)
            w.add_tensor_info(item.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=q)
        _metadata(w, cfg, version, hparams, Path(model_path or output.with_suffix("")), ftype)
        _vocab(w, cfg.vocab_size, Path(vocab_file or world_vocab_path()), hparams, folder, name)
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for item in items:
            t = item.make(sd)
            w.write_tensor_data(_array(t, _qtype(item.name, tuple(t.shape), ftype)))
        w.close()
    return output
