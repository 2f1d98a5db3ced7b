"""Write a freshly initialised RWKV model in the official key layout.

python -m rwkv_peft.tools.init_model --version x070|x060|x052 --n_layer L --n_embd C --vocab_size V --out BASE.pth
(``--deepembed``: an RWKV-7a DeepEmbed base, x070 plus ffn.s_emb / s_emb_x / s0 / s1 / s2; ``--dea``: RWKV-7b,
7a plus DeepEmbed attention, blocks.N.qkv.*.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from rwkv_peft import files
from rwkv_peft.cli import ArgumentParser, fail
from rwkv_peft.model import VERSIONS, init_model, save_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", default="x070", choices=list(VERSIONS))
    p.add_argument("--n_layer", type=int, required=True)
    p.add_argument("--n_embd", type=int, required=True)
    p.add_argument("--vocab_size", type=int, default=65536)
    p.add_argument("--head_size", type=int, default=64)
    p.add_argument("--dim_ffn", type=int, default=0, help="0: the version's default (x070: 4x, x060/x052: 3.5x n_embd)")
    p.add_argument(
        "--dtype", default="bf16", choices=list(DTYPES), help="stored dtype (official: bf16)"
    )
    p.add_argument("--deepembed", type=int, nargs="?", const=32, default=0, metavar="D",
                   help="x070 only: add RWKV-7a's DeepEmbed tensors, a D x D matrix per token (default D: 32, "
                        "the released models' and the only one the rwkv runtime runs)")
    p.add_argument("--dea", action="store_true",
                   help="x070 only: RWKV-7b, DeepEmbed attention (blocks.N.qkv.*, the released 256-wide queries "
                        "and 32-wide k/v paths) on a DeepEmbed base (--deepembed 32 unless given)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_std", type=float, default=0.0,
                   help="std of random att.output / ffn.value weights (0: zero, RWKV-LM's init; the demos use >0 "
                        "so that PiSSA, which starts from a weight's principal components, has some); with "
                        "--deepembed also of ffn.s2 (and with --dea qkv.lnv.weight), so that DeepEmbed is live")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.n_layer < 1 or a.vocab_size < 1:
        p.error("--n_layer and --vocab_size must be positive")
    if (a.deepembed or a.dea) and a.version != "x070":
        p.error(f"--deepembed/--dea: DeepEmbed is an RWKV-7 (x070) extension, not {a.version}")
    if a.deepembed < 0:
        p.error(f"--deepembed: expected a positive size D, got {a.deepembed}")
    try:
        cfg = VERSIONS[a.version].config(a.n_layer, a.n_embd, a.vocab_size, a.head_size, a.dim_ffn)
    except ValueError as e:
        p.error(f"--n_embd/--head_size: {e}")
    if a.deepembed or a.dea:
        cfg.deepembed = a.deepembed or 32
    if a.dea:
        cfg.dea_q, cfg.dea_k = 256, 32
    out = Path(a.out)
    try:  # the output directory before building the model; a full disk while writing: one line too
        files.check_writable_dir(out.parent, f"--out {out}", create=False)
        files.note_removed(files.remove_stale_temps(out.parent, out.name))
        model = init_model(cfg, seed=a.seed, op="torch")
        if a.output_std > 0:
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    if k.endswith(("att.output.weight", "ffn.value.weight", "ffn.s2", "qkv.lnv.weight")):
                        v.normal_(0.0, a.output_std)
        save_model(model, out, dtype=DTYPES[a.dtype])
    except OSError as e:
        fail(e)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {a.out}: RWKV {a.version}{' DeepEmbed' if a.deepembed or a.dea else ''}{' attention' if a.dea else ''} "
        f"L{a.n_layer} D{a.n_embd} vocab {a.vocab_size}, "
        f"{n / 1e6:.2f}M params ({a.dtype})"
    )


if __name__ == "__main__":
    main()
