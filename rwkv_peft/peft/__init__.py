"""Parameter-efficient fine-tuning for RWKV: MiSS (the point of the project), LoRA, PiSSA, state tuning."""

from rwkv_peft.peft.miss import MissConfig, MissLinear, miss_check, miss_delta, miss_linear, miss_merge, miss_unmerge

__all__ = ["MissConfig", "MissLinear", "miss_check", "miss_delta", "miss_linear", "miss_merge", "miss_unmerge"]
