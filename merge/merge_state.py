"""Fold a state-tuning adapter into an RWKV x060/x052 checkpoint, as RWKV-PEFT's merge_state.py does.

python merge/merge_state.py --base_model BASE.pth --state_checkpoint OUT/rwkv-N.pth --output MERGED.pth

The output is the base plus ``blocks.N.att.time_state`` (and any train_parts tensors the adapter
replaced): the `rwkv` runtime starts x060/x052 models from a time_state it finds in the file.
Its x070 class ignores one, so x070 is refused: use the state file itself (generate --state,
RWKV-Runner and Ai00 load it beside the base model). The same as python -m rwkv_peft.merge.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from rwkv_peft.merge import main  # noqa: E402

if __name__ == "__main__":
    main(description=__doc__.splitlines()[0])
