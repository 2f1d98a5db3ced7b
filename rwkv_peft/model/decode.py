"""One-token decode steps of RWKV-7 (x070) on the CPU, a block per call of the compiled kernel.

A decode step reads every weight once, so its floor is the memory bandwidth; through
``forward_state`` it also pays ~50 small torch ops per block (dispatch, allocation, thread start-up
each), which at the 0.1B shape cost as much again. ``Stepper`` runs the same math
(``csrc/rwkv7_decode_cpu.cpp``) with a block per call: its matrices are the model's own tensors
(nn.Linear's (out, in) rows, no copy; an adapted linear's merged weight; the low-rank paths
transposed once), every matrix-vector product reads a weight row once for all sequences of a batch,
and the state is the one ``forward_state`` reads and returns. Models it does not know (another
version, a quantized base, extra tensors in a block, a GPU) get None from ``stepper`` and decode
through ``forward_state``.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from rwkv_peft.ops.build import load_library

# the order of csrc/rwkv7_decode_cpu.cpp's enum Tensor; "T": stored (in, out), passed transposed
BLOCK_TENSORS = (
    "ln0.weight", "ln0.bias", "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias",
    "att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g", "att.w0", "att.a0", "att.v0",
    "att.k_k", "att.k_a", "att.r_k",
    "att.w1 T", "att.w2 T", "att.a1 T", "att.a2 T", "att.v1 T", "att.v2 T", "att.g1 T", "att.g2 T",
    "att.receptance", "att.key", "att.value", "att.output", "att.ln_x.weight", "att.ln_x.bias",
    "ffn.x_k", "ffn.key", "ffn.value",
)
LINEARS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")
KNOWN = {n.split()[0] for n in BLOCK_TENSORS} - set(LINEARS)  # a block's tensors besides the linears'


def _linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight a linear (plain, or adapted by a method that can merge) applies; None if unknown. An
    adapter switched off (``peft.adapter_disabled``) applies its base weight."""
    if type(module) is nn.Linear and module.bias is None or getattr(module, "adapter_off", False):
        return module.weight
    merged = getattr(module, "merged_weight", None)
    return merged() if callable(merged) else None


def _shapes(cfg) -> dict[str, tuple[int, ...]]:
    """The shape the kernel reads for each matrix of BLOCK_TENSORS (every other tensor: C values)."""
    C, F = cfg.n_embd, cfg.dim_ffn
    low = {"w": cfg.d_decay, "a": cfg.d_aaa, "v": cfg.d_mv, "g": cfg.d_gate}
    shapes = {f"att.{p}1 T": (d, C) for p, d in low.items()} | {f"att.{p}2 T": (C, d) for p, d in low.items()}
    return shapes | {f"att.{n}": (C, C) for n in ("receptance", "key", "value", "output")} | {
        "ffn.key": (F, C), "ffn.value": (C, F)}


def _block_tensors(block: nn.Module, dtype: torch.dtype, cfg) -> list[torch.Tensor | None] | None:
    """The block's tensors in BLOCK_TENSORS order (matrices in ``dtype``, vectors fp32), or None when the
    block holds tensors the kernel does not know or shapes it does not expect (e.g. ZeRO-3's empty slices)."""
    in_linears = tuple(f"{lin}." for lin in LINEARS)  # weights, and an adapter's tensors beside them
    if {n for n, _ in block.named_parameters() if not n.startswith(in_linears)} - KNOWN:
        return None
    out: list[torch.Tensor | None] = []
    for entry in BLOCK_TENSORS:
        name, *flag = entry.split()
        if name in LINEARS:
            w = _linear_weight(block.get_submodule(name))
            if w is None:
                return None
            out.append(w.detach().to(dtype).contiguous())
            continue
        try:
            t = block.get_parameter(name).detach()
        except AttributeError:  # ln0 outside layer 0, v0/v1/v2 in layer 0
            out.append(None)
            continue
        out.append((t.t().to(dtype) if flag else t.float()).contiguous())
    shapes = _shapes(cfg)
    for entry, t in zip(BLOCK_TENSORS, out, strict=True):
        if t is not None and (tuple(t.shape) != shapes[entry] if entry in shapes else t.numel() != cfg.n_embd):
            return None
    return out


