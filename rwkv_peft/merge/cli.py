"""The merge command line: ``python -m rwkv_peft.merge`` (and merge/merge_miss.py, merge_lora.py)."""

from __future__ import annotations

from pathlib import Path

from rwkv_peft.cli import ArgumentParser, fail
from rwkv_peft.merge.verify import verify_merged
from rwkv_peft.merge.write import merge_adapter
from rwkv_peft.model.stream import reuse_heap
from rwkv_peft.peft.registry import merge_flags


def _parser(description: str) -> ArgumentParser:
    p = ArgumentParser(description=description)
    p.add_argument(
        "--base_model", required=True, help="base checkpoint (.pth/.safetensors); the merged one with --unmerge"
    )
    p.add_argument("--peft_checkpoint", required=True,
                   help="adapter checkpoint, e.g. OUT/rwkv-N.pth, or a Hugging Face peft adapter folder")
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
        fail(e)
    print(f"wrote {out}")

