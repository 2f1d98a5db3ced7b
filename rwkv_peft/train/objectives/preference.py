"""Preference objectives (``--objective dpo|orpo|simpo``) on ``--data_type preference`` pairs.

Each micro-batch of B pairs runs as one (2B, ctx_len) forward, the chosen sequences then the rejected
ones (TRL's concatenated forward), through ``logps.logp_loss``: the head folds the loss's gradient in
chunk by chunk and never holds every logit. The losses and metrics are ``train/preference.py``'s.

DPO's reference is the policy's own base: the same model with its adapter switched off
(``Context.reference``), run without gradients before the policy pass — no second copy of the
weights. Where nothing can be switched off (``--peft full``, or ``train_parts`` trained in place)
the reference log-probs of every training and held-out pair are computed once, before the first
step, from the model as loaded, and kept in a file beside the data (``ReferenceCache``), named by a
hash of the pairs' tokens, the base checkpoint's bytes and the head settings: a later run on the same
data and base reads it instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rwkv_peft.train.logps import logp_loss, sequence_logps
from rwkv_peft.train.objectives import Context, Metrics, Objective, ObjectiveRecord, register_objective
from rwkv_peft.train.objectives.reference import ReferenceCache
from rwkv_peft.train.preference import DEFAULT_BETA, DPO_LOSSES, Pairs, PreferenceLoss, batch_objective, pair_metrics


def flat_pairs(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, targets, mask) of a batch of (B, 2, T) pairs as (2B, T): chosen rows, then rejected."""
    return tuple(batch[k].transpose(0, 1).flatten(0, 1) for k in ("input_ids", "targets", "mask"))


class Preference(Objective):
    """DPO, ORPO or SimPO, as ``PreferenceLoss`` computes them."""

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        o, name = ctx.options, ctx.cfg.objective
        beta = o["beta"] if o.get("beta") is not None else DEFAULT_BETA[name]
        self.fn = PreferenceLoss(name, beta, o.get("label_smoothing", 0.0), o.get("dpo_loss", "sigmoid"),
                                 o.get("simpo_gamma", 0.5))
        self.cache = None
        if self.fn.needs_reference and not switchable(ctx):
            self.cache = ReferenceCache.build(ctx, self.logps)

    def logps(self, model, batch: dict) -> torch.Tensor:
        """Summed completion log-probs (2B,) of a batch's pairs, without gradients."""
        ids, targets, mask = flat_pairs(batch)
        with torch.no_grad():
            return sequence_logps(model(ids, loss=logp_loss(targets, head_chunk=self.ctx.cfg.head_chunk))[1], mask)

    def reference(self, batch: dict) -> Pairs | None:
        if not self.fn.needs_reference:
            return None
        counts = flat_pairs(batch)[2].sum(-1)
        if self.cache is not None:
            return Pairs.split(self.cache.lookup(batch["pair_hash"]).to(counts.device), counts)
        with self.ctx.reference() as base:
            return Pairs.split(self.logps(base, batch), counts)

    def loss(self, batch: dict) -> tuple[torch.Tensor, Metrics]:
        ids, targets, mask = flat_pairs(batch)
        ref = self.reference(batch)
        objective = batch_objective(self.fn, mask, ref)
        loss, token_lp = self.ctx.forward(ids, loss=logp_loss(targets, objective, self.ctx.cfg.head_chunk))
        policy = Pairs.split(sequence_logps(token_lp, mask), mask.sum(-1))
        metrics = pair_metrics(*self.fn(policy, ref), policy)
        del metrics["loss"]
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, batches: Sequence[dict]) -> dict[str, float]:
        """Held-out means over every pair (batches may differ in size)."""
        sums: dict[str, float] = {}
        n = 0
        for batch in batches:
            b = len(batch["input_ids"])
            loss, metrics = self.loss(batch)
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * b
            n += b
        return {k: v / n for k, v in sums.items()}


def switchable(ctx: Context) -> bool:
    """Whether the model's adapter can be switched off (not full fine-tuning, no train_parts in place)."""
    try:
        with ctx.reference():
            return True
    except ValueError:
        return False


FLAGS = {
    "--beta": dict(type=float, default=None, help=f"DPO's beta, ORPO's lambda, SimPO's beta (default "
                                                   f"{', '.join(f'{k} {v}' for k, v in DEFAULT_BETA.items())})"),
    "--label_smoothing": dict(type=float, default=0.0, help="conservative DPO / SimPO: the chance a label is "
                                                             "flipped, in [0, 0.5)"),
}
DATA = ("preference",)

register_objective(ObjectiveRecord(
    "dpo", Preference, DATA, flags={**FLAGS, "--dpo_loss": dict(
        choices=DPO_LOSSES, default="sigmoid", help="sigmoid (DPO) | ipo (IPO, per-token averages)")},
    help="DPO on preference pairs; the reference is the base (adapter switched off)"))
register_objective(ObjectiveRecord(
    "orpo", Preference, DATA, flags={"--beta": FLAGS["--beta"]},
    help="ORPO: NLL of the chosen answer plus lambda times the odds-ratio loss; reference-free"))
register_objective(ObjectiveRecord(
    "simpo", Preference, DATA, flags={**FLAGS, "--simpo_gamma": dict(
        type=float, default=0.5, help="SimPO's target reward margin gamma")},
    help="SimPO: length-normalised log-probs with a target margin; reference-free"))
