"""The trainer: ``python -m rwkv_peft.train`` (flags in config.py); read recipe.py first."""

from rwkv_peft.train.config import TrainConfig, parse_args
from rwkv_peft.train.loss import L2Wrap, masked_loss
from rwkv_peft.train.recipe import main, train
from rwkv_peft.train.schedule import lr_at

__all__ = ["L2Wrap", "TrainConfig", "lr_at", "main", "masked_loss", "parse_args", "train"]
