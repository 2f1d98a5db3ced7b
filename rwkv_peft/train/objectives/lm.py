"""The language-model objective (``--objective lm``, the default): masked mean cross-entropy with L2Wrap.

Plain text trains every target, sft the response, chat the assistant turns (the data type's mask).
``--train_type infctx`` is a mode of it: the same loss over the sample in ``--chunk_ctx`` chunks,
state carried, exact gradients (``loss.infctx_loss``). Held-out loss pools the masked tokens of every
held-out sample (``heldout_loss``), so long answers weigh as much as in training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rwkv_peft.train.loss import heldout_loss, infctx_loss, masked_loss
from rwkv_peft.train.objectives import Metrics, Objective, ObjectiveRecord, register_objective


class LanguageModel(Objective):
    def loss(self, batch: dict) -> tuple[torch.Tensor, Metrics]:
        cfg = self.ctx.cfg
        if cfg.train_type == "infctx":
            loss = infctx_loss(self.ctx.model, batch["input_ids"], batch["targets"], batch["mask"], cfg.chunk_ctx,
                               cfg.head_chunk)
        else:
            loss = masked_loss(self.ctx.forward, batch["input_ids"], batch["targets"], batch["mask"], cfg.head_chunk)
        return loss, {}

    def evaluate(self, batches: Sequence[dict]) -> dict[str, float]:
        samples = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]
        return {"loss": heldout_loss(self.ctx.model, samples, batch_size=len(batches[0]["input_ids"]))}


register_objective(ObjectiveRecord(
    "lm", LanguageModel,
    help="language-model loss on the data type's mask (text: every token; sft: the response; chat: assistant "
         "turns); with --train_type infctx in --chunk_ctx chunks",
))
