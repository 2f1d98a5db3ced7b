"""rwkv-peft: MiSS (Matrix Shard Sharing) fine-tuning for RWKV language models."""

__version__ = "0.1.0"
