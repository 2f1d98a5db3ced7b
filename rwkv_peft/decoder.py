"""Decoding RNN style: a prompt is read once into the recurrent state (``forward_state``), every new
token then costs one step. ``Decoder`` is the one decoding loop (the CLI, held-out evaluation, scoring
and GRPO rollouts all use it); ``load_for_generation`` readies a model with its adapter or state."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice

import torch
from torch import nn

from rwkv_peft.data.chat import ChatTemplate
from rwkv_peft.data.tokenizer import END_TOKEN
from rwkv_peft.sampling import Penalties, Sampling, sample
from rwkv_peft.text_stream import TextStream

FEED_CHUNK = 1024  # prompt tokens per forward call: bounds activation memory on long prompts
STOP = ChatTemplate.load().stop  # "\n\nUser:": the model starting the next user turn ends its reply


@dataclass
class Generation:
    tokens: list[int]  # generated ids (an end token excluded)
    text: str  # their text, cut before the first stop string
    stop_reason: str  # "stop" (a stop string), "end" (end token), "length" (max_tokens)
    fed: int  # how many of ``tokens`` the model has read (the last sampled one is not, unless "end")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, its training mode restored after (also on an error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _cat_states(states: list[list]) -> list:
    """One batched recurrent state from per-sequence states (batch dim 0 of every tensor). Tensors that
    grow with the context (RWKV-7b's attention cache and its validity mask, dim 1) are left-padded with
    zeros / False to the longest."""

    def stack(ts: list[torch.Tensor]) -> torch.Tensor:
        n = max(t.shape[1] for t in ts) if ts[0].dim() > 1 else 0
        return torch.cat([t if t.dim() < 2 or t.shape[1] == n else
                          torch.cat([t.new_zeros((t.shape[0], n - t.shape[1], *t.shape[2:])), t], 1) for t in ts])

    return [[stack([s[b][j] for s in states]) for j in range(len(states[0][b]))] for b in range(len(states[0]))]


class Decoder:
    """A model (in eval mode), its tokenizer and its recurrent state: feed tokens, sample continuations.

    ``steps`` is the one decoding loop: ``generate`` runs it on one sequence with the sampler, stop
    strings and streamed text; ``rwkv_peft.scoring.greedy_generate`` on a batch (``feed_each``) with argmax.
    """

    def __init__(self, model: nn.Module, tokenizer=None, state: list | None = None):
        from rwkv_peft.model.decode import stepper

        self.model, self.tokenizer, self.state = model, tokenizer, state
        self.logits: torch.Tensor | None = None  # (B, V) fp32 after the last token read
        self.fed = 0  # tokens read so far, all calls together
        self.device = next(model.parameters()).device
        self.stepper = stepper(model)  # one-token steps a block per kernel call (None: forward_state)

    @torch.no_grad()
    def _forward(self, idx: torch.Tensor) -> None:
        if idx.shape[1] == 1 and self.state is not None and self.stepper is not None:
            self.logits, self.state = self.stepper.step(idx[:, 0], self.state)
        else:
            logits, self.state = self.model.forward_state(idx, self.state)
            self.logits = logits[:, -1].float()
        self.fed += idx.shape[1]

    def feed(self, tokens: Sequence[int]) -> torch.Tensor:
        """Read ``tokens`` into the state (one sequence); returns the logits (V,) after the last one."""
        if len(tokens) == 0:
            raise ValueError("nothing to feed: the prompt has no tokens")
        for i in range(0, len(tokens), FEED_CHUNK):
            self._forward(torch.tensor([list(tokens[i : i + FEED_CHUNK])], dtype=torch.long, device=self.device))
        return self.logits[0]

    def feed_each(self, prompts: Sequence[Sequence[int]]) -> None:
        """Read each prompt on its own from the current state (no padding enters a state), then stack
        their states and logits as one batch for ``steps``."""
        start, states, logits = self.state, [], []
        for p in prompts:
            self.state = start
            logits.append(self.feed(p)[None])
            states.append(self.state)
        self.state, self.logits = _cat_states(states), torch.cat(logits)

    def steps(self, pick: Callable[[torch.Tensor], list[int]]) -> Iterator[list[int]]:
        """Per step, the tokens ``pick`` chooses from the logits (B, V), one per sequence; they are read
        into the state only when the next step is asked for, so a caller that stops leaves them unread."""
        if self.logits is None:
            raise ValueError("generate: feed a prompt first")
        while True:
            tokens = pick(self.logits)
            yield tokens
            self._forward(torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None])

    def text(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens`` (ids the World vocab leaves unassigned have none)."""
        vocab = getattr(self.tokenizer, "idx2token", None)
        if vocab is None:
            return self.tokenizer.decode(list(tokens))
        return b"".join(vocab.get(t, b"") for t in tokens).decode("utf-8", "replace")

    def generate(
        self,
        max_tokens: int,
        sampling: Sampling | None = None,
        stop: Sequence[str] = (STOP,),
        stop_tokens: Sequence[int] = (END_TOKEN,),
        on_text: Callable[[str], None] | None = None,
        rng: torch.Generator | None = None,
    ) -> Generation:
        """Sample up to ``max_tokens`` after what was fed; ``on_text`` receives the text as it is final
        (never part of a stop string, never half a UTF-8 character)."""
        if self.logits is None:
            raise ValueError("generate: feed a prompt first")
        s = sampling or Sampling()
        rng = rng if rng is not None else s.rng()
        penalties, text = Penalties(s), TextStream(self.tokenizer, stop, on_text)
        tokens: list[int] = []
        reason = "length"
        picks = self.steps(lambda logits: [sample(penalties(logits[0]), s, rng)])
        for (tok,) in islice(picks, max_tokens):
            if tok in stop_tokens:
                reason = "end"
                break
            tokens.append(tok)
            penalties.count(tok, self.text([tok]))
            if text.add(tok):
                reason = "stop"
                break
        fed = len(tokens) if reason == "end" else max(len(tokens) - 1, 0)
        return Generation(tokens, text.finish(reason == "stop"), reason, fed)



@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompt: str | Sequence[int],
    max_tokens: int = 256,
    sampling: Sampling | None = None,
    stop: Sequence[str] = (STOP,),
    state: list | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Continue ``prompt`` (text or token ids) from ``state`` (None: the model's start state).

    Works on any model of this package (base, adapted, quantized, training or not: it is put in eval
    mode for the call and restored), on the model's own device and dtype.
    """
    tokens = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    with eval_mode(model):
        dec = Decoder(model, tokenizer, state)
        dec.feed(tokens)
        return dec.generate(max_tokens, sampling, stop, on_text=on_text)



def load_for_generation(
    model_path: str,
    adapter: str | None = None,
    state: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    op: str = "auto",
) -> nn.Module:
    """A model ready to decode: the base with an adapter merged in (any method; a state adapter sets
    the start state) or a merged file, plus a state file's start state. Everything is checked first."""
    from rwkv_peft.merge import merge_state_dict, read_adapter
    from rwkv_peft.model import load_model, read_state_dict
    from rwkv_peft.peft.state import check_states, read_state_file, set_time_state, split_states

    sd, states = split_states(read_state_dict(model_path))  # a base with a state merged in (merge_state.py)
    states_from = model_path if states else None
    if adapter is not None:
        tensors, cfg = read_adapter(adapter)
        asd, astates = split_states(tensors)
        if astates:
            if states_from:
                raise ValueError(f"--adapter {adapter}: a state adapter, but {states_from} already holds a time_state")
            states, states_from = astates, adapter
            cfg.pop("method", None)
        if asd:
            sd = merge_state_dict(sd, asd, cfg)
    model = load_model(sd, device=device, dtype=dtype, op=op)
    if state is not None:
        if states_from:
            raise ValueError(f"--state {state}: {states_from} already sets the start state; give one of them")
        set_time_state(model, read_state_file(state, model))
    elif states:
        set_time_state(model, check_states(states, model, states_from))
    return model.eval()

