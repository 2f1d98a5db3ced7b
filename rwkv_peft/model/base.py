"""What every RWKV generation here shares: token shift, the block, the recurrent state, the model shell.

A version file (rwkv7.py, rwkv6.py, rwkv5.py) keeps only what differs: its time mix and channel mix
(the ``mix`` methods of ``TimeMix`` / ``ChannelMix`` subclasses), its config and the reader that
takes it from a checkpoint's shapes, its initialisation, and the class attributes of ``RWKV``.

The recurrent state of a block is ``[att shift (B, C), WKV (B, H, N, N), ffn shift (B, C)]``; a
model's is one such list per block, or None for the start of a text.

Every block also gets ``tokens``: the token ids (B, T) and their embeddings after ``blocks.0.ln0``
(B, T, C), for channel mixes that look tokens up (x070's DeepEmbed); the others ignore it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

Tokens = tuple[torch.Tensor, torch.Tensor]  # (ids (B, T), their embeddings after ln0 (B, T, C))


def token_shift(x: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    """x[t-1] for every t, with ``prev`` (B, C) (or zeros) before the first token."""
    first = torch.zeros_like(x[:, :1]) if prev is None else prev[:, None].to(x.dtype)
    return torch.cat([first, x[:, :-1]], dim=1)


class TimeMix(nn.Module):
    """A version's attention-like mixer: ``mix(x, prev, v_first, wkv_state) -> (out, v_first, wkv_state)``.

    ``v_first`` is layer 0's value, which x070's value residual mixes in; other versions pass it on.
    ``start_state(batch)`` is the WKV state before the first token when none is given: None (zeros)
    here; state tuning (``rwkv_peft.peft.state``) attaches its learned one.
    """

    def __init__(self, cfg: Any, layer_id: int, op: str = "auto"):
        super().__init__()
        self.layer_id, self.op = layer_id, op
        self.n_head, self.head_size = cfg.n_head, cfg.head_size

    def start_state(self, batch: int) -> torch.Tensor | None:
        return None

    def mix(
        self, x: torch.Tensor, prev: torch.Tensor, v_first: torch.Tensor | None, wkv_state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        v_first: torch.Tensor | None,
        shift: torch.Tensor | None = None,
        wkv_state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Returns (out, v_first, last x for the next token shift, final WKV state)."""
        if wkv_state is None:
            wkv_state = self.start_state(x.shape[0])
        out, v_first, wkv_state = self.mix(x, token_shift(x, shift), v_first, wkv_state)
        return out, v_first, x[:, -1], wkv_state


class ChannelMix(nn.Module):
    """A version's feed-forward mixer: ``mix(x, prev) -> out``, ``prev`` being the token-shifted x."""

    def mix(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, shift: torch.Tensor | None = None, tokens: Tokens | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (out, last x for the next token shift); ``tokens`` is for mixes that look tokens up."""
        return self.mix(x, token_shift(x, shift)), x[:, -1]


class Head(nn.Linear):
    """The output projection. ``head(x)`` gives logits; ``head(x, loss)`` gives ``loss(x, weight)``
    instead (a training loss that need not form every logit), computed inside this module's call so
    that hooks which gather a sharded weight (DeepSpeed ZeRO-3) run around it and its backward."""

    def forward(self, x: torch.Tensor, loss: Callable | None = None) -> torch.Tensor:
        return super().forward(x) if loss is None else loss(x, self.weight)


class Block(nn.Module):
    def __init__(self, cfg: Any, layer_id: int, time_mix: type[TimeMix], channel_mix: type[ChannelMix], op: str):
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = time_mix(cfg, layer_id, op)
        self.ffn = channel_mix(cfg, layer_id)

    def forward(
        self, x: torch.Tensor, v_first: torch.Tensor | None, state: list | None = None, tokens: Tokens | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, list]:
        """One block on the residual stream ``x`` (block 0's ``ln0`` is applied by the model, before it)."""
        att_shift, wkv_state, ffn_shift = state if state is not None else (None, None, None)
        dx, v_first, att_shift, wkv_state = self.att(self.ln1(x), v_first, att_shift, wkv_state)
        x = x + dx
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift, tokens)
        return x + dx, v_first, [att_shift, wkv_state, ffn_shift]


class RWKV(nn.Module):
    """The model shell: embedding, blocks, output norm and head; parameter names are checkpoint keys."""

    version: ClassVar[str]
    time_mix: ClassVar[type[TimeMix]]
    channel_mix: ClassVar[type[ChannelMix]]
    # Linear layers that PEFT methods adapt, by part (module names inside blocks.<i>.<part>).
    peft_targets: ClassVar[dict[str, tuple[str, ...]]]
    # Small per-block tensors grouped as the "time" train part (token-shift mixes, decay, LoRAs).
    time_params: ClassVar[tuple[str, ...]]
    # Kept only to give a checkpoint back as it came: never used, never trained.
    unused_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Any, op: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(
            self.block_class(cfg)(cfg, i, self.time_mix, self.channel_mix, op) for i in range(cfg.n_layer)
        )
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = Head(cfg.n_embd, cfg.vocab_size, bias=False)
        self.grad_cp = False

    @classmethod
    def block_class(cls, cfg: Any) -> type[Block]:
        """The block for this config (x070: one with DeepEmbed attention for RWKV-7b files)."""
        return Block

    def train_part(self, name: str) -> str | None:
        """Which ``train_parts`` group (emb, head, ln, time) a parameter name belongs to, if any."""
        if name in self.unused_params:
            return None
        if name == "emb.weight":
            return "emb"
        if name == "head.weight":
            return "head"
        if any(f"{ln}." in name for ln in ("ln0", "ln1", "ln2", "ln_x", "ln_out")):
            return "ln"
        if name.startswith("blocks.") and name.rsplit(".", 1)[-1] in self.time_params:
            return "time"
        return None

    def set_op(self, op: str) -> None:
        for block in self.blocks:
            block.att.op = op

    def forward(self, idx: torch.Tensor, loss: Callable | None = None) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T), starting from the zero (or learned) state; with ``loss``,
        the head's loss instead (see ``Head``)."""
        return self.forward_state(idx, None, loss)[0]

    def forward_state(
        self, idx: torch.Tensor, state: list | None, loss: Callable | None = None
    ) -> tuple[torch.Tensor, list]:
        """Logits (or the head's ``loss``) and the state after the last token; ``state``: one list per block or None."""
        x, state = self.forward_hidden(idx, state)
        return self.head(x, loss), state

    def forward_hidden(self, idx: torch.Tensor, state: list | None) -> tuple[torch.Tensor, list]:
        """The hidden states the head reads (after ln_out, (B, T, C)) and the state after the last token."""
        x = self.blocks[0].ln0(self.emb(idx))
        tokens = (idx, x)
        v_first = None
        new_state = []
        for i, block in enumerate(self.blocks):
            s = None if state is None else state[i]
            if self.grad_cp and self.training and torch.is_grad_enabled():
                x, v_first, s = torch.utils.checkpoint.checkpoint(block, x, v_first, s, tokens, use_reentrant=False)
            else:
                x, v_first, s = block(x, v_first, s, tokens)
            new_state.append(s)
        return self.ln_out(x), new_state
