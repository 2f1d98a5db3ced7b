"""The one training loop: DeepSpeed's engine (ZeRO 1/2/3) on CPU or GPU, one or many processes.

Lightning's DeepSpeed strategy refuses CPUs, so the loop drives ``deepspeed.initialize`` itself:
the same code runs in CI on a laptop CPU and under ``torchrun`` / ``deepspeed`` on many GPUs.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rwkv_peft import files
from rwkv_peft.cli import fail
from rwkv_peft.data import get_data_type
from rwkv_peft.train import progress
from rwkv_peft.train.config import ARCH_FLAGS, TrainConfig, input_files, parse_args
from rwkv_peft.train.ds_config import build_ds_config, check_supported
from rwkv_peft.train.loggers import RunLog, check_loggers
from rwkv_peft.train.objectives import Context, get_objective, objective_options
from rwkv_peft.train.schedule import lr_at

STATE_FILE = "trainer_state.pt"
BEST_FILE = "rwkv-best.pth"
FINAL_FILE = "rwkv-final.pth"


def output_files(cfg: TrainConfig, proj: Path) -> list[Path]:
    """Every file a run may write in --proj_dir."""
    epochs = [f"rwkv-{e}.pth" for e in range(cfg.epoch_begin, cfg.epoch_begin + cfg.epoch_count)]
    return [proj / n for n in (*epochs, FINAL_FILE, BEST_FILE, STATE_FILE, "adapter_config.json",
                               "train_config.json", "train_log.jsonl", "loss.png", "eval.png")]


class RunFailed(Exception):
    """The run did not train (NaN/inf losses, a diverged adapter): exit non-zero, no rwkv-final.pth."""


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
    import torch.distributed as dist

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
    """deepspeed with the right accelerator; on CPU without its shared-memory allreduce op, a C++ JIT
    build (minutes on the first run, and a hang on the stale lock a Ctrl-C leaves) that gloo makes unneeded."""
    if not on_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import logging

    import deepspeed
    import deepspeed.ops

    if not on_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


def check_architecture(cfg: TrainConfig):
    """Read the checkpoint (CRC-checked, memory-mapped), refuse flags that contradict its architecture
    and a base holding NaN/inf (it could only train into NaN steps)."""
    from rwkv_peft.model import config_from_state_dict, read_state_dict
    from rwkv_peft.model.checkpoint import first_nonfinite

    sd = read_state_dict(cfg.load_model)
    arch = config_from_state_dict(sd, f"--load_model {cfg.load_model}")
    for name in ARCH_FLAGS:
        given, actual = getattr(cfg, name), getattr(arch, name)
        if given and given != actual:
            raise ValueError(f"--{name} {given} contradicts --load_model {cfg.load_model}, which has "
                             f"{name} {actual} (the architecture comes from the checkpoint; drop the flag)")
    bad = first_nonfinite(sd)
    if bad is not None:
        raise ValueError(f"--load_model {cfg.load_model}: base tensor {bad} holds NaN/inf; nothing can be "
                         "trained on it (re-download or re-export the base)")
    return sd, arch


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


def optimizer_state(opt: torch.optim.Optimizer) -> list[dict[str, torch.Tensor]]:
    """Per-parameter state in param_groups order (plain tensors; works for ZeRO's flat partitions too,
    where torch's own state_dict cannot map the swapped-in parameters)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return [{k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in opt.state.get(p, {}).items()}
            for p in params]


def load_optimizer_state(opt: torch.optim.Optimizer, state: list[dict], where: Path) -> None:
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


def latest_checkpoint(proj_dir: Path) -> dict | None:
    """trainer_state.pt (CRC-checked, tensors only), or None; a damaged one is an error naming it."""
    from rwkv_peft.model.checkpoint import load_checked

    path = proj_dir / STATE_FILE
    if not path.is_file():
        return None
    state = load_checked(path)
    need = {"epoch": int, "step": int, "adapter": str, "optimizer": list, "rng": list}
    wrong = [k for k, t in need.items() if not isinstance(state, dict) or not isinstance(state.get(k), t)]
    if wrong or Path(state["adapter"]).name != state["adapter"]:
        raise ValueError(f"{path}: not a trainer state of this trainer (bad or missing "
                         f"{', '.join(wrong) or 'adapter'}); delete it to start fresh")
    return state


