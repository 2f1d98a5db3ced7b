"""Fold adapters into a base checkpoint (and back out), streamed tensor by tensor.

    python -m rwkv_peft.merge --base_model BASE.pth --peft_checkpoint OUT/rwkv-N.pth --output MERGED.pth
    python -m rwkv_peft.merge --unmerge --base_model MERGED.pth --peft_checkpoint OUT/rwkv-N.pth --output BASE.pth

The result is an ordinary RWKV checkpoint: the base's keys, shapes and dtypes, no adapter keys.
One module per job: ``plan`` checks the adapter against the base's metadata and says what changes
in each tensor (the formulas live in rwkv_peft.peft, one record per method in its registry);
``write`` streams the output (untouched tensors copied as bytes, edited ones folded in fp32 while
the previous one is written; memory stays near two tensors' fp32 copies); ``verify`` compares the
merged file in the official `rwkv` runtime with the adapted model; ``cli`` is the command line.
"""

from rwkv_peft.merge.cli import main
from rwkv_peft.merge.plan import (
    Edit,
    adapter_config_path,
    merge_state_dict,
    plan_edits,
    read_adapter,
    read_adapter_config,
    resolve_config,
)
from rwkv_peft.merge.verify import adapted_model, peft_config_from_edits, verify_merged, verify_tolerance
from rwkv_peft.merge.write import merge_adapter, unmerge_adapter, write_edited

__all__ = [
    "Edit",
    "adapted_model",
    "adapter_config_path",
    "main",
    "merge_adapter",
    "merge_state_dict",
    "peft_config_from_edits",
    "plan_edits",
    "read_adapter",
    "read_adapter_config",
    "resolve_config",
    "unmerge_adapter",
    "verify_merged",
    "verify_tolerance",
    "write_edited",
]
