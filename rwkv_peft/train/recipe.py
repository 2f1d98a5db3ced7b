"""The training recipe, read first: ``train()`` checks the job, builds the run (data, model, engine,
objective), trains it epoch by epoch, and closes it. An epoch is steps; a step is micro-batches, each
handed to the ``--objective`` (``objectives/``) for a loss, then DeepSpeed's backward and step.

Where the machinery lives: ``engine.py`` (process group, DeepSpeed, optimizer), ``checkpoints.py``
(save, resume, best, final), ``heldout.py`` (held-out evaluation), ``loggers.py`` / ``plots.py`` (the
log and its pictures), ``report.py`` (the closing lines), ``config.py`` (flags).
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from rwkv_peft import files
from rwkv_peft.cli import fail
from rwkv_peft.data import build_dataset, get_data_type
from rwkv_peft.model import RWKVConfig, config_from_state_dict, load_model, read_state_dict
from rwkv_peft.model.checkpoint import first_nonfinite
from rwkv_peft.peft import adapter_config, apply_peft, load_adapter, parse_peft_config
from rwkv_peft.quant import quantize_base
from rwkv_peft.train import checkpoints, engine, plots, settings
from rwkv_peft.train.checkpoints import RunFailed
from rwkv_peft.train.config import ARCH_FLAGS, TrainConfig, parse_args
from rwkv_peft.train.heldout import HeldOut
from rwkv_peft.train.loggers import RunLog, check_loggers, read_log, truncate_log
from rwkv_peft.train.objectives import Context, Objective, get_objective, objective_options
from rwkv_peft.train.report import closing_lines, nonfinite_cause, peak_memory_mb
from rwkv_peft.train.schedule import lr_at


@dataclass
class Run:
    """What the recipe's steps share: the job and this process's place in it, what setup built, and the
    counters the loop keeps."""

    cfg: TrainConfig
    proj: Path
    on_gpu: bool
    t_start: float
    rank: int = 0
    world: int = 1
    device: str = "cpu"
    arch: RWKVConfig | None = None
    dataset: Dataset | None = None  # indexable by sample, with set_epoch
    heldout: HeldOut | None = None
    model: nn.Module | None = None
    engine: Any = None  # DeepSpeed's engine (imported only once the accelerator is known)
    objective: Objective | None = None
    params: list = field(default_factory=list)
    resume: dict | None = None
    settings: dict = field(default_factory=dict)  # what decides the result; saved with each checkpoint
    resume_changes: list[str] = field(default_factory=list)  # --resume_changes allow: what differs
    start_epoch: int = 0
    step: int = 0
    run_log: RunLog | None = None
    bar: tqdm | None = None
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
    t_start, proj = time.time(), Path(cfg.proj_dir)
    on_gpu = engine.check_device(cfg)
    check_loggers(cfg)
    writer = int(os.environ.get("RANK", "0")) == 0
    if writer:
        checkpoints.check_outputs(cfg, proj)
    base_sd, arch = check_architecture(cfg)
    with files.dir_lock(proj) if writer else nullcontext():
        if writer:
            files.note_removed(files.remove_stale_temps(proj))
        peft_cfg = parse_peft_config(cfg.peft, cfg.peft_json)
        deepspeed = engine.import_deepspeed(on_gpu)
        with engine.process_group(cfg, on_gpu, deepspeed) as (rank, world, local_rank):
            run = Run(cfg, proj, on_gpu, t_start, rank, world, f"cuda:{local_rank}" if on_gpu else "cpu", arch)
            setup_resume(run)
            setup_data(run, dataset)
            report = setup_model(run, base_sd, peft_cfg)
            del base_sd
            setup_engine(run, deepspeed)
            start_log(run, report, peft_cfg)
            failure = train_epochs(run)
            return summarize(run, failure, peft_cfg.train_parts)


def check_architecture(cfg: TrainConfig):
    """Read the checkpoint (CRC-checked, memory-mapped), refuse flags that contradict its architecture
    and a base holding NaN/inf (it could only train into NaN steps)."""
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


def setup_resume(run: Run) -> None:
    """What decides this run's result, and with --resume 1 the interrupted run's trainer state, refused when
    its settings differ (unless --resume_changes allow, which records what differs)."""
    cfg = run.cfg
    run.resume, run.settings = checkpoints.find_resume(cfg, run.proj), settings.snapshot(cfg, run.world)
    run.resume_changes = settings.check_resume(run.resume, run.settings, cfg.resume_changes,
                                               run.proj / checkpoints.STATE_FILE)


def setup_data(run: Run, dataset) -> None:
    """The training set (``dataset``, or --data_file read for this rank) and the held-out set."""
    cfg = run.cfg
    torch.manual_seed(cfg.random_seed + run.rank)
    if dataset is None:
        samples_per_epoch = cfg.epoch_steps * cfg.accumulate_grad_batches * cfg.micro_bsz
        dataset = build_dataset(cfg.data_file, cfg.data_type, cfg.dataload, cfg.ctx_len, run.arch.vocab_size,
                                samples_per_epoch, cfg.random_seed, rank=run.rank, world_size=run.world,
                                tokenizer=cfg.tokenizer, sft_field=cfg.sft_field,
                                sft_template=cfg.sft_template or None, magic_prime=cfg.magic_prime,
                                chat_template=cfg.chat_template or None, too_long=cfg.too_long,
                                strict=bool(cfg.strict))
    run.dataset = dataset
    if cfg.eval_data:
        run.heldout = HeldOut(cfg, run.arch.vocab_size)
        if run.is_main:
            print(f"eval data: {run.heldout.summary}", file=sys.stderr)


def setup_model(run: Run, base_sd: dict, peft_cfg) -> str:
    """The fp32 base with the method applied (and quantised, and resumed); returns the parameter report."""
    cfg = run.cfg
    model = load_model(base_sd, device=run.device, dtype=torch.float32, op=cfg.op)
    report = apply_peft(model, cfg.peft, peft_cfg)
    if cfg.quant != "none":
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
    cfg = run.cfg
    run.engine = engine.build_engine(deepspeed, cfg, run.model, run.params, run.on_gpu, run.world)
    options = objective_options(cfg.objective, cfg.objective_options)
    context = Context(run.engine, run.engine.module, cfg, options, run.device, run.rank, run.world)
    run.objective = get_objective(cfg.objective).build(context)
    if run.resume is not None:
        checkpoints.restore(run.engine, run.resume, run.rank, run.proj)


def start_log(run: Run, report: str, peft_cfg) -> None:
    """Rank 0 announces the run and writes its configs and log; the progress bar; the step-0 evaluation."""
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
        truncate_log(proj / "train_log.jsonl", run.step if run.resume else -1)
        if run.step < run.steps_total and checkpoints.forget_final(proj):  # an earlier run's; this one may fail
            run.say(f"note: removed {proj / checkpoints.FINAL_FILE} of an earlier run; this run writes its own "
                    "when it completes")
        run.run_log = RunLog(cfg, proj, effective)
        if run.resume_changes:  # --resume_changes allow: the result is not the uninterrupted run's
            run.say(f"note: resumed with changed settings: {'; '.join(run.resume_changes)}")
            run.run_log.log({"step": run.step, "resume_changes": run.resume_changes})
    if run.heldout is not None and run.resume is not None:
        run.heldout.remember(read_log(proj / "train_log.jsonl") if run.is_main else [])
    if run.is_main and cfg.progress:
        run.bar = tqdm(total=run.steps_total, initial=run.step, unit="step", dynamic_ncols=True, file=sys.stdout)
    if run.heldout is not None and run.step == 0:
        evaluate_heldout(run)
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
        metrics, bad_micro = train_step(run, j, lr)
        run.steps_run += 1
        if bad_micro:
            run.bad_in_row, run.bad_total = run.bad_in_row + 1, run.bad_total + 1
            if run.bad_in_row >= cfg.max_bad_steps:
                return (f"stopped at step {run.step}: {run.bad_in_row} steps in a row with NaN/inf loss; "
                        + nonfinite_cause(run.model, cfg, run.params, run.steps_trained))
            if not metrics:
                run.step += 1
                continue
        else:
            run.bad_in_row = 0
        log_step(run, epoch, metrics, lr, time.time() - t0)
        if run.heldout is not None and run.heldout.due(run.step, run.steps_total):
            evaluate_heldout(run)
    return None


def get_batch(ds, step_in_epoch: int, micro: int, cfg: TrainConfig, device: str) -> dict:
    """Micro-batch ``micro`` of optimizer step ``step_in_epoch``: a pure function of the position, so
    resuming at a step reads exactly what the uninterrupted run read. The data type's ``collate`` batches
    the items; its tensors go to the device."""
    first = (step_in_epoch * cfg.accumulate_grad_batches + micro) * cfg.micro_bsz
    batch = get_data_type(cfg.data_type).collate([ds[first + b] for b in range(cfg.micro_bsz)])
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(run: Run, j: int, lr: float) -> tuple[list[dict[str, torch.Tensor]], int]:
    """Optimizer step ``j`` of the epoch over its micro-batches; returns (the finite micro-batches' loss and
    metrics, NaN/inf micro-batches).

    A NaN/inf micro-batch is skipped on every rank together: it backpropagates zero, which keeps
    DeepSpeed's accumulation counters aligned."""
    cfg = run.cfg
    engine.set_lr(run.engine, lr)
    finite, bad_micro = [], 0
    for micro in range(cfg.accumulate_grad_batches):
        loss, metrics = run.objective.loss(get_batch(run.dataset, j, micro, cfg, run.device))
        if engine.any_rank(not torch.isfinite(loss), run.device):  # every rank skips together
            bad_micro += 1
            if cfg.accumulate_grad_batches == 1:
                break
            loss = sum((p * 0).sum() for p in run.params)  # contributes nothing, keeps counters aligned
        else:
            finite.append({"loss": loss.detach().float(), **{k: torch.as_tensor(v, dtype=torch.float32).detach()
                                                              for k, v in metrics.items()}})
        run.engine.backward(loss)
        run.engine.step()  # steps the optimizer at the accumulation boundary only
    return finite, bad_micro


