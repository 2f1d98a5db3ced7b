"""Objectives and data types are plug-ins: each registers from this file alone (its flags, its records,
its collate) and trains through the unchanged trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_run_files, train_flags, write_jsonl

from rwkv_peft.data import DataType, collate, get_data_type, register_data_type
from rwkv_peft.train import main
from rwkv_peft.train.loggers import read_log
from rwkv_peft.train.loss import masked_loss
from rwkv_peft.train.objectives import Objective, ObjectiveRecord, get_objective, register_objective

VOCAB, CTX, BSZ = 256, 16, 4


class EveryOtherToken(Objective):
    """The language-model loss on every other target only, scaled by its own flag --toy_weight."""

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        mask = batch["mask"].clone()
        mask[:, 1::2] = 0
        loss = masked_loss(self.ctx.forward, batch["input_ids"], batch["targets"], mask, self.ctx.cfg.head_chunk)
        return self.ctx.options["toy_weight"] * loss, {"trained_tokens": mask.sum(), "weight": 0.0 + self.ctx.options[
            "toy_weight"]}


register_objective(ObjectiveRecord(
    "every_other", EveryOtherToken, help="toy: loss on even positions",
    flags={"--toy_weight": {"type": float, "default": 1.0, "help": "loss scale"}},
))


def read_numbers(path: str, options, padded: bool) -> list[dict]:
    """Toy data type: each line {"ids": [...], "label": str}, one item per line with its label kept as text."""
    items = []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        ids = torch.tensor(rec["ids"][: options.ctx_len + 1], dtype=torch.long) % options.vocab_size
        items.append({"input_ids": ids[:-1], "targets": ids[1:], "mask": torch.ones(len(ids) - 1),
                      "label": rec["label"]})
    return items


def collate_numbers(items: list[dict]) -> dict:
    batch = collate(items)
    assert batch["label"] == [it["label"] for it in items]  # strings stay a list
    return batch


class LabelledLM(Objective):
    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        assert all(isinstance(x, str) for x in batch["label"])
        loss = masked_loss(self.ctx.forward, batch["input_ids"], batch["targets"], batch["mask"])
        return loss, {"labelled": float(sum(x == "odd" for x in batch["label"]))}


register_data_type(DataType("numbers", "toy: token ids with a label", read_numbers, tokens=False,
                            collate=collate_numbers))
register_objective(ObjectiveRecord("labelled_lm", LabelledLM, ("numbers",), help="toy: lm on labelled ids"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    return tiny_run_files(tmp_path_factory.mktemp("objectives"), 3000, VOCAB)


def records(out: Path) -> list[dict]:
    return read_log(out / "train_log.jsonl")


def test_a_toy_objective_registered_here_trains_with_its_own_flag(files, tmp_path):
    out = tmp_path / "out"
    main(train_flags(files, out, CTX, epoch_steps=2, epoch_count=1, objective="every_other", toy_weight=3.0))
    log = records(out)
    assert [r["step"] for r in log] == [1, 2]
    assert all(r["trained_tokens"] == BSZ * CTX / 2 and r["weight"] == 3.0 for r in log)
    assert get_objective("every_other").build is EveryOtherToken  # from this file, not rwkv_peft/train
    assert json.loads((out / "train_config.json").read_text())["objective_options"] == {"toy_weight": 3.0}


def test_objective_flags_belong_to_their_objective(files, tmp_path):
    with pytest.raises(SystemExit, match="^error: --toy_weight: not a flag of --objective lm$"):
        main(train_flags(files, tmp_path / "x", CTX, toy_weight=2.0))
    with pytest.raises(SystemExit, match="--data_type binidx: --objective labelled_lm trains on numbers"):
        main(train_flags(files, tmp_path / "x", CTX, objective="labelled_lm"))
    with pytest.raises(SystemExit, match=r"^error: --objective 'nope': expected one of \S*\blm\b"):
        main(train_flags(files, tmp_path / "x", CTX, objective="nope"))


def test_a_toy_data_type_registered_here_trains_and_evaluates(files, tmp_path):
    data = tmp_path / "numbers.jsonl"
    rows = [{"ids": [(7 * i + j) % 50 for j in range(CTX + 1)], "label": "odd" if i % 2 else "even"}
            for i in range(12)]
    write_jsonl(data, rows)
    out = tmp_path / "out"
    main(train_flags(files, out, CTX, data_file=data, data_type="numbers", objective="labelled_lm", magic_prime=0,
                     epoch_steps=2, epoch_count=1, eval_data=data, eval_every=1))
    log = records(out)
    steps = [r for r in log if "loss" in r]
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(0 <= r["labelled"] <= BSZ for r in steps)
    assert [r["step"] for r in evals] == [0, 1, 2] and all(r["eval_labelled"] == 6 / 3 for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert get_data_type("numbers").read is read_numbers
