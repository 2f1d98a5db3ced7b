"""Parameter-efficient fine-tuning for RWKV: MiSS (the point of the project), LoRA, PiSSA, state tuning."""

from rwkv_peft.peft.inject import (
    METHODS,
    FullConfig,
    adapter_config,
    apply_peft,
    load_adapter,
    parse_peft_config,
    trainable_state_dict,
)
from rwkv_peft.peft.lora import LoraConfig, LoraLinear, lora_delta
from rwkv_peft.peft.miss import MissConfig, MissLinear, miss_check, miss_delta, miss_linear, miss_merge, miss_unmerge
from rwkv_peft.peft.state import StateConfig

__all__ = [
    "METHODS",
    "FullConfig",
    "LoraConfig",
    "LoraLinear",
    "MissConfig",
    "MissLinear",
    "StateConfig",
    "adapter_config",
    "apply_peft",
    "load_adapter",
    "lora_delta",
    "miss_check",
    "miss_delta",
    "miss_linear",
    "miss_merge",
    "miss_unmerge",
    "parse_peft_config",
    "trainable_state_dict",
]