def get_batch(ds, step_in_epoch: int, micro: int, cfg: TrainConfig, device: str) -> dict:
    """Micro-batch ``micro`` of optimizer step ``step_in_epoch``: a pure function of the position, so
    resuming at a step reads exactly what the uninterrupted run read. The data type's ``collate`` batches
    the items; its tensors go to the device."""
    first = (step_in_epoch * cfg.accumulate_grad_batches + micro) * cfg.micro_bsz
    batch = get_data_type(cfg.data_type).collate([ds[first + b] for b in range(cfg.micro_bsz)])
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass
class Run:
    """What the recipe's steps share: the job, this process's place in it, what setup built, and the
    counters the loop keeps."""

    cfg: TrainConfig
    proj: Path
    on_gpu: bool
    t_start: float
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    arch: Any = None
    dataset: Any = None
    evaluator: Any = None
    model: Any = None
    engine: Any = None
    objective: Any = None
    params: list = field(default_factory=list)
    resume: dict | None = None
    start_epoch: int = 0
    step: int = 0
    run_log: RunLog | None = None
    bar: Any = None
    last_saved: Path | None = None
    bad_in_row: int = 0
    bad_total: int = 0
    steps_run: int = 0
    steps_trained: int = 0
    tokens_seen: int = 0
    t_loop: float = 0.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def steps_total(self) -> int:
        return self.cfg.epoch_steps * self.cfg.epoch_count

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.ctx_len * self.cfg.micro_bsz * self.cfg.accumulate_grad_batches * self.world

    @property
    def title(self) -> str:
        return f"{self.cfg.peft} on {Path(self.cfg.load_model).name}"

    def say(self, *args) -> None:
        """Print on rank 0 (through the progress bar when there is one)."""
        if not self.is_main:
            return
        text = " ".join(map(str, args))
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)


def train(cfg: TrainConfig, dataset=None) -> dict:
    """Run the whole job; returns the summary (with the trained ``model``). ``dataset`` overrides --data_file.

    Inputs and the output directory are checked before anything heavy; the process that writes (rank 0)
    holds ``--proj_dir``'s lock for the whole run and first removes temps left there by killed runs."""
    from rwkv_peft.peft import parse_peft_config

    t_start = time.time()
    on_gpu = check_device(cfg)
    proj = Path(cfg.proj_dir)
    writer = int(os.environ.get("RANK", "0")) == 0
    if writer:
        files.check_writable_dir(proj, f"--proj_dir {proj}")
        files.check_not_input(dict.fromkeys(output_files(cfg, proj), f"--proj_dir {proj}"), input_files(cfg))
    base_sd, arch = check_architecture(cfg)
    with files.dir_lock(proj) if writer else nullcontext():
        if writer:
            files.note_removed(files.remove_stale_temps(proj))
        peft_cfg = parse_peft_config(cfg.peft, cfg.peft_json)
        deepspeed = import_deepspeed(on_gpu)
        with process_group(cfg, on_gpu, deepspeed) as (rank, world, local_rank):
            run = Run(cfg, proj, on_gpu, t_start, rank, world, f"cuda:{local_rank}" if on_gpu else "cpu", arch)
            run.resume = setup_resume(run)
            setup_data(run, dataset)
            report = setup_model(run, base_sd, peft_cfg)
            del base_sd
            setup_engine(run, deepspeed)
            start_log(run, report, peft_cfg)
            failure = train_epochs(run)
            return summarize(run, failure)


def check_device(cfg: TrainConfig) -> bool:
    """Whether the run uses a GPU; refuses what this machine or DeepSpeed cannot do, and bad logger flags."""
    on_gpu = cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available())
    if on_gpu and not torch.cuda.is_available():
        raise ValueError(f"--accelerator {cfg.accelerator}: no CUDA device is available; use --accelerator cpu")
    check_supported(cfg, on_gpu)
    check_loggers(cfg)
    return on_gpu


