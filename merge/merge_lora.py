"""Fold a LoRA, PiSSA or DoRA adapter into an RWKV checkpoint.

python merge/merge_lora.py --base_model BASE.pth --peft_checkpoint OUT/rwkv-N.pth --output MERGED.pth
(alpha from adapter_config.json beside the checkpoint, or --lora_alpha; PiSSA's initial factors
pissa_A0/pissa_B0 and DoRA's lora_magnitude_vector are read from the adapter itself; --unmerge inverts
LoRA and PiSSA). The same as python -m rwkv_peft.merge, the one merge command for every method.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from rwkv_peft.merge import main  # noqa: E402

if __name__ == "__main__":
    main(description=__doc__.splitlines()[0])
