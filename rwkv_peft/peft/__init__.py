"""Parameter-efficient fine-tuning for RWKV: MiSS (the point of the project), LoRA, PiSSA, DoRA, state tuning
(and full fine-tuning as the baseline).

Each method is one record in ``registry.py`` and one module with its config, layer and math.
"""

from rwkv_peft.peft.full import FullConfig
from rwkv_peft.peft.inject import (
    adapter_config,
    adapter_disabled,
    apply_peft,
    load_adapter,
    parse_peft_config,
    trainable_state_dict,
)
from rwkv_peft.peft.lora import LoraConfig, LoraLinear, lora_delta
from rwkv_peft.peft.miss import MissConfig, MissLinear, miss_check, miss_delta, miss_linear, miss_merge, miss_unmerge
from rwkv_peft.peft.registry import METHODS, Method, get_method
from rwkv_peft.peft.state import StateConfig

__all__ = [
    "METHODS",
    "FullConfig",
    "LoraConfig",
    "LoraLinear",
    "Method",
    "MissConfig",
    "MissLinear",
    "StateConfig",
    "adapter_config",
    "adapter_disabled",
    "apply_peft",
    "get_method",
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
