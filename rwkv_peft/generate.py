"""Talk to a model: prompt completion or a multi-turn chat, decoded RNN style.

    python -m rwkv_peft.generate --model BASE.pth [--adapter OUT/rwkv-N.pth] [--state STATE.pth] --prompt TEXT
    python -m rwkv_peft.generate --model MERGED.pth --chat          # one user turn per stdin line

The prompt is read once into the recurrent state (``forward_state``); every new token then costs
one step, and a chat keeps its state between turns, so a turn reads only its own new tokens.
Only generated text goes to stdout; notes go to stderr.

Sampling is `rwkv_peft.sampling` (the `rwkv` package's PIPELINE); decoding is `rwkv_peft.decoder`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from rwkv_peft import files
from rwkv_peft.cli import ArgumentParser, UserText
from rwkv_peft.data.chat import ChatTemplate
from rwkv_peft.data.tokenizer import get_tokenizer
from rwkv_peft.decoder import STOP, Decoder, Generation, load_for_generation
from rwkv_peft.precision import DTYPES, PRECISIONS, resolve_precision
from rwkv_peft.sampling import Sampling


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
