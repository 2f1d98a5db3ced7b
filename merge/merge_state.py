"""Fold a state-tuning adapter into an RWKV x060/x052 checkpoint, as RWKV-PEFT's merge_state.py does.

python merge/merge_state.py --base_model BASE.pth --state_checkpoint OUT/rwkv-N.pth --output MERGED.pth

The output is the base plus ``blocks.N.att.time_state`` (and any train_parts tensors the adapter
replaced): the `rwkv` runtime starts x060/x052 models from a time_state it finds in the file.
Its x070 class ignores one, so x070 is refused: use the state file itself (generate --state,
RWKV-Runner and Ai00 load it beside the base model).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from rwkv_peft import files  # noqa: E402
from rwkv_peft.cli import ArgumentParser, fail  # noqa: E402
from rwkv_peft.peft.state import merge_state  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base_model", required=True, help="base checkpoint (x060 / x052)")
    p.add_argument("--state_checkpoint", required=True, help="state adapter, e.g. OUT/rwkv-final.pth")
    p.add_argument("--output", required=True, help="output checkpoint (.pth, or .safetensors by name)")
    args = p.parse_args(argv)
    output = Path(args.output)
    try:
        inputs = {args.base_model: f"--base_model {args.base_model}",
                  args.state_checkpoint: f"--state_checkpoint {args.state_checkpoint}"}
        files.check_not_input({output: f"--output {output}"}, inputs)
        files.check_writable_dir(output.parent, f"--output {output}", create=False)
        files.note_removed(files.remove_stale_temps(output.parent, output.name))
        out = merge_state(args.base_model, args.state_checkpoint, output)
    except (ValueError, OSError) as e:
        fail(e)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
