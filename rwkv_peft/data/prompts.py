"""--data_type prompts: one prompt per jsonl line for reinforcement learning, the whole record kept for the reward.

    {"prompt": "Question: 2 + 3?\\nAnswer:", "answer": "5"}
    {"prompt": [{"role": "user", "content": "2 + 3?"}], "answer": "5"}

A string prompt is fed as it is; a list of chat messages is rendered with the chat template and
ends in ``Assistant:`` (``ChatTemplate.prompt``), as at inference. Any other field travels with
the record to the reward functions. A sample is an item dict (``{"ids", "prompt", "record"}``), not
token windows: the objective generates the completions it trains on (``--objective grpo``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .chat import ROLES, ChatTemplate
from .jsonl import JsonlStats, iter_jsonl_objects, reject
from .tokenizer import check_vocab_range, get_tokenizer
from .types import DataOptions, DataType, register_data_type

EXPECTED = '{"prompt": str | [{"role": "system"|"user"|"assistant", "content": str}, ...], ...}'


@dataclass
class PromptSet:
    ids: list[np.ndarray]  # tokens fed to the model
    prompts: list  # the prompt field as given (str or messages), what reward functions see
    records: list[dict]  # whole jsonl objects
    stats: JsonlStats


def prompt_text(prompt: object, template: ChatTemplate) -> tuple[str | None, str]:
    """(reason to skip or None, the text to feed) of a record's prompt field."""
    if isinstance(prompt, str):
        return (None, prompt) if prompt.strip() else ("empty prompt", "")
    if not isinstance(prompt, list) or not prompt:
        return "field 'prompt' not a string or a non-empty list of messages", ""
    for m in prompt:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return "a prompt message is not {'role': system|user|assistant, 'content': str}", ""
    return None, template.prompt(prompt)


def load_prompts(path: str, vocab_size: int, ctx_len: int, tokenizer: str = "world",
                 template: ChatTemplate | None = None, strict: bool = False) -> PromptSet:
    """Tokenize a prompts jsonl; prompts longer than ``ctx_len`` tokens are skipped and counted."""
    tok, template = get_tokenizer(tokenizer), template or ChatTemplate.load()
    out = PromptSet([], [], [], JsonlStats(path))
    for lineno, obj in iter_jsonl_objects(path, out.stats, strict, EXPECTED):
        if "prompt" not in obj:
            reject(out.stats, "missing field 'prompt'", lineno, strict, EXPECTED)
            continue
        reason, text = prompt_text(obj["prompt"], template)
        if reason == "empty prompt":  # harmless, counted even with --strict 1 (as empty documents)
            out.stats.skip(reason, lineno)
            continue
        if reason:
            reject(out.stats, reason, lineno, strict, EXPECTED)
            continue
        ids = tok.encode_array(text).astype(np.int64)
        check_vocab_range(ids, vocab_size, f"{path}:{lineno}")
        if len(ids) > ctx_len:
            out.stats.skip(f"prompt longer than ctx_len {ctx_len}", lineno)
            continue
        out.ids.append(ids)
        out.prompts.append(obj["prompt"])
        out.records.append(obj)
        out.stats.keep(len(ids))
    if not out.ids:
        raise ValueError(f"{path}: no usable prompts ({out.stats.summary(with_path=False)}); "
                         f"expected one per line: {EXPECTED}")
    return out



def read_prompts(path: str, o: DataOptions, padded: bool = True) -> list[dict]:
    """The data type's reader: one item per usable prompt."""
    data = load_prompts(path, o.vocab_size, o.ctx_len, o.tokenizer, ChatTemplate.load(o.chat_template), o.strict)
    return [{"ids": ids.tolist(), "prompt": p, "record": r}
            for ids, p, r in zip(data.ids, data.prompts, data.records, strict=True)]


register_data_type(DataType(
    "prompts", "{'prompt': str | messages, ...} jsonl for --objective grpo; the other fields go to --reward",
    read_prompts, tokens=False))