def log_step(run: Run, epoch: int, finite: list[dict[str, torch.Tensor]], lr: float, dt: float) -> None:
    """Count a trained step; rank 0 logs the loss and the objective's metrics averaged over micro-batches and
    ranks, and shows progress."""
    run.steps_trained += 1
    metrics = engine.rank_mean({k: torch.stack([m[k] for m in finite]).mean() for k in finite[0]}, run.device)
    run.tokens_seen += run.tokens_per_step
    run.step += 1
    record = {"step": run.step, "epoch": epoch, **metrics, "lr": lr, "tokens": run.step * run.tokens_per_step,
              "tok_s": run.tokens_per_step / max(dt, 1e-9), **engine.grad_norm(run.engine)}
    if not run.is_main:
        return
    run.run_log.log(record)
    shown = {k: f"{v:.4f}" for k, v in metrics.items()}
    if run.heldout is not None and run.heldout.best_step is not None:
        shown["eval"] = f"{run.heldout.best_loss:.4f}@{run.heldout.best_step}"
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
        saved = checkpoints.save_epoch(run.engine, run.model, run.params, run.proj, epoch, run.step, run.settings)
    except RunFailed as e:
        return str(e)
    run.last_saved = saved or run.last_saved
    if saved is not None:
        checkpoints.write_peft_folder(cfg.peft_folder, saved)
    if run.is_main:
        plots.plot_loss(run.proj / "train_log.jsonl", run.proj / "loss.png", run.title)
    return None


