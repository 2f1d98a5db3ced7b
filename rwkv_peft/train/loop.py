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
from contextlib import nullcontext
from pathlib import Path

import torch

from rwkv_peft import files
from rwkv_peft.train import progress
from rwkv_peft.train.config import ARCH_FLAGS, TrainConfig, parse_args
from rwkv_peft.train.ds_config import build_ds_config, check_supported
from rwkv_peft.train.infctx import masked_ce_sum
from rwkv_peft.train.loggers import RunLog, check_loggers
from rwkv_peft.train.schedule import lr_at

STATE_FILE = "trainer_state.pt"
BEST_FILE = "rwkv-best.pth"
FINAL_FILE = "rwkv-final.pth"


class RunFailed(Exception):
    """The run did not train (NaN/inf losses, a diverged adapter): exit non-zero, no rwkv-final.pth."""


class L2Wrap(torch.autograd.Function):
    """RWKV-LM's logit regulariser: identity on the loss; in backward it pushes each position's
    largest logit towards 0 with gradient 1e-4 * max / (B*T), which keeps logits from drifting up."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, logits: torch.Tensor, positions: int = 0) -> torch.Tensor:
        maxx, ids = logits.detach().max(-1, keepdim=True)
        ctx.save_for_backward(maxx, ids)
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        ctx.positions = positions or maxx.numel()  # infctx: the whole sample's count, not the chunk's
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        maxx, ids = ctx.saved_tensors
        gy = torch.zeros(ctx.shape, dtype=ctx.dtype, device=maxx.device)
        gy.scatter_(-1, ids, (maxx * (1e-4 / ctx.positions) * grad).to(ctx.dtype))
        return grad, gy, None


def masked_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions the data set marks for training (mask 1), with L2Wrap."""
    loss = masked_ce_sum(logits, targets, mask) / mask.sum().clamp(min=1)
    return L2Wrap.apply(loss, logits)


def infctx_masked_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_ctx: int) -> torch.Tensor:
    """``masked_loss`` of the whole sample, computed in chunks of ``chunk_ctx`` tokens (--train_type infctx):
    each chunk adds its share with whole-sample normalisers, so loss and gradients are the full-context ones."""
    from rwkv_peft.train.infctx import infctx_loss

    mask = batch["mask"]
    total, positions = mask.sum().clamp(min=1), mask.numel()

    def share(logits: torch.Tensor, targets: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return L2Wrap.apply(masked_ce_sum(logits, targets, m) / total, logits, positions)

    return infctx_loss(model, batch["input_ids"], batch["targets"], mask, chunk_ctx, share)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(on_gpu: bool) -> tuple[int, int, int]:
    """(rank, world_size, local_rank); a plain ``python`` run becomes a world of one."""
    if "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_gpu:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


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


def get_batch(ds, step_in_epoch: int, micro: int, cfg: TrainConfig, device: str) -> dict[str, torch.Tensor]:
    """Micro-batch ``micro`` of optimizer step ``step_in_epoch``: a pure function of the position, so
    resuming at a step reads exactly what the uninterrupted run read."""
    first = (step_in_epoch * cfg.accumulate_grad_batches + micro) * cfg.micro_bsz
    items = [ds[first + b] for b in range(cfg.micro_bsz)]
    return {k: torch.stack([it[k] for it in items]).to(device, non_blocking=True) for k in items[0]}


def train(cfg: TrainConfig, dataset=None) -> dict:
    """Run the whole job; returns the summary (with the trained ``model``). ``dataset`` overrides --data_file.

    Inputs and the output directory are checked before anything heavy; the process that writes (rank 0)
    holds ``--proj_dir``'s lock for the whole run and first removes temps left there by killed runs."""
    t_start = time.time()
    on_gpu = cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available())
    if on_gpu and not torch.cuda.is_available():
        raise ValueError(f"--accelerator {cfg.accelerator}: no CUDA device is available; use --accelerator cpu")
    check_supported(cfg, on_gpu)
    check_loggers(cfg)
    proj = Path(cfg.proj_dir)
    writer = int(os.environ.get("RANK", "0")) == 0
    if writer:
        files.check_writable_dir(proj, f"--proj_dir {proj}")
    base_sd, arch = check_architecture(cfg)
    with files.dir_lock(proj) if writer else nullcontext():
        if writer:
            files.note_removed(files.remove_stale_temps(proj))
        return _train_locked(cfg, dataset, base_sd, arch, on_gpu, t_start)


