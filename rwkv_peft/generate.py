"""Talk to a model: prompt completion or a multi-turn chat, decoded RNN style.

    python -m rwkv_peft.generate --model BASE.pth [--adapter OUT/rwkv-N.pth] [--state STATE.pth] --prompt TEXT
    python -m rwkv_peft.generate --model MERGED.pth --chat          # one user turn per stdin line

The prompt is read once into the recurrent state (``forward_state``); every new token then costs
one step, and a chat keeps its state between turns, so a turn reads only its own new tokens.
Only generated text goes to stdout; notes go to stderr.

Sampling follows the `rwkv` package's PIPELINE: presence/frequency penalties on the logits, then
top-p and top-k on the probabilities, then the temperature (0: greedy argmax).
"""

from __future__ import annotations

import argparse
import codecs
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from rwkv_peft import files
from rwkv_peft.cli import ArgumentParser, UserText
from rwkv_peft.data.chat import ChatTemplate
from rwkv_peft.data.tokenizer import END_TOKEN, get_tokenizer
from rwkv_peft.precision import DTYPES, PRECISIONS, resolve_precision

FEED_CHUNK = 1024  # prompt tokens per forward call: bounds activation memory on long prompts
STOP = ChatTemplate.load().stop  # "\n\nUser:": the model starting the next user turn ends its reply
_NO_PENALTY = set(" \t0123456789")  # tokens made only of these add no presence/frequency count


@dataclass
class Sampling:
    """How the next token is chosen (RWKV's PIPELINE_ARGS, without token bans)."""

    temperature: float = 1.0  # 0: greedy
    top_p: float = 0.3
    top_k: int = 0  # 0: off
    alpha_presence: float = 0.0  # subtracted once from every token already generated
    alpha_frequency: float = 0.0  # subtracted per (decayed) occurrence
    alpha_decay: float = 0.996  # occurrences fade by this factor per generated token
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"--top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"--top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.alpha_decay <= 1:
            raise ValueError(f"--alpha_decay must be in [0, 1], got {self.alpha_decay}")

    def rng(self) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)


def sample(logits: torch.Tensor, s: Sampling, rng: torch.Generator | None = None) -> int:
    """One token id from (V,) logits."""
    if s.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu(), dim=-1)
    if s.top_p < 1:
        ranked = probs.sort(descending=True).values
        i = int(torch.searchsorted(ranked.cumsum(0), torch.tensor([s.top_p])))
        probs[probs < ranked[min(i, len(ranked) - 1)]] = 0
    if 0 < s.top_k < len(probs):
        probs[probs < probs.topk(s.top_k).values[-1]] = 0
    if s.temperature != 1:
        probs = probs ** (1 / s.temperature)
    return int(torch.multinomial(probs, 1, generator=rng))


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
        penalties, text = _Penalties(s), _TextStream(self.tokenizer, stop, on_text)
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


class _Penalties:
    """PIPELINE's presence and frequency penalties over the tokens generated so far."""

    def __init__(self, s: Sampling):
        self.s = s
        self.counts: dict[int, float] = {}  # occurrences per token, fading by alpha_decay per token

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (V,) less presence + frequency * count for every token generated so far."""
        if not self.counts:
            return logits
        logits = logits.clone()
        ids = torch.tensor(list(self.counts), device=logits.device)
        counts = torch.tensor(list(self.counts.values()), device=logits.device)
        logits[ids] -= self.s.alpha_presence + counts * self.s.alpha_frequency
        return logits

    def count(self, tok: int, piece: str) -> None:
        """One more ``tok`` (of text ``piece``; only spaces and digits count nothing)."""
        if not (self.s.alpha_presence or self.s.alpha_frequency):
            return
        for k in self.counts:
            self.counts[k] *= self.s.alpha_decay
        self.counts[tok] = self.counts.get(tok, 0.0) + (0.0 if set(piece) <= _NO_PENALTY else 1.0)


class _TextStream:
    """The text of the tokens generated so far, cut at the first stop string; ``on_text`` gets each part
    once it is final: whole UTF-8 characters, and no tail that could still become a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str], on_text: Callable[[str], None] | None):
        self.tokenizer, self.stop, self.on_text = tokenizer, [x for x in stop if x], on_text
        self.vocab = getattr(tokenizer, "idx2token", None)  # World: bytes per id, decoded incrementally
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if self.vocab is not None else None
        self.pending: list[int] = []  # HF tokenizers: tokens whose text does not decode cleanly yet
        self.text, self.emitted = "", 0

    def add(self, tok: int) -> bool:
        """Append ``tok``'s text; True when it completed a stop string (the text is then cut before it)."""
        before = len(self.text)
        if self.utf8 is not None:
            self.text += self.utf8.decode(self.vocab.get(tok, b""))  # unassigned ids: no text
        else:
            self.pending.append(tok)
            piece = self.tokenizer.decode(self.pending)
            if "\ufffd" not in piece:
                self.text, self.pending = self.text + piece, []
        hit = _find_stop(self.text, self.stop, before)
        if hit is not None:
            self.text = self.text[:hit]
            return True
        self._emit(len(self.text) - _held_back(self.text, self.stop))
        return False

    def finish(self, stopped: bool) -> str:
        """The whole text; without a stop string, what was held back (a stop-string prefix, an unfinished
        character) is flushed too."""
        if not stopped:
            self.text += self.utf8.decode(b"", final=True) if self.utf8 is not None else (
                self.tokenizer.decode(self.pending) if self.pending else "")
        self._emit(len(self.text))
        return self.text

    def _emit(self, end: int) -> None:
        if self.on_text is not None and end > self.emitted:
            self.on_text(self.text[self.emitted : end])
            self.emitted = end


