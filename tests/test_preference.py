"""Preference tuning: the pair reader's completion masks, the chunked per-sequence log-probs, and the
DPO / IPO / cDPO / ORPO / SimPO losses and gradients against formulas written here from the papers,
fed with log-probs from the official `rwkv` runtime."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import perturbed_model, write_jsonl

from rwkv_peft.data import get_tokenizer
from rwkv_peft.data.preference import PairItems, load_pairs, pair_hash
from rwkv_peft.model import save_model
from rwkv_peft.runtime import load_runtime, runtime_logits
from rwkv_peft.train.logps import logp_loss, sequence_logps
from rwkv_peft.train.preference import Pairs, PreferenceLoss, batch_objective

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_text(ids: np.ndarray, flags: np.ndarray) -> str:
    tok = get_tokenizer("world")
    return tok.decode([int(t) for t, f in zip(ids, flags, strict=True) if f and t != 0])


def test_pairs_train_only_the_completion_and_its_end(tmp_path):
    rows = [
        {"prompt": "User: 2+2?\n\nAssistant:", "chosen": " 4", "rejected": " 5 apples"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+3?"}],
         "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "six"}]},
    ]
    pairs, stats = load_pairs(write_jsonl(tmp_path / "p.jsonl", rows), 65536, 64)
    assert stats.documents == 2 and not stats.skipped
    tok = get_tokenizer("world")
    (c0, fc0, r0, fr0), (c1, fc1, r1, fr1) = pairs
    assert tok.decode(c0.tolist()) == "User: 2+2?\n\nAssistant: 4\x00".replace("\x00", tok.decode([0]))
    assert trained_text(c0, fc0) == " 4" and trained_text(r0, fr0) == " 5 apples"
    for ids, flags in ((c0, fc0), (r0, fr0), (c1, fc1), (r1, fr1)):
        assert ids[-1] == 0 and flags[-1] == 1  # the end of turn is trained
    assert trained_text(c1, fc1) == " 5" and trained_text(r1, fr1) == " six"  # not the prompt's "Hello!"
    assert tok.decode(c1.tolist()).startswith("System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: 2+3?")

    items = PairItems(pairs, ctx_len=12)
    s = items[0]
    assert len(items) == 2 and s["pair_hash"].item() == pair_hash(pairs[0]) != pair_hash(pairs[1])
    assert s["input_ids"].shape == s["targets"].shape == s["mask"].shape == (2, 12)
    n = len(c0) - 1
    assert s["targets"][0, :n].tolist() == c0[1:].tolist() and s["mask"][0, n:].sum() == 0  # padding untrained
    assert s["mask"][0, :n].tolist() == fc0[1:].tolist()


def test_bad_records_counted_strict_error_and_too_long(tmp_path):
    long = " ".join(["word"] * 40)
    rows = [
        {"prompt": "Q:", "chosen": " a", "rejected": " b"},
        "not json",
        {"prompt": "Q:", "chosen": " a"},
        {"prompt": "Q:", "chosen": [{"role": "assistant", "content": "a"}], "rejected": " b"},
        {"prompt": "Q:", "chosen": " ", "rejected": " b"},
        {"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "user", "content": "y"}],
         "rejected": [{"role": "assistant", "content": "z"}]},
        {"prompt": "Q:", "chosen": " a" + long, "rejected": " b"},
        {"prompt": "Q:" + long, "chosen": " a", "rejected": " b"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    pairs, stats = load_pairs(path, 65536, 16)
    assert len(pairs) == 2 and stats.kept_changed["truncated to ctx_len+1 = 17 tokens"] == 1
    assert stats.skipped == {"not JSON": 1, "missing field 'rejected'": 1, "empty completion": 1,
                             "fields 'prompt', 'chosen', 'rejected' not all strings or all message lists": 1,
                             "no assistant turn in a completion": 1, "no completion token within ctx_len": 1}
    assert stats.first_line["missing field 'rejected'"] == 3
    pairs, stats = load_pairs(path, 65536, 16, too_long="drop")
    assert len(pairs) == 1 and stats.skipped["longer than ctx_len+1 = 17 tokens (--too_long drop)"] == 2
    with pytest.raises(ValueError, match=r"p\.jsonl:2: not JSON"):
        load_pairs(path, 65536, 16, strict=True)
    with pytest.raises(ValueError, match="no usable preference pairs"):
        load_pairs(write_jsonl(tmp_path / "bad.jsonl", ["[]"]), 65536, 16)


@pytest.mark.parametrize("train_head", [True, False])
@pytest.mark.parametrize("chunk", [3, 7, 64])
def test_chunked_sequence_logps_equal_the_plain_path(chunk: int, train_head: bool):
    """B*T = 4*7 = 28 tokens: chunks that do not divide it, divide it, and hold it all (its softmax kept)."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(4, 7, 16, generator=g), torch.randn(50, 16, generator=g)
    y, m = torch.randint(0, 50, (4, 7), generator=g), (torch.rand(4, 7, generator=g) > 0.3).float()
    objective = batch_objective(PreferenceLoss("simpo", 2.0, 0.1), m)
    out = []
    for c in (0, chunk):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_(train_head)
        loss, logps = logp_loss(y, objective, c)(hh, ww)
        (2.5 * loss).backward()
        out.append((loss, logps, hh.grad, ww.grad))
    for got, want in zip(out[1], out[0], strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # a reference pass: log-probs only
        torch.testing.assert_close(logp_loss(y, head_chunk=chunk)(h, w)[1], out[0][1])


# --- the losses against the papers' formulas, on the runtime's log-probs -------------------------

def formula_losses(objective: str, c, r, rc, rr, nc, nr, beta, ls=0.0, gamma=0.5, ipo=False):
    """Per-pair losses written from the papers (DPO eq. 7 with Mitchell's smoothing; IPO eq. 17 with
    TRL's per-token averages; ORPO eq. 6-7; SimPO eq. 6)."""
    def logsig(x):
        return -torch.log1p(torch.exp(-x))

    if objective == "dpo" and ipo:
        h = (c / nc - rc / nc) - (r / nr - rr / nr)
        return (h - 1 / (2 * beta)) ** 2
    if objective == "dpo":
        z = beta * ((c - rc) - (r - rr))
        return -(1 - ls) * logsig(z) - ls * logsig(-z)
    if objective == "orpo":
        pc, pr = torch.exp(c / nc), torch.exp(r / nr)
        ratio = torch.log(pc / (1 - pc)) - torch.log(pr / (1 - pr))
        return -c / nc - beta * logsig(ratio)
    z = beta * (c / nc) - beta * (r / nr) - gamma
    return -(1 - ls) * logsig(z) - ls * logsig(-z)


SETTINGS = [("dpo", dict(beta=0.1)), ("dpo", dict(beta=0.5, label_smoothing=0.2)),
            ("dpo", dict(beta=0.3, dpo_loss="ipo")), ("orpo", dict(beta=0.2)),
            ("simpo", dict(beta=2.0, gamma=0.7, label_smoothing=0.1))]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """A base (the reference) and a policy (the base moved), saved for the runtime, and pairs of tokens."""
    d = tmp_path_factory.mktemp("pref")
    base, policy = perturbed_model(vocab=300, seed=3), perturbed_model(vocab=300, seed=3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    save_model(base, d / "base.pth")
    save_model(policy, d / "policy.pth")
    gen = torch.Generator().manual_seed(9)
    B, T = 3, 10
    ids = torch.randint(1, 300, (2 * B, T + 1), generator=gen)
    mask = torch.zeros(2 * B, T)
    for i, start in enumerate([2, 4, 5, 3, 6, 1]):  # prompts of several lengths, completions to the end
        mask[i, start:] = 1
    return dict(base=base, policy=policy, files=d, ids=ids, mask=mask)


def runtime_logps(path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    rt = load_runtime(path)
    out = []
    for row, m in zip(ids, mask, strict=True):
        lp = torch.log_softmax(runtime_logits(rt, row[:-1].tolist()).double(), -1)
        out.append((lp.gather(1, row[1:, None]).squeeze(1) * m.double()).sum())
    return torch.stack(out)


@pytest.mark.parametrize("objective,kw", SETTINGS)
def test_losses_and_gradients_equal_the_papers_on_runtime_logps(two_models, objective: str, kw: dict):
    tm = two_models
    ids, mask = tm["ids"], tm["mask"]
    counts = mask.sum(1)
    pol_rt = runtime_logps(tm["files"] / "policy.pth", ids, mask)
    ref_rt = runtime_logps(tm["files"] / "base.pth", ids, mask)
    nc, nr = counts.double().chunk(2)
    beta = kw["beta"]
    ls, gamma, ipo = kw.get("label_smoothing", 0.0), kw.get("gamma", 0.5), kw.get("dpo_loss") == "ipo"
    want = formula_losses(objective, *pol_rt.chunk(2), *ref_rt.chunk(2), nc, nr, beta, ls, gamma, ipo).mean()

    # ours: the chunked head (chunks of 7 tokens over 60) on our model, reference from our base
    with torch.no_grad():
        ref_ours = sequence_logps(tm["base"](ids[:, :-1], loss=logp_loss(ids[:, 1:], head_chunk=7))[1], mask)
    torch.testing.assert_close(ref_ours.double(), ref_rt, rtol=1e-5, atol=1e-5)
    ref = Pairs.split(ref_ours, counts)
    policy = tm["policy"]
    policy.zero_grad()
    loss, logps = policy(ids[:, :-1], loss=logp_loss(
        ids[:, 1:], batch_objective(PreferenceLoss(objective, **kw), mask, ref), head_chunk=7))
    loss.backward()
    logps = sequence_logps(logps, mask)
    torch.testing.assert_close(logps.double(), pol_rt, rtol=1e-5, atol=1e-5)
    assert abs(loss.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    ours = {n: p.grad.clone() for n, p in policy.named_parameters()}

    # independent gradients: full logits -> log_softmax -> the formula, through autograd
    policy.zero_grad()
    lp = torch.log_softmax(policy(ids[:, :-1]), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    seq = (lp * mask).sum(1)
    formula_losses(objective, *seq.chunk(2), *ref_ours.chunk(2), *counts.chunk(2), beta, ls, gamma, ipo
                   ).mean().backward()
    for n, p in policy.named_parameters():
        err = (ours[n] - p.grad).norm() / p.grad.norm().clamp(min=1e-30)
        assert err <= 1e-5, f"{n}: relative gradient error {err:.2e}"


def test_dpo_is_ln2_and_accuracy_one_half_when_policy_equals_reference(two_models):
    tm = two_models
    ids, mask = tm["ids"], tm["mask"]
    counts = mask.sum(1)
    with torch.no_grad():
        ref = sequence_logps(tm["base"](ids[:, :-1], loss=logp_loss(ids[:, 1:]))[1], mask)
    pl = PreferenceLoss("dpo", 0.1)
    losses, c, r = pl(Pairs.split(ref.clone(), counts), Pairs.split(ref, counts))
    assert torch.equal(losses, torch.full_like(losses, math.log(2)))
    from rwkv_peft.train.preference import pair_metrics

    metrics = pair_metrics(losses, c, r, Pairs.split(ref, counts))
    assert metrics["rewards/accuracies"].item() == 0.5 and metrics["rewards/margins"].item() == 0.0
