"""The machinery under the recipe: the process group, DeepSpeed's engine (ZeRO 1/2/3) on CPU or GPU, the
optimizer and its state, and the collectives the loop needs (ZeRO-3 gathering, means over ranks).

Lightning's DeepSpeed strategy refuses CPUs, so the trainer drives ``deepspeed.initialize`` itself:
the same code runs in CI on a laptop CPU and under ``torchrun`` / ``deepspeed`` on many GPUs.
"""

from __future__ import annotations

import io
import logging
import math
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from rwkv_peft.model import to_stored
from rwkv_peft.peft import trainable_state_dict
from rwkv_peft.precision import master, resolve_precision, set_masters
from rwkv_peft.train.config import TrainConfig
from rwkv_peft.train.ds_config import build_ds_config, check_supported


def check_device(cfg: TrainConfig) -> bool:
    """Whether the run uses a GPU; refuses what this machine or DeepSpeed cannot do. Resolves ``--precision
    auto`` for the device and says the choice (rank 0's first line)."""
    on_gpu = cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available())
    if on_gpu and not torch.cuda.is_available():
        raise ValueError(f"--accelerator {cfg.accelerator}: no CUDA device is available; use --accelerator cpu")
    cfg.precision, why = resolve_precision(cfg.precision, "cuda" if on_gpu else "cpu")
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"precision: {cfg.precision} ({why})", flush=True)
    check_supported(cfg, on_gpu)
    return on_gpu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process_group(cfg: TrainConfig, on_gpu: bool, deepspeed) -> Iterator[tuple[int, int, int]]:
    """(rank, world_size, local_rank) for the run, torn down after it.

    Under a launcher (torchrun, deepspeed) the group comes from its environment. A plain ``python``
    run is a world of one, joined through an explicit ``tcp://`` address; only ``LOCAL_RANK`` (which
    DeepSpeed's engine reads) is set meanwhile, and it is removed again, so no later subprocess
    inherits a stale rendezvous. ZeRO-3 replaces ``torch.nn.functional.linear`` process-wide; the
    original is put back, so a model used after the run computes as before it.
    """
    launched = "RANK" in os.environ
    if not launched and cfg.devices * cfg.num_nodes > 1:
        raise ValueError(f"--devices {cfg.devices}: launch several processes with "
                         f"`torchrun --nproc_per_node {cfg.devices} -m rwkv_peft.train ...`")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_gpu:
        torch.cuda.set_device(local_rank)
    owned = not dist.is_initialized()
    linear = torch.nn.functional.linear
    set_local_rank = "LOCAL_RANK" not in os.environ
    if set_local_rank:
        os.environ["LOCAL_RANK"] = "0"
    try:
        if owned:
            init = {} if launched else dict(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
            dist.init_process_group("nccl" if on_gpu else "gloo", **init)
        yield dist.get_rank(), dist.get_world_size(), local_rank
    finally:
        if owned and dist.is_initialized():  # through DeepSpeed's comm once the engine set it up
            from deepspeed.comm import comm

            (deepspeed.comm if comm.cdb is not None else dist).destroy_process_group()
        if set_local_rank:
            os.environ.pop("LOCAL_RANK", None)
        torch.nn.functional.linear = linear


def import_deepspeed(on_gpu: bool):
    """deepspeed with the right accelerator (chosen by an environment variable read at its import, hence
    imported here); on CPU without its shared-memory allreduce op, a C++ JIT build (minutes on the first
    run, and a hang on the stale lock a Ctrl-C leaves) that gloo makes unneeded."""
    if not on_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import deepspeed.ops

    if not on_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


def build_engine(deepspeed, cfg: TrainConfig, model: nn.Module, params: list, on_gpu: bool, world: int):
    """DeepSpeed's engine around the model and an Adam over ``params``; under bf16/fp16 their fp32 master
    copies start from the fp32 values ``params`` hold before the engine casts the module."""
    optimizer = build_optimizer(cfg, params, on_gpu)
    fp32_values = [p.detach().clone() for p in params] if cfg.precision != "fp32" else None
    with redirect_stdout(io.StringIO()):  # bf16 on ZeRO-1 prints memory statistics (print(), no logger)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params,
                                               config=build_ds_config(cfg, world))
    if fp32_values is not None:
        set_masters(params, fp32_values)
    return engine


