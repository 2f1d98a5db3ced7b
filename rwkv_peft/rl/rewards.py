"""Reward functions: user callables named on the command line, two built-ins, and the checks on what they return.

The contract (``--reward SPEC``, repeatable, each with a weight from ``--reward_weights``): a callable

    fn(prompts: list[str | list[dict]], completions: list[str], records: list[dict]) -> list[float]

gets one entry per completion (a prompt and its record repeated for each of the group's
completions; ``records`` are the jsonl objects as read, so a reward can use any field) and returns
one finite number per completion. SPEC is ``module:function`` (imported like any module: from the
working directory or ``PYTHONPATH``), ``path/to/file.py:function``, or a built-in name:

- ``gsm8k``: 1 if the number after the completion's first ``####`` equals the one in the record's
  ``answer`` field (a full GSM8K solution or a bare number), else 0;
- ``format``: 1 if ``--format_regex`` matches somewhere in the completion (``re.search``, DOTALL), else 0.

A reward that raises, returns the wrong number of values or a non-finite one stops the run with one
line naming it (``RewardError``): a silently wrong reward would train the model towards it.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rwkv_peft.scoring import extract_answer

RewardFn = Callable[[list, list[str], list[dict]], Sequence[float]]
DEFAULT_FORMAT_REGEX = r"####\s*[-+]?[\d,]*\.?\d+"


class RewardError(ValueError):
    """A reward function failed or returned something unusable; the message names it."""


@dataclass(frozen=True)
class Reward:
    name: str  # as given on the command line
    fn: RewardFn
    weight: float

    @property
    def key(self) -> str:
        """Its name in metrics (``reward_<key>``): the function's name, or the built-in's."""
        return self.name.rpartition(":")[2]


def gsm8k_reward(prompts: list, completions: list[str], records: list[dict]) -> list[float]:
    """Exact match of the ``#### N`` answer against the record's ``answer`` (GSM8K's format)."""
    out = []
    for c, rec in zip(completions, records, strict=True):
        gold = rec.get("answer")
        if not isinstance(gold, (str, int, float)) or isinstance(gold, bool):
            raise ValueError("every record needs an 'answer' field (a number, or a solution ending in '#### N')")
        gold = str(gold)
        want = extract_answer(gold if "####" in gold else f"#### {gold}")
        out.append(float(want is not None and extract_answer(c) == want))
    return out


def format_reward(prompts: list, completions: list[str], records: list[dict], pattern: re.Pattern) -> list[float]:
    """1 where ``pattern`` occurs in the completion."""
    return [float(pattern.search(c) is not None) for c in completions]


def _builtin(name: str, format_regex: str) -> RewardFn | None:
    if name == "gsm8k":
        return gsm8k_reward
    if name == "format":
        try:
            return partial(format_reward, pattern=re.compile(format_regex, re.DOTALL))
        except re.error as e:
            raise ValueError(f"--format_regex {format_regex!r}: not a regular expression ({e})") from None
    return None


def _module(target: str):
    """A module by import name (the working directory searched too, as ``python -m`` does) or by file path."""
    if not target.endswith(".py"):
        if str(Path.cwd()) not in sys.path and "" not in sys.path:
            sys.path.append(str(Path.cwd()))
        return importlib.import_module(target)
    path = Path(target)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    spec = importlib.util.spec_from_file_location(f"_rwkv_peft_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _import(spec: str) -> RewardFn:
    """The callable SPEC names: ``module:function`` or ``path/file.py:function``."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"--reward {spec}: expected module:function, path/to/file.py:function, gsm8k or format")
    try:
        module = _module(target)
    except Exception as e:  # the user's module failed to import: say which and why, in one line
        raise ValueError(f"--reward {spec}: importing {target} failed ({type(e).__name__}: {_first_line(e)})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--reward {spec}: {target} has no callable {attr!r}")
    return fn


def load_rewards(specs: Sequence[str], weights: Sequence[float] = (), format_regex: str = DEFAULT_FORMAT_REGEX
                 ) -> list[Reward]:
    """The reward functions of ``--reward`` with their ``--reward_weights`` (default 1 each), imported and checked."""
    if not specs:
        raise ValueError("--reward: at least one reward function is needed (module:function, file.py:function, "
                         "gsm8k or format)")
    if weights and len(weights) != len(specs):
        raise ValueError(f"--reward_weights: {len(weights)} weights for {len(specs)} --reward functions")
    weights = list(weights) or [1.0] * len(specs)
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise ValueError(f"--reward_weights: {bad[0]} is not a finite number")
    rewards = [Reward(s, _builtin(s, format_regex) or _import(s), float(w))
               for s, w in zip(specs, weights, strict=True)]
    keys = [r.key for r in rewards]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice:
        raise ValueError(f"--reward: two functions are named {twice!r} (their metrics reward_{twice} would clash)")
    return rewards


def score(rewards: Sequence[Reward], prompts: list, completions: list[str], records: list[dict]
          ) -> tuple[list[float], dict[str, list[float]]]:
    """(weighted sum per completion, each function's values by name); a bad reward raises ``RewardError``."""
    n = len(completions)
    each: dict[str, list[float]] = {}
    for r in rewards:
        where = f"--reward {r.name}"
        try:
            values = r.fn(list(prompts), list(completions), list(records))
        except Exception as e:  # anything the user's function raises stops the run, named
            raise RewardError(f"{where} raised {type(e).__name__}: {_first_line(e)}") from None
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise RewardError(f"{where} returned {type(values).__name__}, expected a list of {n} numbers") from None
        if len(values) != n:
            raise RewardError(f"{where} returned {len(values)} values for {n} completions")
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise RewardError(f"{where} returned {values[bad]} for completion {bad} (expected a finite number)")
        each[r.name] = values
    total = [sum(r.weight * each[r.name][i] for r in rewards) for i in range(n)]
    return total, each


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"