def setup_resume(run: Run) -> dict | None:
    """--resume 1: the trainer state of the interrupted run (None: start fresh)."""
    if not run.cfg.resume:
        return None
    state = latest_checkpoint(run.proj)
    if state is None:
        print(f"note: --resume 1 but {run.proj / STATE_FILE} does not exist; starting fresh", file=sys.stderr)
    return state


def setup_data(run: Run, dataset) -> None:
    """The training set (``dataset``, or --data_file read for this rank) and the held-out evaluator."""
    cfg = run.cfg
    torch.manual_seed(cfg.random_seed + run.rank)
    if dataset is None:
        from rwkv_peft.data import build_dataset

        samples_per_epoch = cfg.epoch_steps * cfg.accumulate_grad_batches * cfg.micro_bsz
        dataset = build_dataset(cfg.data_file, cfg.data_type, cfg.dataload, cfg.ctx_len, run.arch.vocab_size,
                                samples_per_epoch, cfg.random_seed, rank=run.rank, world_size=run.world,
                                tokenizer=cfg.tokenizer, sft_field=cfg.sft_field,
                                sft_template=cfg.sft_template or None, magic_prime=cfg.magic_prime,
                                chat_template=cfg.chat_template or None, too_long=cfg.too_long,
                                strict=bool(cfg.strict))
    run.dataset = dataset
    if cfg.eval_data:
        from rwkv_peft.train.evaluation import Evaluator

        run.evaluator = Evaluator(cfg, run.arch.vocab_size)
        if run.is_main:
            print(f"eval data: {run.evaluator.summary}", file=sys.stderr)


def setup_model(run: Run, base_sd: dict, peft_cfg) -> str:
    """The fp32 base with the method applied (and quantised, and resumed); returns the parameter report."""
    from rwkv_peft.model import load_model
    from rwkv_peft.peft import apply_peft, load_adapter

    cfg = run.cfg
    model = load_model(base_sd, device=run.device, dtype=torch.float32, op=cfg.op)
    report = apply_peft(model, cfg.peft, peft_cfg)
    if cfg.quant != "none":
        from rwkv_peft.quant import quantize_base

        report += " | " + quantize_base(model, cfg.quant)
    model.grad_cp = bool(cfg.grad_cp)
    run.start_epoch, run.step = cfg.epoch_begin, 0
    if run.resume is not None:
        adapter = run.proj / str(run.resume["adapter"])
        load_adapter(model, adapter)
        run.start_epoch, run.step = int(run.resume["epoch"]) + 1, int(run.resume["step"])
        run.last_saved = adapter
        run.say(f"resuming from {adapter}: epoch {run.start_epoch}, step {run.step}")
    model.train()
    run.params = [p for p in model.parameters() if p.requires_grad]
    if not run.params:
        raise ValueError(f"--peft {cfg.peft}: nothing to train (no trainable parameters)")
    run.model = model
    return report


def setup_engine(run: Run, deepspeed) -> None:
    """DeepSpeed's engine around the model and its optimizer (state restored when resuming), and the
    --objective that computes each step's loss through it."""
    optimizer = build_optimizer(run.cfg, run.params, run.on_gpu)
    run.engine, _, _, _ = deepspeed.initialize(model=run.model, optimizer=optimizer, model_parameters=run.params,
                                               config=build_ds_config(run.cfg, run.world))
    options = objective_options(run.cfg.objective, run.cfg.objective_options)
    run.objective = get_objective(run.cfg.objective).build(
        Context(run.engine, run.engine.module, run.cfg, options, run.device, run.rank, run.world))
    if run.resume is not None:
        load_optimizer_state(inner_optimizer(run.engine), run.resume["optimizer"][run.rank], run.proj / STATE_FILE)
        torch.set_rng_state(run.resume["rng"][run.rank])