def evaluate_heldout(run: Run) -> None:
    """Held-out metrics and generations at this step (every rank), logged and plotted by rank 0; with
    --save_best the adapter is kept as rwkv-best.pth whenever the loss is the best so far."""
    ho, proj = run.heldout, run.proj
    record = ho.run(run.objective, run.engine.module, run.step)
    if ho.improved and run.cfg.save_best:
        checkpoints.save_best(run.engine, run.model, run.params, proj)
    if not run.is_main:
        return
    run.run_log.log(record)
    plots.plot_eval(run.run_log.path, proj / "eval.png", run.title)
    best = " (best)" if ho.improved else f" (best {ho.best_loss:.4f} at step {ho.best_step})"
    others = "".join(f", {k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("eval_")
                     and k not in ("eval_loss", "eval_samples"))
    run.say(f"eval step {run.step}: held-out loss {record['eval_loss']:.4f}{best}{others}")
    for i, s in enumerate(record["eval_samples"]):
        run.say(f"  sample {i}: ...{s['prompt'][-60:]!r} -> {s['output'][:120]!r}")


def summarize(run: Run, failure: str | None, train_parts: tuple[str, ...]) -> dict:
    """Fail the run (no rwkv-final.pth) if it did not train; else copy the last adapter to rwkv-final.pth,
    print the summary and the next commands, and return it."""
    cfg, proj = run.cfg, run.proj
    if run.bar is not None:
        run.bar.close()
        run.bar = None
    if failure is None and run.steps_run and not run.steps_trained:
        failure = f"every one of the {run.steps_run} steps had a NaN/inf loss; " + nonfinite_cause(
            run.model, cfg, run.params, 0)
    elif failure is None and run.bad_in_row:
        failure = f"the last {run.bad_in_row} step(s) had NaN/inf loss; " + nonfinite_cause(
            run.model, cfg, run.params, run.steps_trained)
    if failure is not None:
        if run.run_log is not None:
            run.run_log.close()
        kept = f"the last good checkpoint is {run.last_saved}" if run.last_saved else "no checkpoint was saved"
        raise RunFailed(f"{failure}; {kept}; no {checkpoints.FINAL_FILE} written")
    if run.is_main and run.last_saved is not None:
        if run.steps_run == 0:  # resumed after the last checkpoint: finish what the killed run did not
            plots.plot_loss(proj / "train_log.jsonl", proj / "loss.png", run.title)
            if run.heldout is not None:
                plots.plot_eval(proj / "train_log.jsonl", proj / "eval.png", run.title)
        checkpoints.write_peft_folder(run.cfg.peft_folder, checkpoints.write_final(run.last_saved, proj))
    # ZeRO-3 leaves each rank a slice of every parameter (possibly empty); ds_numel is the whole one's size
    summary = {"trainable_params": sum(getattr(p, "ds_numel", p.numel()) for p in run.params),
               "total_params": sum(getattr(p, "ds_numel", p.numel()) for p in run.model.parameters()),
               "tokens": run.tokens_seen,
               "steps": run.step, "skipped_steps": run.bad_total, "wall_s": round(time.time() - run.t_start, 1),
               "train_tok_s": round(run.tokens_seen / max(time.time() - run.t_loop, 1e-9), 1),
               "peak_mem_mb": round(peak_memory_mb(run.device), 1),
               "adapter": str(run.last_saved) if run.last_saved else None, "model": run.model}
    if run.heldout is not None:
        summary.update(best_step=run.heldout.best_step, best_eval_loss=run.heldout.best_loss)
    if run.resume_changes:
        summary["resume_changes"] = run.resume_changes
    if run.is_main:
        for line in closing_lines(cfg, proj, summary, train_parts):
            run.say(line)
        run.run_log.close()
    return summary


def main(argv: list[str] | None = None) -> dict:
    """CLI entry: bad input ends in one line on stderr (SystemExit), not a traceback."""
    try:
        return train(parse_args(argv))
    except (ValueError, OSError, RunFailed) as e:
        fail(e)