def _train_locked(cfg: TrainConfig, dataset, base_sd: dict, arch, on_gpu: bool, t_start: float) -> dict:
    from rwkv_peft.peft import adapter_config, apply_peft, load_adapter, parse_peft_config, trainable_state_dict

    peft_cfg = parse_peft_config(cfg.peft, cfg.peft_json)
    proj = Path(cfg.proj_dir)
    resume_state = latest_checkpoint(proj) if cfg.resume else None
    if cfg.resume and resume_state is None:
        print(f"note: --resume 1 but {proj / STATE_FILE} does not exist; starting fresh", file=sys.stderr)

    deepspeed = import_deepspeed(on_gpu)
    if "RANK" not in os.environ and cfg.devices * cfg.num_nodes > 1:
        raise ValueError(f"--devices {cfg.devices}: launch several processes with "
                         f"`torchrun --nproc_per_node {cfg.devices} -m rwkv_peft.train ...`")
    rank, world, local_rank = setup_distributed(on_gpu)
    device = f"cuda:{local_rank}" if on_gpu else "cpu"
    is_main = rank == 0
    say = (lambda *a: print(*a, flush=True)) if is_main else (lambda *a: None)

    torch.manual_seed(cfg.random_seed + rank)
    steps_total = cfg.epoch_steps * cfg.epoch_count
    samples_per_epoch = cfg.epoch_steps * cfg.accumulate_grad_batches * cfg.micro_bsz
    if dataset is None:
        from rwkv_peft.data import build_dataset

        dataset = build_dataset(cfg.data_file, cfg.data_type, cfg.dataload, cfg.ctx_len, arch.vocab_size,
                                samples_per_epoch, cfg.random_seed, rank=rank, world_size=world,
                                tokenizer=cfg.tokenizer, sft_field=cfg.sft_field,
                                sft_template=cfg.sft_template or None, magic_prime=cfg.magic_prime,
                                chat_template=cfg.chat_template or None, too_long=cfg.too_long,
                                strict=bool(cfg.strict))
    evaluator = None
    if cfg.eval_data:
        from rwkv_peft.train.evaluation import Evaluator

        evaluator = Evaluator(cfg, arch.vocab_size)
        if is_main:
            print(f"eval data: {evaluator.summary}", file=sys.stderr)

    from rwkv_peft.model import load_model

    model = load_model(base_sd, device=device, dtype=torch.float32, op=cfg.op)
    del base_sd
    report = apply_peft(model, cfg.peft, peft_cfg)
    if cfg.quant != "none":
        from rwkv_peft.quant import quantize_base

        report += " | " + quantize_base(model, cfg.quant)
    model.grad_cp = bool(cfg.grad_cp)
    start_epoch, step = cfg.epoch_begin, 0
    if resume_state is not None:
        adapter = proj / str(resume_state["adapter"])
        load_adapter(model, adapter)
        start_epoch, step = int(resume_state["epoch"]) + 1, int(resume_state["step"])
        say(f"resuming from {adapter}: epoch {start_epoch}, step {step}")
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"--peft {cfg.peft}: nothing to train (no trainable parameters)")
    n_train, n_all = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(cfg, params, on_gpu)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params,
                                           config=build_ds_config(cfg, world))
    if resume_state is not None:
        load_optimizer_state(inner_optimizer(engine), resume_state["optimizer"][rank], proj / STATE_FILE)
        torch.set_rng_state(resume_state["rng"][rank])

    arch_line = (f"RWKV {model.version} L{arch.n_layer} D{arch.n_embd} vocab {arch.vocab_size} "
                 f"head {arch.head_size} ffn {arch.dim_ffn}")
    effective = {**cfg.to_dict(), "world_size": world, "device": device, "architecture": arch_line}
    tokens_per_step = cfg.ctx_len * cfg.micro_bsz * cfg.accumulate_grad_batches * world
    if is_main:
        proj.mkdir(parents=True, exist_ok=True)
        say(f"config: {json.dumps(effective)}")
        say(f"model: {arch_line} | {report}")
        say(f"training: {steps_total} steps x {tokens_per_step} tokens ({world} process(es), "
            f"{cfg.strategy}, {cfg.precision}, {device})")
        files.write_text(proj / "adapter_config.json",
                         json.dumps(adapter_config(model, cfg.peft, peft_cfg), indent=2) + "\n")
        files.write_text(proj / "train_config.json", json.dumps(effective, indent=2) + "\n")
        progress.truncate_log(proj / "train_log.jsonl", step if resume_state else -1)
        if (proj / FINAL_FILE).is_file() and step < steps_total:  # an earlier run's; this one may fail
            (proj / FINAL_FILE).unlink()
            say(f"note: removed {proj / FINAL_FILE} of an earlier run; this run writes its own when it completes")
    run_log = RunLog(cfg, proj, effective) if is_main else None
    if evaluator is not None and resume_state is not None:
        evaluator.remember(progress.read_log(proj / "train_log.jsonl") if is_main else [])

    import torch.distributed as dist

    bar = None
    if is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=steps_total, initial=step, unit="step", dynamic_ncols=True, file=sys.stdout)
    note = bar.write if bar is not None else say
    if evaluator is not None and step == 0:
        evaluate(evaluator, engine, model, step, cfg, proj, run_log, note)
    bad_in_row, bad_total, steps_run, steps_trained, tokens_seen, t_loop = 0, 0, 0, 0, 0, time.time()
    last_saved = proj / str(resume_state["adapter"]) if resume_state is not None else None
    failure = None
    for epoch in range(start_epoch, cfg.epoch_begin + cfg.epoch_count):
        dataset.set_epoch(epoch)
        first_step = step - (epoch - cfg.epoch_begin) * cfg.epoch_steps
        for j in range(first_step, cfg.epoch_steps):
            lr = lr_at(step, steps_total, cfg.lr_init, cfg.lr_final, cfg.warmup_steps, cfg.lr_schedule,
                       cfg.wsd_decay)
            for group in inner_optimizer(engine).param_groups:
                group["lr"] = lr
            t0, losses, bad_micro = time.time(), [], 0
            for micro in range(cfg.accumulate_grad_batches):
                batch = get_batch(dataset, j, micro, cfg, device)
                if cfg.train_type == "infctx":
                    loss = infctx_masked_loss(engine.module, batch, cfg.chunk_ctx)
                else:
                    loss = masked_loss(engine(batch["input_ids"]), batch["targets"], batch["mask"])
                bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0])
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank skips together
                if bad.item():
                    bad_micro += 1
                    if cfg.accumulate_grad_batches == 1:
                        break
                    loss = sum((p * 0).sum() for p in params)  # contributes nothing, keeps counters aligned
                else:
                    losses.append(loss.detach().float())
                engine.backward(loss)
                engine.step()  # steps the optimizer at the accumulation boundary only
            steps_run += 1
            if bad_micro:
                bad_in_row, bad_total = bad_in_row + 1, bad_total + 1
                if bad_in_row >= cfg.max_bad_steps:
                    failure = (f"stopped at step {step}: {bad_in_row} steps in a row with NaN/inf loss; "
                               + nonfinite_cause(model, cfg, params, steps_trained))
                    break
                if not losses:
                    step += 1
                    continue
            else:
                bad_in_row = 0
            steps_trained += 1
            loss_val = torch.stack(losses).mean()
            dist.all_reduce(loss_val)
            loss_val = loss_val.item() / world
            tokens_seen += tokens_per_step
            dt = time.time() - t0
            record = {"step": step + 1, "epoch": epoch, "loss": loss_val, "lr": lr,
                      "tokens": (step + 1) * tokens_per_step, "tok_s": tokens_per_step / max(dt, 1e-9),
                      **grad_norm(engine)}
            step += 1
            if is_main:
                run_log.log(record)
                shown = {} if evaluator is None or evaluator.best_step is None else {
                    "eval": f"{evaluator.best_loss:.4f}@{evaluator.best_step}"}
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}",
                                    tok_s=f"{tokens_seen / (time.time() - t_loop):.0f}", **shown, refresh=False)
                    bar.update(1)
                elif step % 10 == 0 or step == steps_total:
                    say(f"step {step}/{steps_total} loss {loss_val:.4f} lr {lr:.2e} tok/s {record['tok_s']:.0f}"
                        + (f" best eval {shown['eval']}" if shown else ""))
            if evaluator is not None and evaluator.due(step, steps_total):
                evaluate(evaluator, engine, model, step, cfg, proj, run_log, note)
        if failure:
            break
        last = epoch == cfg.epoch_begin + cfg.epoch_count - 1
        if ((epoch + 1 - cfg.epoch_begin) % cfg.epoch_save == 0 or last) and bad_in_row:
            say(f"note: epoch {epoch} not saved: its last step had a NaN/inf loss")  # suspect weights
        elif (epoch + 1 - cfg.epoch_begin) % cfg.epoch_save == 0 or last:
            try:
                last_saved = save_checkpoint(engine, model, proj, epoch, step, is_main, world,
                                             trainable_state_dict) or last_saved
            except RunFailed as e:
                failure = str(e)
                break
            if is_main:
                progress.plot_loss(proj / "train_log.jsonl", proj / "loss.png",
                                   f"{cfg.peft} on {Path(cfg.load_model).name}")
    if bar is not None:
        bar.close()
    if failure is None and steps_run and not steps_trained:
        failure = f"every one of the {steps_run} steps had a NaN/inf loss; " + nonfinite_cause(model, cfg, params, 0)
    elif failure is None and bad_in_row:
        failure = (f"the last {bad_in_row} step(s) had NaN/inf loss; "
                   + nonfinite_cause(model, cfg, params, steps_trained))
    if failure is not None:
        if run_log is not None:
            run_log.close()
        kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved"
        raise RunFailed(f"{failure}; {kept}; no {FINAL_FILE} written")
    if is_main and last_saved is not None:
        if steps_run == 0:  # resumed after the last checkpoint: finish what the killed run did not
            title = f"{cfg.peft} on {Path(cfg.load_model).name}"
            progress.plot_loss(proj / "train_log.jsonl", proj / "loss.png", title)
            if evaluator is not None:
                progress.plot_eval(proj / "train_log.jsonl", proj / "eval.png", title)
        files.copy_file(last_saved, proj / FINAL_FILE)
    wall = time.time() - t_start
    summary = {"trainable_params": n_train, "total_params": n_all, "tokens": tokens_seen, "steps": step,
               "skipped_steps": bad_total, "wall_s": round(wall, 1),
               "train_tok_s": round(tokens_seen / max(time.time() - t_loop, 1e-9), 1),
               "peak_mem_mb": round(progress.peak_memory_mb(device), 1),
               "adapter": str(last_saved) if last_saved else None, "model": model}
    if evaluator is not None:
        summary.update(best_step=evaluator.best_step, best_eval_loss=evaluator.best_loss)
    if is_main:
        say(f"done: trainable {progress.fmt_count(n_train)} / {progress.fmt_count(n_all)} params "
            f"({100 * n_train / n_all:.2f}%) | {progress.fmt_count(tokens_seen)} tokens in {wall:.0f}s "
            f"({summary['train_tok_s']:.0f} tok/s) | peak memory {summary['peak_mem_mb']:.0f} MiB"
            + (f" | {bad_total} NaN/inf steps skipped" if bad_total else ""))
        if last_saved is not None:
            say(f"adapter: {last_saved} (also {proj / FINAL_FILE}); log {proj / 'train_log.jsonl'}; "
                f"curve {proj / 'loss.png'}")
            if merge_command(cfg, proj):  # a learned start state has no weight to fold into
                say(f"merge:   {merge_command(cfg, proj)}")
            else:  # with no train_parts the adapter is a state file (RWKV-PEFT's format, RWKV-Runner/Ai00)
                only_state = all(n.endswith(".time_state") for n, p in model.named_parameters() if p.requires_grad)
                say(f"chat:    python -m rwkv_peft.generate --model {cfg.load_model} "
                    f"--{'state' if only_state else 'adapter'} {proj / 'rwkv-final.pth'} --chat")
        if evaluator is not None and evaluator.best_step is not None:
            kept = f" (kept as {proj / BEST_FILE})" if cfg.save_best else ""
            say(f"eval:    best held-out loss {evaluator.best_loss:.4f} at step {evaluator.best_step}{kept}; "
                f"curve {proj / 'eval.png'}")
        run_log.close()
    return summary