def start_log(run: Run, report: str, peft_cfg) -> None:
    """Rank 0 announces the run and writes its configs and log; the progress bar; the step-0 evaluation."""
    from rwkv_peft.peft import adapter_config

    cfg, proj, arch = run.cfg, run.proj, run.arch
    arch_line = (f"RWKV {run.model.version} L{arch.n_layer} D{arch.n_embd} vocab {arch.vocab_size} "
                 f"head {arch.head_size} ffn {arch.dim_ffn}")
    effective = {**cfg.to_dict(), "world_size": run.world, "device": run.device, "architecture": arch_line}
    if run.is_main:
        proj.mkdir(parents=True, exist_ok=True)
        run.say(f"config: {json.dumps(effective)}")
        run.say(f"model: {arch_line} | {report}")
        run.say(f"training: {run.steps_total} steps x {run.tokens_per_step} tokens ({run.world} process(es), "
                f"{cfg.strategy}, {cfg.precision}, {run.device})")
        files.write_text(proj / "adapter_config.json",
                         json.dumps(adapter_config(run.model, cfg.peft, peft_cfg), indent=2) + "\n")
        files.write_text(proj / "train_config.json", json.dumps(effective, indent=2) + "\n")
        progress.truncate_log(proj / "train_log.jsonl", run.step if run.resume else -1)
        if (proj / FINAL_FILE).is_file() and run.step < run.steps_total:  # an earlier run's; this one may fail
            (proj / FINAL_FILE).unlink()
            run.say(f"note: removed {proj / FINAL_FILE} of an earlier run; this run writes its own when it completes")
        run.run_log = RunLog(cfg, proj, effective)
    if run.evaluator is not None and run.resume is not None:
        run.evaluator.remember(progress.read_log(proj / "train_log.jsonl") if run.is_main else [])
    if run.is_main and cfg.progress:
        from tqdm import tqdm

        run.bar = tqdm(total=run.steps_total, initial=run.step, unit="step", dynamic_ncols=True, file=sys.stdout)
    if run.evaluator is not None and run.step == 0:
        evaluate(run)
    run.t_loop = time.time()


def train_epochs(run: Run) -> str | None:
    """Every epoch from the start (or resume) position; returns why the run failed, or None."""
    cfg = run.cfg
    for epoch in range(run.start_epoch, cfg.epoch_begin + cfg.epoch_count):
        run.dataset.set_epoch(epoch)
        failure = train_epoch(run, epoch) or end_epoch(run, epoch)
        if failure:
            return failure
    return None


def train_epoch(run: Run, epoch: int) -> str | None:
    """The epoch's remaining steps: NaN/inf steps skipped (too many in a row: the failure returned)."""
    cfg = run.cfg
    first_step = run.step - (epoch - cfg.epoch_begin) * cfg.epoch_steps
    for j in range(first_step, cfg.epoch_steps):
        lr = lr_at(run.step, run.steps_total, cfg.lr_init, cfg.lr_final, cfg.warmup_steps, cfg.lr_schedule,
                   cfg.wsd_decay)
        t0 = time.time()
        losses, bad_micro = train_step(run, j, lr)
        run.steps_run += 1
        if bad_micro:
            run.bad_in_row, run.bad_total = run.bad_in_row + 1, run.bad_total + 1
            if run.bad_in_row >= cfg.max_bad_steps:
                return (f"stopped at step {run.step}: {run.bad_in_row} steps in a row with NaN/inf loss; "
                        + nonfinite_cause(run.model, cfg, run.params, run.steps_trained))
            if not losses:
                run.step += 1
                continue
        else:
            run.bad_in_row = 0
        log_step(run, epoch, losses, lr, time.time() - t0)
        if run.evaluator is not None and run.evaluator.due(run.step, run.steps_total):
            evaluate(run)
    return None