def _find_stop(text: str, stop: Sequence[str], new_from: int) -> int | None:
    """Where the earliest stop string starts, looking only at matches that end in the new text."""
    hits = [j for s in stop if (j := text.find(s, max(0, new_from - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that could still become a stop string."""
    return max((k for s in stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


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


class ChatSession:
    """A conversation in the chat template whose state carries over: each turn feeds only its new text.

    After a reply the state has read the reply and, when a stop string ended it, the part of the stop
    the model wrote before it was caught (e.g. ``\\n\\nUser``); the next turn feeds only what is missing
    from the template's text.
    """

    def __init__(self, decoder: Decoder, system: str | None = None, template: ChatTemplate | None = None):
        self.decoder = decoder
        self.template = template or ChatTemplate.load()
        self.system = [{"role": "system", "content": system}] if system else []
        self.said = ""  # what the model has read since its last reply began
        self.reply: str | None = None

    def turn_text(self, message: str) -> str:
        """The text the next turn feeds for ``message``."""
        user = [{"role": "user", "content": message}]
        if self.reply is None:
            return self.template.prompt(self.system + user)
        sep = self.template.separator
        full = self.reply + sep + self.template.prompt(user)
        return full[len(self.said):] if full.startswith(self.said) else sep + self.template.prompt(user)

    def ask(self, message: str, max_tokens: int, sampling: Sampling, stop: Sequence[str] = (STOP,),
            on_text: Callable[[str], None] | None = None, rng: torch.Generator | None = None) -> tuple[Generation, int]:
        """The reply to ``message`` and the number of prompt tokens this turn fed."""
        tokens = self.decoder.tokenizer.encode(self.turn_text(message))
        self.decoder.feed(tokens)
        g = self.decoder.generate(max_tokens, sampling, stop, on_text=on_text, rng=rng)
        self.reply, self.said = g.text, self.decoder.text(g.tokens[: g.fed])
        return g, len(tokens)


# ----------------------------------------------------------------------------- loading


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


# ----------------------------------------------------------------------------- CLI


def _unescape(text: str) -> str:
    r"""``\n``, ``\t`` and ``\\`` in a flag value, so prompts and stops can hold newlines."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m rwkv_peft.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="base or merged checkpoint (.pth / .safetensors)")
    p.add_argument("--adapter", help="adapter checkpoint OUT/rwkv-N.pth (adapter_config.json beside it), any method; "
                   "or a Hugging Face peft adapter folder")
    p.add_argument("--state", help="state file (blocks.N.att.time_state, RWKV-PEFT's format) as the start state")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help=r"text to continue (\n, \t, \\ are read as escapes)")
    mode.add_argument("--prompt_file", help="file whose text to continue, as is ('-': stdin)")
    mode.add_argument("--chat", action="store_true", help="multi-turn chat: one user message per stdin line")
    p.add_argument("--system", help="chat: a System: turn before the first message")
    p.add_argument("--chat_template", help="chat: a template JSON file, as for training (default: RWKV's)")
    p.add_argument("--max_tokens", type=int, default=256, help="tokens per reply (default 256)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top_p", type=float, default=0.3, help="default 0.3")
    p.add_argument("--top_k", type=int, default=0, help="0 = off (default)")
    p.add_argument("--alpha_presence", type=float, default=0.0, help="presence penalty (default 0)")
    p.add_argument("--alpha_frequency", type=float, default=0.0, help="frequency penalty (default 0)")
    p.add_argument("--alpha_decay", type=float, default=0.996, help="penalty decay per token (default 0.996)")
    p.add_argument("--stop", action="append", help=r"stop string, repeatable (default '\n\nUser:'; '' for none)")
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")
    p.add_argument("--tokenizer", default="world", help="world (default) or a Hugging Face tokenizer.json")
    p.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, help="default fp32 on cpu (the runtime's tokens), bf16 on "
                   "cuda; auto: bf16 where the hardware computes it natively (a decode step reads half the bytes)")
    p.add_argument("--op", default="auto", help="WKV kernel: auto | cuda | cpu | torch | fla")
    p.add_argument("--verbose", action="store_true", help="per reply: tokens fed and generated, speed (stderr)")
    return p


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _reply_printer() -> Callable[[str], None]:
    """Streams a chat reply to stdout without the leading whitespace that follows ``Assistant:``."""
    started = False

    def show(text: str) -> None:
        nonlocal started
        if not started:
            text = text.lstrip()
            started = bool(text)
        if text:
            _out(text)

    return show


def _read_text(args: argparse.Namespace, user: UserText) -> None:
    """The user's text flags and --prompt_file as clean str (bad UTF-8 replaced, said once), so that no
    user text can reach the tokenizer as something it cannot encode; --prompt_file becomes --prompt."""
    if args.prompt_file is not None:
        try:
            raw = sys.stdin.buffer.read() if args.prompt_file == "-" else Path(args.prompt_file).read_bytes()
        except OSError as e:
            raise OSError(e.errno, e.strerror, f"--prompt_file {args.prompt_file}") from None
        args.prompt = user(raw, f"--prompt_file {args.prompt_file}")
    elif args.prompt is not None:
        args.prompt = _unescape(user(args.prompt, "--prompt"))
    if args.system is not None:
        args.system = user(args.system, "--system")
    args.stop = None if args.stop is None else [user(s, "--stop") for s in args.stop]


def _settings(args: argparse.Namespace) -> tuple[Sampling, str, str, ChatTemplate, list[str]]:
    """The flags checked before anything loads: (sampling, device, precision, chat template, stop strings)."""
    sampling = Sampling(args.temperature, args.top_p, args.top_k, args.alpha_presence, args.alpha_frequency,
                        args.alpha_decay, args.seed)
    if args.max_tokens < 1:
        raise ValueError(f"--max_tokens must be >= 1, got {args.max_tokens}")
    if (args.system is not None or args.chat_template) and not args.chat:
        raise ValueError("--system and --chat_template apply to --chat only")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here")
    precision = resolve_precision(args.precision or ("fp32" if device == "cpu" else "bf16"), device)[0]
    template = ChatTemplate.load(args.chat_template)
    stop = [template.stop] if args.stop is None else [_unescape(s) for s in args.stop if s]
    return sampling, device, precision, template, stop


def _load(args: argparse.Namespace, device: str, precision: str) -> Decoder:
    """The model (``load_for_generation``) and its tokenizer, checked to fit each other."""
    tokenizer = get_tokenizer(args.tokenizer)
    dtype = DTYPES[precision]
    model = load_for_generation(args.model, args.adapter, args.state, device, dtype, args.op)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"--tokenizer {args.tokenizer}: {tokenizer.vocab_size} tokens, but {args.model} "
                         f"has vocab_size {model.cfg.vocab_size}")
    return Decoder(model, tokenizer)


def _report(args: argparse.Namespace, g: Generation, fed: int, seconds: float) -> None:
    if args.verbose:
        _note(f"[fed {fed} prompt tokens, generated {len(g.tokens)} ({g.stop_reason}), "
              f"{len(g.tokens) / max(seconds, 1e-9):.1f} tokens/s]")


def _complete(args: argparse.Namespace, decoder: Decoder, sampling: Sampling, stop: list[str],
              rng: torch.Generator) -> int:
    """--prompt (or --prompt_file): its continuation on stdout."""
    prompt = decoder.tokenizer.encode(args.prompt)
    if not prompt:
        print(f"error: {'--prompt_file' if args.prompt_file else '--prompt'} is empty", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    decoder.feed(prompt)
    g = decoder.generate(args.max_tokens, sampling, stop, on_text=_out, rng=rng)
    _out("\n")
    _report(args, g, len(prompt), time.perf_counter() - t0)
    return 0


def _chat(args: argparse.Namespace, decoder: Decoder, sampling: Sampling, stop: list[str], template: ChatTemplate,
          rng: torch.Generator, user: UserText) -> int:
    """--chat: one reply per stdin line (read as bytes: any encoding), the state carried from turn to turn,
    until end of input."""
    session = ChatSession(decoder, args.system, template)
    interactive = sys.stdin.isatty()
    if interactive:
        _note("chat: one message per line; Ctrl-D ends")
    while True:
        if interactive:
            print("User: ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.buffer.readline()
        if not line:
            return 0
        message = user(line, "stdin").strip()
        if not message:
            continue
        if interactive:
            print("Assistant:", end=" ", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        g, fed = session.ask(message, args.max_tokens, sampling, stop, on_text=_reply_printer(), rng=rng)
        _out("\n")
        _report(args, g, fed, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    """Check the flags, load the model, then complete the prompt or chat; 2 with one error line on bad input."""
    args, user = _parser().parse_args(argv), UserText()
    try:
        _read_text(args, user)
        sampling, device, precision, template, stop = _settings(args)
        t0 = time.perf_counter()
        decoder = _load(args, device, precision)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {files.describe(e)}", file=sys.stderr)
        return 2
    cfg = decoder.model.cfg
    _note(f"loaded RWKV {decoder.model.version} {cfg.n_layer}x{cfg.n_embd} on {device} {precision} "
          f"in {time.perf_counter() - t0:.1f}s")
    rng = sampling.rng()
    if rng is None:  # torch's default generator starts from the same seed in every process
        rng = torch.Generator()
        rng.seed()
    if args.chat:
        return _chat(args, decoder, sampling, stop, template, rng, user)
    return _complete(args, decoder, sampling, stop, rng)


if __name__ == "__main__":
    sys.exit(main())
