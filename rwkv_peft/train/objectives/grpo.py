"""--objective grpo: reinforcement learning from rewards on ``--data_type prompts`` (GRPO, Dr. GRPO, DAPO).

Per micro-batch of prompts: ``--group_size`` completions of each from the batched recurrent decoder
(``rwkv_peft.rl.rollout``), scored by the ``--reward`` functions (``rwkv_peft.rl.rewards``), their
group-normalised advantages, then the clipped policy-gradient loss with ``--kl_beta`` times a KL term
to the reference, which is the same model with its adapter switched off (``Context.reference``; no
second copy) (``rwkv_peft.rl.loss``). With ``--ppo_epochs K`` a micro-batch's rollouts are trained on
for K optimizer steps, the later ones with importance ratios against the policy that sampled them;
the batches the data gives meanwhile are not used. Each process samples its own prompts' groups.
Held-out evaluation scores greedy completions of the ``--eval_data`` prompts with the same rewards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rwkv_peft import files
from rwkv_peft.data.tokenizer import END_TOKEN, get_tokenizer
from rwkv_peft.decoder import Decoder, eval_mode
from rwkv_peft.rl.loss import VARIANTS, get_variant, group_advantages, policy_loss, policy_stats
from rwkv_peft.rl.rewards import DEFAULT_FORMAT_REGEX, load_rewards, score
from rwkv_peft.rl.rollout import Rollouts, rollout
from rwkv_peft.scoring import greedy_generate
from rwkv_peft.train.logps import LogpObjective, logp_loss
from rwkv_peft.train.objectives import Metrics, Objective, ObjectiveRecord, register_objective

SAMPLES_FILE = "completions.jsonl"


def completion_logps(model: nn.Module, prompts: Sequence[Sequence[int]], tokens: torch.Tensor,
                     temperature: float = 1.0, objective: LogpObjective = torch.sum, head_chunk: int = -1
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(``objective`` of the token log-probs, the log-probs (B, L) detached) of each completion token under
    softmax(logits / temperature), teacher-forced: one forward over prompt + completion per row.

    Rows are right-padded (a recurrent model never reads ahead, so padding after a row's tokens changes
    none of its log-probs). Only the completion positions go through the head, chunked (``logp_loss``:
    no (B, L, vocab) logits); logits / T = (hidden / T) @ W^T, so the temperature scales the hidden states.
    """
    B, L = tokens.shape
    device = tokens.device
    lens = torch.tensor([len(p) for p in prompts], device=device)
    idx = torch.full((B, int(lens.max()) + L - 1), END_TOKEN, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):  # the last completion token predicts nothing: not read
        idx[b, : len(p)] = torch.as_tensor(p, dtype=torch.long, device=device)
        idx[b, len(p) : len(p) + L - 1] = tokens[b, : L - 1]
    hidden = model.forward_hidden(idx, None)[0]
    pos = lens[:, None] - 1 + torch.arange(L, device=device)[None]
    hidden = hidden[torch.arange(B, device=device)[:, None], pos] / temperature
    return model.head(hidden, logp_loss(tokens, objective, head_chunk))


@dataclass
class _Sampled:
    """One micro-batch's rollouts and what stays fixed while they are trained on."""

    ro: Rollouts
    advantages: torch.Tensor  # (B,)
    ref_logps: torch.Tensor | None  # (B, L) under the reference; None when --kl_beta is 0
    metrics: dict[str, float]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


