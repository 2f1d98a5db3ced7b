"""Fold a MiSS adapter (rwkv_peft's .miss, RWKV-PEFT's .disha/.bone) into an RWKV checkpoint.

python merge/merge_miss.py --base_model BASE.pth --peft_checkpoint OUT/rwkv-N.pth --output MERGED.pth
(mode from adapter_config.json beside the checkpoint; --mode overrides; --unmerge inverts). The same as
python -m rwkv_peft.merge, the one merge command for every method.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from rwkv_peft.merge import main  # noqa: E402

if __name__ == "__main__":
    main(description=__doc__.splitlines()[0])