def grad_norm(engine) -> dict[str, float]:
    """The global gradient norm DeepSpeed computed for clipping at this step ({} when it has none)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return {}
    norm = float(norm)
    return {"grad_norm": norm} if math.isfinite(norm) else {}


def evaluate(evaluator, engine, model, step: int, cfg: TrainConfig, proj: Path, run_log: RunLog | None,
             note) -> None:
    """Held-out loss and generations at ``step`` (every rank), logged and plotted by rank 0; with
    --save_best the adapter is kept as rwkv-best.pth whenever the loss is the best so far."""
    from rwkv_peft.peft import trainable_state_dict

    record = evaluator.run(engine.module, step)
    if evaluator.improved and cfg.save_best:
        sd = gathered_trainable(engine, model, trainable_state_dict)
        if run_log is not None:
            from rwkv_peft.model import write_state_dict

            write_state_dict(sd, proj / BEST_FILE)
    if run_log is None:
        return
    run_log.log(record)
    progress.plot_eval(run_log.path, proj / "eval.png", f"{cfg.peft} on {Path(cfg.load_model).name}")
    best = " (best)" if evaluator.improved else f" (best {evaluator.best_loss:.4f} at step {evaluator.best_step})"
    note(f"eval step {step}: held-out loss {record['eval_loss']:.4f}{best}")
    for i, s in enumerate(record["eval_samples"]):
        note(f"  sample {i}: ...{s['prompt'][-60:]!r} -> {s['output'][:120]!r}")


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


def gathered_trainable(engine, model, trainable_state_dict) -> dict[str, torch.Tensor]:
    """The trainable tensors, whole on every rank (ZeRO-3 holds a slice per rank: gathered; collective)."""
    if engine.zero_optimization_partition_weights():
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad]):
            return trainable_state_dict(model)
    return trainable_state_dict(model)


def save_checkpoint(engine, model, proj: Path, epoch: int, step: int, is_main: bool, world: int,
                    trainable_state_dict) -> Path | None:
    """rwkv-<epoch>.pth (trainable tensors) and trainer_state.pt (optimizer per rank, RNG, position)."""
    import torch.distributed as dist

    sd = gathered_trainable(engine, model, trainable_state_dict)
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    opt_state = optimizer_state(inner_optimizer(engine))
    rng = torch.get_rng_state()
    gathered_opt, gathered_rng = [None] * world, [None] * world
    dist.all_gather_object(gathered_opt, opt_state)
    dist.all_gather_object(gathered_rng, rng)
    if bad:
        raise RunFailed(f"epoch {epoch} not saved: the adapter diverged ({bad[0]} is NaN/inf): lower --lr_init")
    if not is_main:
        return None
    path = proj / f"rwkv-{epoch}.pth"
    from rwkv_peft.model import write_state_dict

    write_state_dict(sd, path)
    with files.atomic_path(proj / STATE_FILE) as tmp, open(tmp, "wb") as f:
        torch.save({"epoch": epoch, "step": step, "adapter": path.name, "optimizer": gathered_opt,
                    "rng": gathered_rng}, f)
    return path


def main(argv: list[str] | None = None) -> dict:
    """CLI entry: bad input ends in one line on stderr (SystemExit), not a traceback."""
    try:
        return train(parse_args(argv))
    except (ValueError, OSError, RunFailed) as e:
        raise SystemExit(f"error: {files.describe(e)}") from None

