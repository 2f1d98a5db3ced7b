"""The trainer's flags (RWKV-PEFT / RWKV-LM names) parsed into one typed config, checked before heavy work."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from rwkv_peft.cli import ArgumentParser
from rwkv_peft.data import DATA_TYPES, DataOptions, get_data_type
from rwkv_peft.export.hf import is_hf_folder
from rwkv_peft.ops import OPS
from rwkv_peft.peft.registry import METHODS, get_method
from rwkv_peft.precision import PRECISIONS
from rwkv_peft.train.objectives import OBJECTIVES, add_objective_flags, get_objective, objective_options

STRATEGIES = ("deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3",
              "deepspeed_stage_2_offload", "deepspeed_stage_3_offload")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
ARCH_FLAGS = ("n_layer", "n_embd", "vocab_size", "head_size", "dim_ffn")
# flags that take one of a few words, in the order check_config checks them
CHOICES = {"strategy": STRATEGIES, "precision": PRECISIONS, "accelerator": ACCELERATORS,
           "lr_schedule": ("cos", "wsd", "const"), "train_type": ("", "infctx"), "quant": ("none", "int8", "nf4"),
           "too_long": ("truncate", "drop"), "peft_folder": ("", "blinkdl", "hf"),
           "resume_changes": ("refuse", "allow")}


@dataclass
class TrainConfig:
    load_model: str = ""
    proj_dir: str = "out"
    data_file: str = ""
    data_type: str = "binidx"
    objective: str = "lm"
    dataload: str = "get"
    tokenizer: str = "world"
    sft_field: tuple[str, str] = ("question", "answer")
    sft_template: str = ""
    chat_template: str = ""
    too_long: str = "truncate"
    magic_prime: int = 0
    strict: int = 0
    ctx_len: int = 512
    micro_bsz: int = 1
    epoch_steps: int = 100
    epoch_count: int = 1
    epoch_begin: int = 0
    epoch_save: int = 1
    lr_init: float = 1e-4
    lr_final: float = 1e-5
    lr_schedule: str = "cos"
    warmup_steps: int = 0
    wsd_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_cp: int = 0
    accumulate_grad_batches: int = 1
    strategy: str = "deepspeed_stage_1"
    precision: str = "auto"
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    random_seed: int = 42
    peft: str = "miss"
    miss_config: str = ""
    lora_config: str = ""
    peft_config: str = ""
    train_parts: str = ""
    op: str = "auto"
    train_type: str = ""
    chunk_ctx: int = 512
    head_chunk: int = -1
    quant: str = "none"
    resume: int = 0
    resume_changes: str = "refuse"
    wandb: str = ""
    tensorboard: str = ""
    eval_data: str = ""
    eval_every: int = 0
    eval_samples: int = 2
    eval_max_tokens: int = 64
    save_best: int = 0
    max_bad_steps: int = 20
    progress: int = 1
    peft_folder: str = ""
    n_layer: int = 0
    n_embd: int = 0
    vocab_size: int = 0
    head_size: int = 0
    dim_ffn: int = 0
    objective_options: dict[str, Any] = field(default_factory=dict)  # the --objective's own flags

    @property
    def zero_stage(self) -> int:
        return int(self.strategy.split("_")[2])

    @property
    def offload(self) -> bool:
        return self.strategy.endswith("_offload")

    @property
    def peft_json(self) -> str:
        """The JSON text of the flag that configures ``--peft`` (plus --train_parts when given)."""
        flag = get_method(self.peft).flag
        text = getattr(self, flag.removeprefix("--"))
        if not self.train_parts:
            return text
        try:
            obj = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{flag}: not valid JSON ({e.msg}): {text!r}") from None
        obj["train_parts"] = [p for p in self.train_parts.replace(",", " ").split() if p]
        return json.dumps(obj)

    def to_dict(self) -> dict:
        return asdict(self)

    def data_options(self, vocab_size: int) -> DataOptions:
        """How the data files of this run are read."""
        return DataOptions(self.ctx_len, vocab_size, self.tokenizer, tuple(self.sft_field), self.sft_template or None,
                           self.chat_template or None, self.too_long, bool(self.strict))


def _flag_users(flag: str) -> str:
    """The methods configured by ``flag``, e.g. lora|pissa|dora for --lora_config."""
    return "|".join(name for name, m in METHODS.items() if m.flag == flag)


def _helps() -> dict[str, str]:
    """Each flag's help; the choices of --peft, --data_type and --objective come from their registries (read
    when the parser is built, so plug-ins registered before it are listed)."""
    return {
        "load_model": "base RWKV checkpoint (.pth/.safetensors); architecture is read from it",
        "proj_dir": "output dir: rwkv-<epoch>.pth, adapter_config.json, train_log.jsonl, loss.png",
        "data_type": " | ".join(f"{n}: {t.help}" for n, t in DATA_TYPES.items()),
        "objective": " | ".join(f"{n}: {o.help}" for n, o in OBJECTIVES.items()),
        "dataload": "get (random windows) | pad (one document per sample)",
        "chat_template": "JSON file overriding the RWKV chat template (keys system, user, assistant, "
                         "separator, separator_in_content)",
        "too_long": "chat with --dataload pad: truncate | drop conversations longer than ctx_len+1 tokens",
        "sft_field": "two jsonl field names: prompt response",
        "strict": "1: a malformed jsonl line is an error (file:line); 0: skipped and counted in the data summary",
        "epoch_steps": "optimizer steps per 'epoch' (RWKV-LM's mini-epoch)",
        "lr_schedule": "cos (warmup, cosine lr_init->lr_final) | wsd (warmup, stable, decay) | const",
        "wsd_decay": "fraction of the run spent decaying with --lr_schedule wsd",
        "grad_cp": "1: per-block gradient checkpointing (less memory, ~30%% slower)",
        "strategy": "|".join(STRATEGIES),
        "precision": "auto (bf16 where the CPU/GPU computes it natively: avx512_bf16/AMX, compute capability "
                     ">= 8.0; else fp32) | fp32 | bf16 (fp32 master weights, optimizer state and gradient sums) "
                     "| fp16 (GPU)",
        "accelerator": "auto (gpu if CUDA is available) | cpu | gpu",
        "devices": "processes per node; launch with torchrun/deepspeed for > 1",
        "peft": " | ".join(METHODS),
        "miss_config": f'JSON for --peft {_flag_users("--miss_config")}, e.g. {{"r":64,"mode":"balance"}}',
        "lora_config": f'JSON for --peft {_flag_users("--lora_config")}, e.g. {{"r":32,"alpha":32}}',
        "peft_config": f"JSON for --peft {_flag_users('--peft_config')}",
        "train_parts": "extra trainable groups, comma separated: emb,head,ln,time,deepembed",
        "op": f"WKV kernel: {' | '.join(OPS)}",
        "train_type": "'' (the whole ctx_len at once) | infctx (chunks of --chunk_ctx, state carried, exact gradients)",
        "chunk_ctx": "tokens per chunk with --train_type infctx (memory of one chunk's activations)",
        "head_chunk": "tokens per chunk of the output head + loss, which then never holds the logits of every "
                      "token (-1: auto, about 128 MiB of fp32 logits; 0: the plain path, all logits at once)",
        "quant": "none | int8 | nf4: keep the frozen base linears quantized (bitsandbytes)",
        "resume": "1: continue from the latest checkpoint in proj_dir (optimizer, schedule, data position)",
        "resume_changes": "refuse: --resume 1 with settings that change what the run computes (ctx_len, data, "
                          "lr schedule, seed, ...) is an error listing them | allow: go on, logging the changes",
        "wandb": "wandb project name (empty: off; WANDB_MODE=offline logs locally)",
        "tensorboard": "directory for TensorBoard event files (empty: off)",
        "eval_data": "held-out file in the --data_type format: loss over the training mask, and generations",
        "eval_every": "evaluate every N optimizer steps (and at step 0 and the last step); 0: off",
        "eval_samples": "sampled generations per evaluation, from the first held-out prompts",
        "eval_max_tokens": "most tokens per eval generation",
        "save_best": "1: keep the adapter with the lowest eval loss as rwkv-best.pth",
        "max_bad_steps": "stop after this many NaN/inf losses in a row",
        "progress": "0: no progress bar (log lines instead)",
        "peft_folder": "blinkdl | hf: also write each saved adapter as a Hugging Face peft folder rwkv-<epoch>-peft/ "
                       "with these module names ('': off)",
    }


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m rwkv_peft.train",
                       description="Fine-tune an RWKV checkpoint with MiSS (or LoRA/PiSSA/state/full) "
                                   "on DeepSpeed's engine, CPU or GPU.")
    helps = _helps()
    for name, value in TrainConfig().to_dict().items():
        kw = {"help": helps.get(name)}
        if name == "objective_options":
            add_objective_flags(p)
        elif name == "sft_field":
            p.add_argument(f"--{name}", nargs=2, default=list(value), **kw)
        elif name in ARCH_FLAGS:
            p.add_argument(f"--{name}", type=int, default=0,
                           help="optional; must match the checkpoint (0: read from it)")
        else:
            p.add_argument(f"--{name}", type=type(value), default=value, **kw)
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags -> TrainConfig; argparse errors exit with one ``error: ...`` line."""
    a = vars(build_parser().parse_args(argv))
    a["sft_field"] = tuple(a["sft_field"])
    own = {f.name for f in fields(TrainConfig)}
    given = {k: a.pop(k) for k in list(a) if k not in own}  # flags of objectives
    cfg = TrainConfig(**a, objective_options=objective_options(a["objective"], given))
    check_config(cfg)
    return cfg