def train_step(run: Run, j: int, lr: float) -> tuple[list[dict[str, torch.Tensor]], int]:
    """Optimizer step ``j`` of the epoch over its micro-batches; returns (the finite micro-batches' loss and
    metrics, NaN/inf micro-batches).

    A NaN/inf micro-batch is skipped on every rank together: it backpropagates zero, which keeps
    DeepSpeed's accumulation counters aligned."""
    import torch.distributed as dist

    cfg, engine = run.cfg, run.engine
    for group in inner_optimizer(engine).param_groups:
        group["lr"] = lr
    losses, bad_micro = [], 0
    for micro in range(cfg.accumulate_grad_batches):
        loss, metrics = run.objective.loss(get_batch(run.dataset, j, micro, cfg, run.device))
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)  # nccl needs it on the GPU
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank skips together
        if bad.item():
            bad_micro += 1
            if cfg.accumulate_grad_batches == 1:
                break
            loss = sum((p * 0).sum() for p in run.params)  # contributes nothing, keeps counters aligned
        else:
            losses.append({"loss": loss.detach().float(), **{k: torch.as_tensor(v, dtype=torch.float32).detach()
                                                              for k, v in metrics.items()}})
        engine.backward(loss)
        engine.step()  # steps the optimizer at the accumulation boundary only
    return losses, bad_micro


def log_step(run: Run, epoch: int, losses: list[dict[str, torch.Tensor]], lr: float, dt: float) -> None:
    """Count a trained step; rank 0 logs the loss and the objective's metrics averaged over micro-batches and
    ranks, and shows progress."""
    import torch.distributed as dist

    run.steps_trained += 1
    means = torch.stack([torch.stack([m[k].float().to(run.device) for m in losses]).mean() for k in losses[0]])
    dist.all_reduce(means)
    metrics = dict(zip(losses[0], (means / run.world).tolist(), strict=True))
    run.tokens_seen += run.tokens_per_step
    run.step += 1
    record = {"step": run.step, "epoch": epoch, **metrics, "lr": lr,
              "tokens": run.step * run.tokens_per_step, "tok_s": run.tokens_per_step / max(dt, 1e-9),
              **grad_norm(run.engine)}
    if not run.is_main:
        return
    run.run_log.log(record)
    ev = run.evaluator
    shown = {k: f"{v:.4f}" for k, v in metrics.items()}
    if ev is not None and ev.best_step is not None:
        shown["eval"] = f"{ev.best_loss:.4f}@{ev.best_step}"
    if run.bar is not None:
        run.bar.set_postfix(**shown, lr=f"{lr:.2e}", tok_s=f"{run.tokens_seen / (time.time() - run.t_loop):.0f}",
                            refresh=False)
        run.bar.update(1)
    elif run.step % 10 == 0 or run.step == run.steps_total:
        run.say(f"step {run.step}/{run.steps_total} " + " ".join(f"{k} {v}" for k, v in shown.items())
                + f" lr {lr:.2e} tok/s {record['tok_s']:.0f}")


def end_epoch(run: Run, epoch: int) -> str | None:
    """Save at --epoch_save boundaries and at the end, unless the last step was NaN/inf; returns a failure."""
    cfg = run.cfg
    last = epoch == cfg.epoch_begin + cfg.epoch_count - 1
    if not ((epoch + 1 - cfg.epoch_begin) % cfg.epoch_save == 0 or last):
        return None
    if run.bad_in_row:
        run.say(f"note: epoch {epoch} not saved: its last step had a NaN/inf loss")  # suspect weights
        return None
    try:
        run.last_saved = save_checkpoint(run, epoch) or run.last_saved
    except RunFailed as e:
        return str(e)
    if run.is_main:
        progress.plot_loss(run.proj / "train_log.jsonl", run.proj / "loss.png", run.title)
    return None


