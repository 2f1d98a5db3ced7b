"""Proof that a merged file computes what the adapted model computes, in the official `rwkv` runtime.

``verify_merged`` (the merge CLI's ``--verify``) loads the merged file in the runtime and the base
with the adapter applied the training way in our model, and compares their logits on a prompt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from rwkv_peft.merge.plan import Edit, plan_edits, read_adapter
from rwkv_peft.model.checkpoint import meta_state_dict, read_specs
from rwkv_peft.peft.registry import base_replacing, get_method

DEMO_QUESTION = "Tom has 3 apples. He gets 5 more. How many apples does Tom have now?"


def peft_config_from_edits(edits: Mapping[str, Edit], config: dict, model: torch.nn.Module) -> tuple[str, object]:
    """(method, PeftConfig) that rebuilds the adapted model the edits came from (works for foreign files too)."""
    from rwkv_peft.peft.inject import parse_peft_config

    folds = {k: e.fold for k, e in edits.items() if e.fold is not None}
    methods = {f.method for f in folds.values()}
    if len(methods) > 1:
        raise ValueError(f"the adapter mixes methods {sorted(methods)}; one adapted model cannot rebuild it")
    if not methods:  # plain base tensors only
        whole = base_replacing().name
        return whole, parse_peft_config(whole, "{}")
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

    adapter, cfg = read_adapter(adapter_path, config)
    model = load_model(base_path, dtype=torch.float32, op=op)
    # the stored shapes, from the file's metadata (load_model has checked its CRCs)
    edits = plan_edits(meta_state_dict(read_specs(base_path)), adapter, cfg, str(base_path), str(adapter_path))
    method, peft_cfg = peft_config_from_edits(edits, cfg, model)
    apply_peft(model, method, peft_cfg)
    load_adapter(model, adapter)
    if quant is not None and not get_method(method).replaces_base:  # trained weights are not quantized
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
    dtype = read_specs(merged_path)[0][1]
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
