"""The DeepSpeed config built from the flags, and which combinations this machine can run."""

from __future__ import annotations

from rwkv_peft.train.config import TrainConfig


def check_supported(cfg: TrainConfig, on_gpu: bool) -> None:
    """One-line errors for combinations DeepSpeed cannot run here (found by trying them with deepspeed 0.19)."""
    if not on_gpu and cfg.offload:
        raise ValueError(f"--strategy {cfg.strategy}: offload moves optimizer state from GPU to CPU memory; "
                         f"on --accelerator cpu it is there already: use deepspeed_stage_{cfg.zero_stage}")
    if not on_gpu and cfg.precision == "fp16":
        raise ValueError("--precision fp16 needs a GPU (fp16 loss scaling); on CPU use fp32 or bf16")


def build_ds_config(cfg: TrainConfig, world_size: int) -> dict:
    """ZeRO stage / offload, precision, micro batch, accumulation and clipping for ``deepspeed.initialize``."""
    zero: dict = {"stage": cfg.zero_stage, "contiguous_gradients": True, "overlap_comm": False}
    if cfg.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if cfg.zero_stage in (1, 2):
        zero.update(allgather_bucket_size=int(2e8), reduce_bucket_size=int(2e8))
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_bsz,
        "gradient_accumulation_steps": cfg.accumulate_grad_batches,
        "train_batch_size": cfg.micro_bsz * cfg.accumulate_grad_batches * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":  # bf16 module; fp32 master weights, optimizer state and gradient sums
        ds["bf16"] = {"enabled": True}
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    elif cfg.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 12, "loss_scale_window": 100}
    return ds