def build_optimizer(cfg: TrainConfig, params: list, on_gpu: bool) -> torch.optim.Optimizer:
    """Adam over the trainable tensors: DeepSpeed's fused (GPU) or CPU Adam (offload) when they build,
    else torch's AdamW."""
    kw = dict(lr=cfg.lr_init, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if on_gpu:
        try:
            if cfg.offload:
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                return DeepSpeedCPUAdam(params, adamw_mode=True, **kw)
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(params, adam_w_mode=True, **kw)
        except Exception as e:  # the op failed to build: torch's fused AdamW is nearly as fast
            print(f"note: DeepSpeed Adam unavailable ({type(e).__name__}); using torch AdamW", file=sys.stderr)
            return torch.optim.AdamW(params, fused=not cfg.offload, **kw)
    return torch.optim.AdamW(params, **kw)


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO wrapper (its state is plain tensors and numbers)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def set_lr(engine, lr: float) -> None:
    for group in inner_optimizer(engine).param_groups:
        group["lr"] = lr


def optimizer_state(engine) -> list[dict[str, torch.Tensor]]:
    """Per-parameter state in param_groups order (plain tensors; works for ZeRO's flat partitions too,
    where torch's own state_dict cannot map the swapped-in parameters)."""
    opt = inner_optimizer(engine)
    params = [p for g in opt.param_groups for p in g["params"]]
    return [{k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in opt.state.get(p, {}).items()}
            for p in params]


def load_optimizer_state(engine, state: list[dict], where: Path) -> None:
    opt = inner_optimizer(engine)
    params = [p for g in opt.param_groups for p in g["params"]]
    if len(state) != len(params):
        raise ValueError(f"{where}: optimizer state for {len(state)} tensors, this run has {len(params)} "
                         "(resume with the same --peft, --strategy and number of processes)")
    for p, st in zip(params, state, strict=True):
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() and v.shape != p.shape:
                raise ValueError(f"{where}: optimizer state {k} has shape {tuple(v.shape)}, expected "
                                 f"{tuple(p.shape)} (same --peft config and process count needed)")
        opt.state[p] = {k: v.to(p.device) if torch.is_tensor(v) and v.dim() else v for k, v in st.items()}


def gathered_trainable(engine, model: nn.Module, params: list) -> dict[str, torch.Tensor]:
    """The trainable tensors, whole on every rank (ZeRO-3 holds a slice per rank: gathered; collective);
    under bf16/fp16 their fp32 master copies, which the optimizer updates (the module's are rounded)."""
    gathered = nullcontext()
    if engine.zero_optimization_partition_weights():
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params)
    with gathered:
        sd = trainable_state_dict(model)
        if engine.bfloat16_enabled() or engine.fp16_enabled():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    sd[n] = to_stored(model, n, master(p).detach()).to("cpu", copy=True)
    return sd


def grad_norm(engine) -> dict[str, float]:
    """The global gradient norm DeepSpeed computed for clipping at this step ({} when it has none)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return {}
    norm = float(norm)
    return {"grad_norm": norm} if math.isfinite(norm) else {}


def any_rank(flag: bool, device: str) -> bool:
    """Whether ``flag`` holds on some rank (collective: every rank decides the same)."""
    t = torch.tensor([float(flag)], device=device)  # nccl needs it on the GPU
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def rank_mean(values: dict[str, torch.Tensor], device: str) -> dict[str, float]:
    """Each value averaged over the ranks (collective)."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in values.values()])
    dist.all_reduce(t)
    return {k: v / dist.get_world_size() for k, v in zip(values, t.tolist(), strict=True)}