def summarize(run: Run, failure: str | None) -> dict:
    """Fail the run (no rwkv-final.pth) if it did not train; else copy the last adapter to rwkv-final.pth,
    print the summary and the next commands, and return it."""
    cfg, proj = run.cfg, run.proj
    if run.bar is not None:
        run.bar.close()
        run.bar = None
    if failure is None and run.steps_run and not run.steps_trained:
        failure = (f"every one of the {run.steps_run} steps had a NaN/inf loss; "
                   + nonfinite_cause(run.model, cfg, run.params, 0))
    elif failure is None and run.bad_in_row:
        failure = (f"the last {run.bad_in_row} step(s) had NaN/inf loss; "
                   + nonfinite_cause(run.model, cfg, run.params, run.steps_trained))
    if failure is not None:
        if run.run_log is not None:
            run.run_log.close()
        kept = f"the last good checkpoint is {run.last_saved}" if run.last_saved else "no checkpoint was saved"
        raise RunFailed(f"{failure}; {kept}; no {FINAL_FILE} written")
    if run.is_main and run.last_saved is not None:
        if run.steps_run == 0:  # resumed after the last checkpoint: finish what the killed run did not
            progress.plot_loss(proj / "train_log.jsonl", proj / "loss.png", run.title)
            if run.evaluator is not None:
                progress.plot_eval(proj / "train_log.jsonl", proj / "eval.png", run.title)
        files.copy_file(run.last_saved, proj / FINAL_FILE)
    n_train, n_all = sum(p.numel() for p in run.params), sum(p.numel() for p in run.model.parameters())
    summary = {"trainable_params": n_train, "total_params": n_all, "tokens": run.tokens_seen, "steps": run.step,
               "skipped_steps": run.bad_total, "wall_s": round(time.time() - run.t_start, 1),
               "train_tok_s": round(run.tokens_seen / max(time.time() - run.t_loop, 1e-9), 1),
               "peak_mem_mb": round(progress.peak_memory_mb(run.device), 1),
               "adapter": str(run.last_saved) if run.last_saved else None, "model": run.model}
    if run.evaluator is not None:
        summary.update(best_step=run.evaluator.best_step, best_eval_loss=run.evaluator.best_loss)
    if run.is_main:
        print_summary(run, summary)
        run.run_log.close()
    return summary


def print_summary(run: Run, summary: dict) -> None:
    """Rank 0's closing lines: totals, where the adapter is, and the command to merge (or chat with) it."""
    cfg, proj, n_train, n_all = run.cfg, run.proj, summary["trainable_params"], summary["total_params"]
    run.say(f"done: trainable {progress.fmt_count(n_train)} / {progress.fmt_count(n_all)} params "
            f"({100 * n_train / n_all:.2f}%) | {progress.fmt_count(run.tokens_seen)} tokens in "
            f"{summary['wall_s']:.0f}s ({summary['train_tok_s']:.0f} tok/s) | peak memory "
            f"{summary['peak_mem_mb']:.0f} MiB"
            + (f" | {run.bad_total} NaN/inf steps skipped" if run.bad_total else ""))
    if run.last_saved is not None:
        run.say(f"adapter: {run.last_saved} (also {proj / FINAL_FILE}); log {proj / 'train_log.jsonl'}; "
                f"curve {proj / 'loss.png'}")
        if merge_command(cfg, proj):  # a learned start state has no weight to fold into
            run.say(f"merge:   {merge_command(cfg, proj)}")
        else:  # with no train_parts the adapter is a state file (RWKV-PEFT's format, RWKV-Runner/Ai00)
            only_state = all(n.endswith(".time_state") for n, p in run.model.named_parameters() if p.requires_grad)
            run.say(f"chat:    python -m rwkv_peft.generate --model {cfg.load_model} "
                    f"--{'state' if only_state else 'adapter'} {proj / 'rwkv-final.pth'} --chat")
    ev = run.evaluator
    if ev is not None and ev.best_step is not None:
        kept = f" (kept as {proj / BEST_FILE})" if cfg.save_best else ""
        run.say(f"eval:    best held-out loss {ev.best_loss:.4f} at step {ev.best_step}{kept}; "
                f"curve {proj / 'eval.png'}")


