"""The trainer: ``python -m rwkv_peft.train`` (flags in config.py), one loop on DeepSpeed's engine."""

from rwkv_peft.train.config import TrainConfig, parse_args
from rwkv_peft.train.loop import main, train
from rwkv_peft.train.loss import L2Wrap, masked_loss
from rwkv_peft.train.schedule import lr_at

__all__ = ["L2Wrap", "TrainConfig", "lr_at", "main", "masked_loss", "parse_args", "train"]