def _positive(cfg: TrainConfig, *names: str, minimum: int = 1) -> None:
    for n in names:
        if getattr(cfg, n) < minimum:
            raise ValueError(f"--{n}: expected >= {minimum}, got {getattr(cfg, n)}")


def check_config(cfg: TrainConfig) -> None:
    """Cheap checks of every flag and input path, so bad input fails in a second, not after model loading."""
    get_method(cfg.peft)
    kind, objective = get_data_type(cfg.data_type), get_objective(cfg.objective)
    accepts = cfg.data_type in objective.data_types if objective.data_types else kind.tokens
    if not accepts:
        accepted = "|".join(objective.data_types) or "a token data type"
        raise ValueError(f"--data_type {cfg.data_type}: --objective {cfg.objective} trains on {accepted}")
    for flag, choices in CHOICES.items():
        if getattr(cfg, flag) not in choices:
            raise ValueError(f"--{flag}: expected one of {'|'.join(c or repr(c) for c in choices)}, "
                             f"got {getattr(cfg, flag)!r}")
    for flag in ("grad_cp", "resume", "save_best", "strict"):
        if getattr(cfg, flag) not in (0, 1):
            raise ValueError(f"--{flag}: expected 0 or 1, got {getattr(cfg, flag)}")
    _positive(cfg, "ctx_len", "micro_bsz", "epoch_steps", "epoch_count", "epoch_save",
              "accumulate_grad_batches", "devices", "num_nodes", "max_bad_steps")
    _positive(cfg, "epoch_begin", "warmup_steps", "random_seed", minimum=0)
    _positive(cfg, "chunk_ctx")
    _positive(cfg, "head_chunk", minimum=-1)
    if not cfg.lr_init > 0 or cfg.lr_final < 0:
        raise ValueError(f"--lr_init must be > 0 and --lr_final >= 0, got {cfg.lr_init}, {cfg.lr_final}")
    if not 0 <= cfg.wsd_decay <= 1:
        raise ValueError(f"--wsd_decay: expected a fraction in [0, 1], got {cfg.wsd_decay}")
    if not cfg.load_model:
        raise ValueError("--load_model: a base RWKV checkpoint is required")
    if not (Path(cfg.load_model).is_file() or is_hf_folder(cfg.load_model)):
        raise FileNotFoundError(f"--load_model {cfg.load_model}: file not found (nor a Hugging Face model folder)")
    if not cfg.data_file:
        raise ValueError("--data_file: required")
    kind.files("--data_file", cfg.data_file)
    if cfg.chat_template and not Path(cfg.chat_template).is_file():
        raise FileNotFoundError(f"--chat_template {cfg.chat_template}: file not found")
    _positive(cfg, "eval_every", "eval_samples", "eval_max_tokens", minimum=0)
    if cfg.eval_data:
        if not kind.eval:
            raise ValueError(f"--eval_data: --data_type {cfg.data_type} has no held-out evaluation")
        kind.files("--eval_data", cfg.eval_data)
        if not cfg.eval_every:
            raise ValueError("--eval_data: set --eval_every N (evaluate every N steps)")
    elif cfg.eval_every or cfg.save_best:
        raise ValueError(f"--{'eval_every' if cfg.eval_every else 'save_best'}: needs --eval_data FILE "
                         f"(held-out data in the --data_type {cfg.data_type} format)")
    if objective.check is not None:
        objective.check(cfg)
    if cfg.peft_folder:  # refused now, not at the first save
        from rwkv_peft.export.adapter import check_exportable

        peft_cfg = get_method(cfg.peft).parse(cfg.peft_json)
        method = get_method(cfg.peft).describe(peft_cfg).get("method", cfg.peft)
        check_exportable(method, getattr(peft_cfg, "mode", None), list(peft_cfg.train_parts), "--peft_folder")


def input_files(cfg: TrainConfig) -> dict[str, str]:
    """Every file the run reads, each mapped to the flag that names it (no output may be one of them)."""
    found = {cfg.load_model: f"--load_model {cfg.load_model}"}
    for flag in ("data_file", "eval_data"):
        if getattr(cfg, flag):
            found.update(dict.fromkeys(get_data_type(cfg.data_type).files(f"--{flag}", getattr(cfg, flag)),
                                       f"--{flag} {getattr(cfg, flag)}"))
    for flag in ("tokenizer", "chat_template"):
        if Path(getattr(cfg, flag)).is_file():
            found[getattr(cfg, flag)] = f"--{flag} {getattr(cfg, flag)}"
    return found