def grad_norm(engine) -> dict[str, float]:
    """The global gradient norm DeepSpeed computed for clipping at this step ({} when it has none)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return {}
    norm = float(norm)
    return {"grad_norm": norm} if math.isfinite(norm) else {}


def evaluate(run: Run) -> None:
    """Held-out loss and generations at this step (every rank), logged and plotted by rank 0; with
    --save_best the adapter is kept as rwkv-best.pth whenever the loss is the best so far."""
    ev, proj = run.evaluator, run.proj
    record = ev.run(run.objective, run.engine.module, run.step)
    if ev.improved and run.cfg.save_best:
        sd = gathered_trainable(run)
        if run.is_main:
            from rwkv_peft.model import write_state_dict

            write_state_dict(sd, proj / BEST_FILE)
    if not run.is_main:
        return
    run.run_log.log(record)
    progress.plot_eval(run.run_log.path, proj / "eval.png", run.title)
    best = " (best)" if ev.improved else f" (best {ev.best_loss:.4f} at step {ev.best_step})"
    run.say(f"eval step {run.step}: held-out loss {record['eval_loss']:.4f}{best}")
    for i, s in enumerate(record["eval_samples"]):
        run.say(f"  sample {i}: ...{s['prompt'][-60:]!r} -> {s['output'][:120]!r}")


def merge_command(cfg: TrainConfig, proj: Path) -> str:
    """The command that folds this run's adapter into its base (the short one for the demo's paths; '' if none)."""
    from rwkv_peft.peft.registry import get_method

    script = get_method(cfg.peft).merge_script
    if script is None:
        return ""
    if Path(cfg.load_model) == Path("out/demo/base.pth") and proj == Path("out/demo/miss"):
        return "sh scripts/merge_miss.sh"
    return (f"python merge/{script}.py --base_model {cfg.load_model} --peft_checkpoint {proj / 'rwkv-final.pth'} "
            f"--output {proj / 'merged.pth'}")


def nonfinite_cause(model: torch.nn.Module, cfg: TrainConfig, params: list, steps_trained: int) -> str:
    """Which input made the loss NaN/inf (the base was checked finite before training): the adapter, the
    run's divergence after finite steps, or from the first step on the data or the arithmetic."""
    names = {id(p): n for n, p in model.named_parameters()}
    bad = next((names[id(p)] for p in params if not torch.isfinite(p).all()), None)
    if bad is not None:
        return f"the adapter diverged ({bad} is NaN/inf): lower --lr_init (it is {cfg.lr_init:g})"
    if steps_trained:
        return (f"the loss was finite for {steps_trained} step(s), then NaN/inf: the run diverged; "
                f"lower --lr_init (it is {cfg.lr_init:g})")
    hint = "" if cfg.precision == "fp32" else f", or use --precision fp32 instead of {cfg.precision}"
    return f"NaN/inf from the first step with a finite base and adapter: check --data_file{hint}"


def gathered_trainable(run: Run) -> dict[str, torch.Tensor]:
    """The trainable tensors, whole on every rank (ZeRO-3 holds a slice per rank: gathered; collective)."""
    from rwkv_peft.peft import trainable_state_dict

    if run.engine.zero_optimization_partition_weights():
        import deepspeed

        with deepspeed.zero.GatheredParameters(run.params):
            return trainable_state_dict(run.model)
    return trainable_state_dict(run.model)


def save_checkpoint(run: Run, epoch: int) -> Path | None:
    """rwkv-<epoch>.pth (trainable tensors) and trainer_state.pt (optimizer per rank, RNG, position)."""
    import torch.distributed as dist

    from rwkv_peft.model import write_state_dict

    sd = gathered_trainable(run)
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    opt_state = optimizer_state(inner_optimizer(run.engine))
    rng = torch.get_rng_state()
    gathered_opt, gathered_rng = [None] * run.world, [None] * run.world
    dist.all_gather_object(gathered_opt, opt_state)
    dist.all_gather_object(gathered_rng, rng)
    if bad:
        raise RunFailed(f"epoch {epoch} not saved: the adapter diverged ({bad[0]} is NaN/inf): lower --lr_init")
    if not run.is_main:
        return None
    path = run.proj / f"rwkv-{epoch}.pth"
    write_state_dict(sd, path)
    with files.atomic_path(run.proj / STATE_FILE) as tmp, open(tmp, "wb") as f:
        torch.save({"epoch": epoch, "step": run.step, "adapter": path.name, "optimizer": gathered_opt,
                    "rng": gathered_rng}, f)
    return path


def main(argv: list[str] | None = None) -> dict:
    """CLI entry: bad input ends in one line on stderr (SystemExit), not a traceback."""
    try:
        return train(parse_args(argv))
    except (ValueError, OSError, RunFailed) as e:
        fail(e)

