"""The one merge command for every method: ``python -m rwkv_peft.merge`` (merge/merge_miss.py, merge_lora.py and
merge_state.py call it). An adapter that folds linear by linear streams through ``write``; one whose method
merges as a whole (state tuning: RWKV-PEFT's merge_state layout) goes to its record's ``merge_whole``."""

from __future__ import annotations

from pathlib import Path

from rwkv_peft.cli import ArgumentParser, fail
from rwkv_peft.merge.plan import read_adapter_config
from rwkv_peft.merge.verify import verify_merged
from rwkv_peft.merge.write import merge_adapter, prepare_output
from rwkv_peft.model.checkpoint import read_specs
from rwkv_peft.model.stream import reuse_heap
from rwkv_peft.peft.registry import merge_flags, whole_merge_method


def _parser(description: str) -> ArgumentParser:
    p = ArgumentParser(description=description)
    p.add_argument(
        "--base_model", required=True, help="base checkpoint (.pth/.safetensors); the merged one with --unmerge"
    )
    p.add_argument("--peft_checkpoint", "--state_checkpoint", dest="peft_checkpoint", required=True,
                   help="adapter checkpoint, e.g. OUT/rwkv-N.pth, or a Hugging Face peft adapter folder "
                        "(--state_checkpoint: RWKV-PEFT's name for a state adapter)")
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
        whole = merged_whole(a, output)
        out = whole or merge_adapter(a.base_model, a.peft_checkpoint, output, overrides, quant=a.quant,
                                     unmerge=a.unmerge, log=log, check=verify if a.verify else None)
    except (ValueError, OSError) as e:
        fail(e)
    print(f"wrote {out}")


def merged_whole(a, output: Path) -> Path | None:
    """The output of a method that merges as a whole (its record's ``merge_whole``), or None for the others."""
    adapter = Path(a.peft_checkpoint)
    try:
        keys = {k for k, _, _ in read_specs(adapter)}  # metadata only: a full fine-tune's adapter is a whole model
    except (ValueError, OSError):
        return None  # merge_adapter checks the output first, then names what is wrong with the adapter
    method = whole_merge_method(read_adapter_config(adapter).get("method"), keys)
    if method is None:
        return None
    used = [f for f in ("unmerge", "verify", "quant") if getattr(a, f)]
    if used:
        raise ValueError(f"--{used[0]}: not available for a --peft {method.name} adapter ({adapter})")
    prepare_output(output, {Path(a.base_model): f"--base_model {a.base_model}",
                            adapter: f"--peft_checkpoint {adapter}"})
    return method.merge_whole(a.base_model, adapter, output)