class Stepper:
    """``step(tokens (B,), state) -> (logits (B, V) fp32, state)`` for a supported model (see ``stepper``)."""

    def __init__(self, model: nn.Module, blocks: list[list[torch.Tensor | None]], dtype: torch.dtype):
        cfg = model.cfg
        self.lib = load_library("rwkv7_decode_cpu")
        self.blocks = blocks  # keeps the tensors the pointer tables point into
        self.tables = [(ctypes.c_void_p * len(BLOCK_TENSORS))(*(0 if t is None else t.data_ptr() for t in b))
                       for b in blocks]
        self.emb = model.emb.weight
        self.ln_out = [t.detach().float().contiguous() for t in (model.ln_out.weight, model.ln_out.bias)]
        self.head = model.head.weight.detach().to(dtype).contiguous()
        self.shape = (cfg.n_embd, cfg.n_head, cfg.head_size, cfg.dim_ffn, cfg.d_decay, cfg.d_aaa, cfg.d_mv,
                      cfg.d_gate)
        self.bf16 = int(dtype == torch.bfloat16)
        self.vocab = cfg.vocab_size

    def _dims(self, batch: int, block: list) -> torch.Tensor:
        C, H, N, F, dw, da, dv, dg = self.shape
        has_ln0, has_vres = int(block[0] is not None), int(block[BLOCK_TENSORS.index("att.v0")] is not None)
        return torch.tensor([batch, C, H, N, F, dw, da, dv, dg, has_ln0, has_vres, self.bf16], dtype=torch.int64)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: list) -> tuple[torch.Tensor, list]:
        B, (C, H, N, F, dw, da, dv, dg) = tokens.shape[0], self.shape
        x = self.emb[tokens].float().contiguous()
        v_first = x.new_empty(B, C)
        work = x.new_empty(B * (17 * C + F + dw + da + dv + dg))
        shapes = [(B, C), (B, H, N, N), (B, C)]
        if len(state) != len(self.blocks) or any(list(map(tuple, (t.shape for t in s))) != shapes for s in state):
            raise ValueError(f"decode step: expected a state of {len(self.blocks)} blocks shaped {shapes}")
        new_state = []
        for block, table, (att, wkv, ffn) in zip(self.blocks, self.tables, state, strict=True):
            ins = [s.float().contiguous() for s in (att, wkv, ffn)]
            outs = [torch.empty_like(s) for s in ins]
            dims = self._dims(B, block)
            self.lib.rwkv7_decode_block(
                ctypes.c_void_p(dims.data_ptr()), table,
                *(ctypes.c_void_p(t.data_ptr()) for t in (x, v_first, ins[0], outs[0], ins[1], outs[1], ins[2],
                                                          outs[2], work)))
            new_state.append(outs)
        logits = x.new_empty(B, self.vocab)
        dims = self._dims(B, self.blocks[0])
        self.lib.rwkv7_decode_head(
            ctypes.c_void_p(dims.data_ptr()),
            *(ctypes.c_void_p(t.data_ptr()) for t in (*self.ln_out, self.head)), ctypes.c_int64(self.vocab),
            *(ctypes.c_void_p(t.data_ptr()) for t in (x, logits, work)))
        return logits, new_state


def stepper(model: nn.Module, dtype: torch.dtype | None = None) -> Stepper | None:
    """A ``Stepper`` for an x070 model on the CPU made of the tensors it knows (plain or mergeable
    adapted linears), matrices in ``dtype`` (default: the model's own); None for any other model."""
    from rwkv_peft.model.rwkv7 import RWKV7

    if not isinstance(model, RWKV7) or model.emb.weight.device.type != "cpu" or not isinstance(model.head, nn.Linear):
        return None
    dtype = dtype or model.emb.weight.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        return None
    cfg = model.cfg
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # ZeRO-3 slices, gathered per forward call
        return None
    whole = (model.emb.weight.shape == model.head.weight.shape == (cfg.vocab_size, cfg.n_embd)
             and model.ln_out.weight.numel() == model.ln_out.bias.numel() == cfg.n_embd)
    blocks = [_block_tensors(b, dtype, cfg) for b in model.blocks] if whole else [None]
    return None if any(b is None for b in blocks) else Stepper(model, blocks, dtype)