class GRPO(Objective):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.o = o = ctx.options
        self.rewards = load_rewards(o["reward"], o["reward_weights"], o["format_regex"])
        self.variant = get_variant(o["grpo_loss"])
        self.tokenizer = get_tokenizer(ctx.cfg.tokenizer)
        # ZeRO-3 gathers each layer's weights in a collective: every process must make the same forward calls
        self.lockstep = ctx.cfg.zero_stage == 3 and ctx.world > 1
        self.cycle: list[_Sampled] = []  # the rollouts of this PPO cycle, one per micro-batch
        self.calls = self.rollouts = 0
        self.samples_log = Path(ctx.cfg.proj_dir) / SAMPLES_FILE if ctx.rank == 0 and o["log_completions"] else None
        if self.samples_log is not None and not ctx.cfg.resume:
            files.write_text(self.samples_log, "")
        if o["kl_beta"] > 0:
            try:
                with ctx.reference():  # full fine-tuning has no adapter to switch off: say so before training
                    pass
            except ValueError as e:
                raise ValueError(f"--kl_beta {o['kl_beta']}: the reference is the model with its adapter switched "
                                 f"off, and {e}; use --kl_beta 0") from None

    def loss(self, batch: dict) -> tuple[torch.Tensor, Metrics]:
        accum = self.ctx.cfg.accumulate_grad_batches
        slot, epoch = self.calls % accum, self.calls // accum % self.o["ppo_epochs"]
        self.calls += 1
        if epoch == 0:
            self.cycle = self.cycle[:slot] + [self._sample(batch)]
        s, o = self.cycle[slot], self.o
        clip = (o["clip_eps"], o["clip_eps_high"])

        def objective(lp: torch.Tensor) -> torch.Tensor:
            return policy_loss(lp, s.ro.logps, s.advantages, s.ro.mask, self.variant, *clip, s.ref_logps,
                               o["kl_beta"], o["max_new_tokens"])

        loss, lp = completion_logps(self.ctx.model, s.ro.prompts, s.ro.tokens, o["temperature"], objective,
                                    self.ctx.cfg.head_chunk)
        stats = policy_stats(lp, s.ro.logps, s.advantages, s.ro.mask, self.variant, *clip, s.ref_logps)
        return loss, {**s.metrics, **stats}

    @torch.no_grad()
    def _sample(self, batch: dict) -> _Sampled:
        o, G = self.o, self.o["group_size"]
        # sampled from torch's default generator: seeded per rank by the trainer, its state saved with every
        # checkpoint, so a resumed run draws what the uninterrupted one drew (on CPU)
        ro = rollout(self.ctx.model, batch["ids"], G, o["max_new_tokens"], o["temperature"], o["top_p"],
                     stop_early=not self.lockstep, tokenizer=self.tokenizer)
        total, each = score(self.rewards, [p for p in batch["prompt"] for _ in range(G)], ro.texts,
                            [r for r in batch["record"] for _ in range(G)])
        rewards = torch.tensor(total, device=ro.logps.device).view(-1, G)
        ref = None
        if o["kl_beta"] > 0:
            with self.ctx.reference() as ref_model, eval_mode(ref_model):
                ref = completion_logps(ref_model, ro.prompts, ro.tokens, o["temperature"],
                                       head_chunk=self.ctx.cfg.head_chunk)[1]
        metrics = dict(zip(("reward", "reward_std"), _mean_std(total), strict=True))
        for r in self.rewards:
            metrics[f"reward_{r.key}"], metrics[f"reward_{r.key}_std"] = _mean_std(each[r.name])
        metrics["completion_len"] = float(ro.lengths.mean())
        self.rollouts += 1
        if self.samples_log is not None:
            from rwkv_peft.train.loggers import append_log  # here: loggers imports the config, which imports us

            for b in range(min(o["log_completions"], len(total))):
                append_log(self.samples_log, {"rollout": self.rollouts, "prompt": self.tokenizer.decode(ro.prompts[b]),
                                              "completion": ro.texts[b], "reward": total[b],
                                              **{f"reward_{r.key}": each[r.name][b] for r in self.rewards}})
        return _Sampled(ro, group_advantages(rewards, self.variant.scale_std).flatten(), ref, metrics)

    @torch.no_grad()
    def evaluate(self, batches: Sequence[dict]) -> dict[str, float]:
        """Mean reward of greedy completions of the held-out prompts (and each function's); the held-out "loss"
        is minus that reward, so the best step (``--save_best``) is the one with the highest reward."""
        prompts, records, texts = [], [], []
        dec = Decoder(self.ctx.model, self.tokenizer)
        for b in batches:
            outs = greedy_generate(self.ctx.model, b["ids"], self.o["max_new_tokens"])
            texts += [dec.text(t) for t in outs]
            prompts += b["prompt"]
            records += b["record"]
        total, each = score(self.rewards, prompts, texts, records)
        mean = sum(total) / len(total)
        return {"loss": -mean, "reward": mean, **{f"reward_{r.key}": sum(each[r.name]) / len(total)
                                                  for r in self.rewards}}


def _check(cfg) -> None:
    """The flags and the reward functions (imported now: a typo fails before the model loads)."""
    o = cfg.objective_options
    for name, low in (("group_size", 2), ("max_new_tokens", 1), ("ppo_epochs", 1), ("log_completions", 0)):
        if o[name] < low:
            raise ValueError(f"--{name}: expected >= {low}, got {o[name]}")
    if not o["temperature"] > 0:
        raise ValueError(f"--temperature: expected > 0 (rollouts are sampled), got {o['temperature']}")
    if not 0 < o["top_p"] <= 1:
        raise ValueError(f"--top_p: expected a fraction in (0, 1], got {o['top_p']}")
    if not o["kl_beta"] >= 0:
        raise ValueError(f"--kl_beta: expected >= 0, got {o['kl_beta']}")
    if not (0 <= o["clip_eps"] < 1 and (o["clip_eps_high"] is None or o["clip_eps_high"] >= 0)):
        raise ValueError(f"--clip_eps / --clip_eps_high: expected 0 <= eps < 1, got {o['clip_eps']}, "
                         f"{o['clip_eps_high']}")
    load_rewards(o["reward"], o["reward_weights"], o["format_regex"])


register_objective(ObjectiveRecord(
    "grpo", GRPO, ("prompts",),
    help="GRPO on --data_type prompts: sampled groups scored by --reward, clipped policy gradient, KL to the "
         "base (adapter off)",
    flags={
        "--reward": dict(nargs="+", default=[], help="reward functions: module:function, path/file.py:function, "
                                                      "gsm8k, format"),
        "--reward_weights": dict(type=float, nargs="+", default=[], help="one weight per --reward (default 1 each)"),
        "--format_regex": dict(default=DEFAULT_FORMAT_REGEX, help="the format reward's pattern (re.search)"),
        "--group_size": dict(type=int, default=8, help="completions sampled per prompt (default 8)"),
        "--max_new_tokens": dict(type=int, default=128, help="tokens per completion at most (default 128)"),
        "--temperature": dict(type=float, default=1.0, help="sampling temperature of the rollouts (default 1)"),
        "--top_p": dict(type=float, default=1.0, help="nucleus of the rollouts' sampling (default 1: off)"),
        "--kl_beta": dict(type=float, default=0.04, help="weight of the KL to the reference (default 0.04; 0: none)"),
        "--grpo_loss": dict(choices=tuple(VARIANTS), default="grpo", help="grpo | dr_grpo | dapo (default grpo)"),
        "--clip_eps": dict(type=float, default=0.2, help="ratio clip, lower side (default 0.2)"),
        "--clip_eps_high": dict(type=float, default=None, help="ratio clip, upper side (default: 0.2; dapo 0.28)"),
        "--ppo_epochs": dict(type=int, default=1, help="optimizer steps per batch of rollouts (default 1)"),
        "--log_completions": dict(type=int, default=2, help=f"completions per rollout batch written to "
                                                              f"OUT/{SAMPLES_FILE} with their rewards (default 2)"),
    },
    check=_check,
))
