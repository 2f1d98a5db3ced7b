"""GRPO: the loss math against the published formulas, rewards' contract, rollouts against teacher forcing.

The reference implementations below are written from the papers' formulas with plain Python floats
and loops (DeepSeekMath's GRPO, Dr. GRPO, DAPO), independent of the tensor code they check.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from conftest import perturbed_model

from rwkv_peft.data.chat import ChatTemplate
from rwkv_peft.data.prompts import load_prompts
from rwkv_peft.rl.loss import VARIANTS, group_advantages, kl_k3, policy_loss
from rwkv_peft.rl.rewards import RewardError, load_rewards, score
from rwkv_peft.rl.rollout import completion_logps, rollout, sample_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path, rows: list) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- the math, from the papers


def ref_advantages(rewards: list[list[float]], scale_std: bool) -> list[list[float]]:
    out = []
    for group in rewards:
        mu = sum(group) / len(group)
        sd = statistics.stdev(group)  # sample std, as TRL's GRPO
        out.append([(r - mu) / (sd + 1e-4) if scale_std else r - mu for r in group])
    return out


def ref_loss(logp, old, ref, mask, adv, variant: str, eps_low: float, eps_high: float, beta: float, max_len: int):
    """-J of the paper: per token -min(rho A, clip(rho) A) + beta * (pi_ref/pi - log(pi_ref/pi) - 1)."""
    per_seq_sums, per_seq_counts = [], []
    for i in range(len(logp)):
        s, n = 0.0, 0
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            surrogate = min(rho * adv[i], min(max(rho, 1 - eps_low), 1 + eps_high) * adv[i])
            q = math.exp(ref[i][t] - logp[i][t])
            s += -surrogate + beta * (q - math.log(q) - 1)
            n += 1
        per_seq_sums.append(s)
        per_seq_counts.append(n)
    if variant == "grpo":  # 1/G sum_i 1/|o_i| sum_t
        return sum(s / n for s, n in zip(per_seq_sums, per_seq_counts, strict=True)) / len(logp)
    if variant == "dr_grpo":  # sum over tokens / (G * max tokens)
        return sum(per_seq_sums) / (len(logp) * max_len)
    return sum(per_seq_sums) / sum(per_seq_counts)  # dapo: token level


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_advantages_and_clipped_loss_equal_the_published_formulas(variant):
    g = torch.Generator().manual_seed(0)
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, -1.0, 0.3, 0.0]])
    v = VARIANTS[variant]
    adv = group_advantages(rewards, v.scale_std).flatten()
    want_adv = [a for row in ref_advantages(rewards.tolist(), v.scale_std) for a in row]
    assert max(abs(a - b) for a, b in zip(adv.tolist(), want_adv, strict=True)) <= 1e-6
    B, L = 12, 7
    logp = (torch.rand(B, L, generator=g, dtype=torch.float64) * -3).requires_grad_(True)
    old = logp.detach() + torch.randn(B, L, generator=g, dtype=torch.float64) * 0.4  # ratios well outside the clip
    ref = logp.detach() + torch.randn(B, L, generator=g, dtype=torch.float64) * 0.3
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).double()
    for eps_high in (None, 0.35):
        out = policy_loss(logp, old, adv.double(), mask, v, clip_low=0.2, clip_high=eps_high, ref_logp=ref,
                          kl_beta=0.04, max_new_tokens=10)
        high = v.clip_high if eps_high is None else eps_high
        want = ref_loss(logp.tolist(), old.tolist(), ref.tolist(), mask.tolist(), adv.tolist(), variant, 0.2, high,
                        0.04, 10)
        assert abs(out.loss.item() - want) <= 1e-6, (variant, eps_high)
        assert 0 < out.clip_frac < 1  # the fixed ratios put some tokens past each side of the clip
    out.loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[mask == 0].abs().max() == 0


def test_dapo_clips_higher_than_grpo():
    assert VARIANTS["dapo"].clip_high == 0.28 and VARIANTS["grpo"].clip_high == 0.2
    assert not VARIANTS["dr_grpo"].scale_std


def test_equal_rewards_give_zero_advantage_and_equal_policies_zero_kl():
    assert group_advantages(torch.full((2, 4), 3.0)).abs().max() == 0
    logp = torch.randn(3, 5)
    assert kl_k3(logp, logp.clone()).abs().max() == 0
    assert (kl_k3(logp, logp + torch.randn(3, 5)) >= 0).all()


# ----------------------------------------------------------------------------- rewards


def test_reward_functions_load_from_a_file_and_weigh(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def length(prompts, completions, records):\n    return [len(c) for c in completions]\n")
    rewards = load_rewards([f"{f}:length", "gsm8k", "format"], [0.5, 1.0, 2.0])
    comps = ["x #### 5", "#### 6", "no answer"]
    recs = [{"answer": "2 + 3\n#### 5"}, {"answer": 5}, {"answer": "5"}]
    total, each = score(rewards, ["p"] * 3, comps, recs)
    assert each["gsm8k"] == [1.0, 0.0, 0.0] and each["format"] == [1.0, 1.0, 0.0]
    assert total == [0.5 * 8 + 1 + 2, 0.5 * 6 + 2, 0.5 * 9]


def test_reward_from_a_module_on_the_path(tmp_path, monkeypatch):
    (tmp_path / "rw_mod.py").write_text("def one(prompts, completions, records):\n    return [1] * len(prompts)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert score(load_rewards(["rw_mod:one"]), ["a", "b"], ["c", "d"], [{}, {}])[0] == [1.0, 1.0]


@pytest.mark.parametrize("body, says", [
    ("raise KeyError('label')", "--reward {spec} raised KeyError: 'label'"),
    ("return [1.0]", "--reward {spec} returned 1 values for 2 completions"),
    ("return [1.0, float('nan')]", "--reward {spec} returned nan for completion 1 (expected a finite number)"),
    ("return None", "--reward {spec} returned NoneType, expected a list of 2 numbers"),
])
def test_a_bad_reward_is_one_line_naming_it(tmp_path, body, says):
    f = tmp_path / "bad.py"
    f.write_text(f"def r(prompts, completions, records):\n    {body}\n")
    spec = f"{f}:r"
    with pytest.raises(RewardError) as e:
        score(load_rewards([spec]), ["a", "b"], ["c", "d"], [{}, {}])
    assert str(e.value) == says.format(spec=spec)


def test_bad_reward_specs_are_refused_naming_the_flag(tmp_path):
    for specs, says in ((["nosuchmodule_xyz:f"], "--reward nosuchmodule_xyz:f: importing nosuchmodule_xyz failed"),
                        ([f"{tmp_path}/none.py:f"], "not found"), (["json:nope"], "has no callable 'nope'"),
                        (["gsm9k"], "expected module:function")):
        with pytest.raises((ValueError, FileNotFoundError), match=says):
            load_rewards(specs)
    with pytest.raises(ValueError, match="--reward_weights: 1 weights for 2"):
        load_rewards(["gsm8k", "format"], [1.0])


# ----------------------------------------------------------------------------- prompts data


def test_prompts_read_strings_and_messages(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Q: 1+1?\nA:", "answer": "2"},
        {"prompt": [{"role": "user", "content": "2+2?"}], "answer": 4},
        {"prompt": ""}, {"question": "no prompt"}, {"prompt": [{"role": "bot", "content": "x"}]},
        {"prompt": "word " * 50},
    ])
    data = load_prompts(path, 65536, ctx_len=20)
    assert [r["answer"] for r in data.records] == ["2", 4]
    assert data.prompts[1] == [{"role": "user", "content": "2+2?"}]
    from rwkv_peft.data.tokenizer import get_tokenizer

    assert get_tokenizer("world").decode(data.ids[1].tolist()) == ChatTemplate.load().prompt(data.prompts[1])
    assert "4 lines" in data.stats.summary() and "prompt longer than ctx_len 20" in data.stats.summary()
    with pytest.raises(ValueError, match=r"p.jsonl:4: missing field 'prompt'"):
        load_prompts(path, 65536, ctx_len=20, strict=True)


# ----------------------------------------------------------------------------- rollouts


def test_rollout_logps_equal_teacher_forced_logps():
    """The decoder and the trainer see the same model: each sampled token's log-prob recorded while decoding
    equals the log-prob of one parallel forward over prompt + completion (fp32, <= 1e-4)."""
    torch.manual_seed(0)
    model = perturbed_model(n_layer=2, n_embd=64, vocab=300, head_size=32)
    with torch.no_grad():
        model.head.weight[0] += model.head.weight[0].sign() * 0.6  # make the end token likely: lengths differ
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [1]]
    r = rollout(model, prompts, 4, 16, temperature=0.9, top_p=0.95, rng=torch.Generator().manual_seed(1))
    assert r.tokens.shape[0] == 12 and r.prompts[4] == prompts[1]
    assert 1 < int(r.lengths.min()) < int(r.lengths.max())  # some ended early, on token 0, masked after it
    ended = r.lengths < r.tokens.shape[1]
    assert all(r.tokens[b, int(r.lengths[b]) - 1] == 0 for b in range(12) if ended[b])
    with torch.no_grad():
        tf = completion_logps(model, r.prompts, r.tokens, temperature=0.9)
    assert (tf * r.mask - r.logps).abs().max() <= 1e-4
    assert r.logps[r.mask.bool()].max() < 0


def test_top_p_keeps_the_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]] * 200)
    tok, logp = sample_tokens(logits, 1.0, top_p=0.5, rng=torch.Generator().manual_seed(0))
    assert set(tok.tolist()) == {0}  # token 0 alone holds >= half of the mass
    tok, _ = sample_tokens(logits, 1.0, top_p=0.9, rng=torch.Generator().manual_seed(0))
    assert set(tok.tolist()) == {0, 1, 2}
    assert torch.allclose(logp, torch.log_softmax(logits, -1)[:, 0])
