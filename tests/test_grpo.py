"""GRPO: the loss math against the published formulas, rewards' contract, rollouts against teacher forcing.

The reference implementations below are written from the papers' formulas with plain Python floats
and loops (DeepSeekMath's GRPO, Dr. GRPO, DAPO), independent of the tensor code they check.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli, interrupted_after_first_save, perturbed_model, write_jsonl

from rwkv_peft.data.chat import ChatTemplate
from rwkv_peft.data.prompts import load_prompts
from rwkv_peft.model import save_model
from rwkv_peft.peft import apply_peft, parse_peft_config
from rwkv_peft.rl.loss import VARIANTS, group_advantages, kl_k3, policy_loss, policy_stats
from rwkv_peft.rl.rewards import RewardError, load_rewards, score
from rwkv_peft.rl.rollout import rollout, sample_tokens
from rwkv_peft.train import main
from rwkv_peft.train.loggers import read_log
from rwkv_peft.train.objectives.grpo import completion_logps

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


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
        loss = policy_loss(logp, old, adv.double(), mask, v, clip_low=0.2, clip_high=eps_high, ref_logp=ref,
                           kl_beta=0.04, max_new_tokens=10)
        high = v.clip_high if eps_high is None else eps_high
        want = ref_loss(logp.tolist(), old.tolist(), ref.tolist(), mask.tolist(), adv.tolist(), variant, 0.2, high,
                        0.04, 10)
        assert abs(loss.item() - want) <= 1e-6, (variant, eps_high)
        stats = policy_stats(logp, old, adv.double(), mask, v, 0.2, eps_high, ref)
        assert 0 < stats["clip_frac"] < 1  # the fixed ratios put some tokens past each side of the clip
        assert stats["kl"] > 0
    loss.backward()
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


@pytest.mark.parametrize("peft", ["none", "miss", "lora"])
def test_rollout_logps_equal_teacher_forced_logps(peft):
    """The decoder and the trainer see the same model: each sampled token's log-prob recorded while decoding
    equals the log-prob of one parallel forward over prompt + completion (fp32, <= 1e-4), also through an
    adapter with non-zero weights (the decoder's one-token steps apply its merged weight)."""
    torch.manual_seed(0)
    model = perturbed_model(n_layer=2, n_embd=64, vocab=300, head_size=32)
    with torch.no_grad():
        model.head.weight[0] += model.head.weight[0].sign() * 0.6  # make the end token likely: lengths differ
        if peft != "none":
            apply_peft(model, peft, parse_peft_config(peft, '{"r":8}'))
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape) * 0.05)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [1]]
    r = rollout(model, prompts, 4, 16, temperature=0.9, top_p=0.95, rng=torch.Generator().manual_seed(1))
    assert r.tokens.shape[0] == 12 and r.prompts[4] == prompts[1]
    assert 1 < int(r.lengths.min()) < int(r.lengths.max())  # some ended early, on token 0, masked after it
    ended = r.lengths < r.tokens.shape[1]
    assert all(r.tokens[b, int(r.lengths[b]) - 1] == 0 for b in range(12) if ended[b])
    for head_chunk in (0, 5):  # the plain head (full logits) and the chunked one
        with torch.no_grad():
            tf = completion_logps(model, r.prompts, r.tokens, temperature=0.9, head_chunk=head_chunk)[1]
        assert (tf * r.mask - r.logps).abs().max() <= 1e-4
    assert r.logps[r.mask.bool()].max() < 0


def test_sampled_tokens_follow_the_tempered_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5, -30.0]]).repeat(40000, 1)
    for t in (1.0, 0.5):
        tok, _ = sample_tokens(logits, t, rng=torch.Generator().manual_seed(1))
        freq = torch.bincount(tok, minlength=5) / len(tok)
        assert (freq - torch.softmax(logits[0] / t, -1)).abs().max() < 0.01


def test_top_p_keeps_the_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]] * 200)
    tok, logp = sample_tokens(logits, 1.0, top_p=0.5, rng=torch.Generator().manual_seed(0))
    assert set(tok.tolist()) == {0}  # token 0 alone holds >= half of the mass
    tok, _ = sample_tokens(logits, 1.0, top_p=0.9, rng=torch.Generator().manual_seed(0))
    assert set(tok.tolist()) == {0, 1, 2}
    assert torch.allclose(logp, torch.log_softmax(logits, -1)[:, 0])


# ----------------------------------------------------------------------------- the objective, end to end

TOY_VOCAB = 16  # World ids 1..15 are the bytes 0x00..0x0e: prompts of control characters tokenize into it


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    """A 1-layer x070 base with a 16-token vocab, control-character prompts, and a reward file: 1 when the
    completion starts with byte 0x07 (token 8; chance about 1/16)."""
    d = tmp_path_factory.mktemp("grpo")
    save_model(perturbed_model(n_layer=1, n_embd=64, vocab=TOY_VOCAB, head_size=32, seed=3), d / "base.pth")
    rng = torch.Generator().manual_seed(0)
    rows = [{"prompt": "".join(chr(int(c)) for c in torch.randint(1, 9, (int(n),), generator=rng)), "id": i}
            for i, n in enumerate(torch.randint(2, 6, (12,), generator=rng))]
    write_jsonl(d / "prompts.jsonl", rows)
    (d / "toy_reward.py").write_text(
        "def starts(prompts, completions, records):\n    return [float(c[:1] == '\\x07') for c in completions]\n\n"
        "def broken(prompts, completions, records):\n"
        "    return [float('nan') if r['id'] == 3 else 0.0 for r in records]\n")
    return {"base": str(d / "base.pth"), "data": str(d / "prompts.jsonl"), "reward": f"{d / 'toy_reward.py'}"}


def grpo_flags(toy: dict, out, **kw) -> list[str]:
    flags = {"load_model": toy["base"], "data_file": toy["data"], "data_type": "prompts", "objective": "grpo",
             "reward": f"{toy['reward']}:starts", "group_size": 8, "max_new_tokens": 2, "proj_dir": out,
             "peft": "miss", "miss_config": '{"r":8}', "ctx_len": 8, "micro_bsz": 4, "epoch_steps": 12,
             "epoch_count": 1, "lr_init": 5e-2, "lr_final": 5e-2, "op": "torch", "progress": 0, "accelerator": "cpu",
             "random_seed": 1}
    return cli({**flags, **kw})


def test_toy_reward_rises_from_chance_and_kl_starts_at_zero(toy, tmp_path):
    """Mean reward from near chance (1/16) to >= 0.8 in a dozen CPU steps; with a fresh adapter the policy is the
    reference, so the KL at step 1 (measured before the first update) is 0."""
    out = tmp_path / "out"
    main(grpo_flags(toy, out, kl_beta=0.01, epoch_steps=14))
    log = [r for r in read_log(out / "train_log.jsonl") if "reward" in r]
    rewards = [r["reward"] for r in log]
    print("toy reward curve:", [round(x, 3) for x in rewards])
    assert len(log) == 14 and rewards[0] <= 0.25
    assert sum(rewards[-4:]) / 4 >= 0.8
    assert log[0]["kl"] == 0 and log[-1]["kl"] > 0
    assert {"reward_std", "reward_starts", "reward_starts_std", "completion_len", "clip_frac"} <= set(log[0])
    assert (out / "rwkv-final.pth").is_file()
    rows = read_log(out / "completions.jsonl")  # --log_completions 2 per batch of rollouts
    assert [r["rollout"] for r in rows] == [i // 2 + 1 for i in range(28)]
    assert all(r["reward"] == r["reward_starts"] == float(r["completion"][:1] == "\x07") for r in rows)


def test_a_reward_returning_nan_stops_the_run_naming_it_without_a_final_file(toy, tmp_path):
    out = tmp_path / "out"
    spec = f"{toy['reward']}:broken"
    with pytest.raises(SystemExit) as e:
        main(grpo_flags(toy, out, reward=spec))
    assert str(e.value).startswith(f"error: --reward {spec} returned nan for completion ")
    assert "\n" not in str(e.value) and not (out / "rwkv-final.pth").exists()


def test_grpo_flags_are_checked_before_the_model_loads(toy, tmp_path):
    for kw, says in (({"group_size": 1}, "--group_size: expected >= 2"),
                     ({"reward": "nosuch_mod_zz:f"}, "--reward nosuch_mod_zz:f: importing"),
                     ({"temperature": 0}, "--temperature: expected > 0"),
                     ({"data_type": "sft"}, "--data_type sft: --objective grpo trains on prompts")):
        with pytest.raises(SystemExit, match=says):
            main(grpo_flags(toy, tmp_path / "x", **kw))


def test_ppo_epochs_reuse_rollouts_with_importance_ratios_and_eval_scores_greedy_completions(toy, tmp_path):
    """DAPO with --ppo_epochs 2 and no KL: each batch of rollouts trains two steps (the same rewards and lengths
    logged twice), the second one off-policy (clipping happens only there); held-out greedy reward is logged."""
    out = tmp_path / "out"
    main(grpo_flags(toy, out, grpo_loss="dapo", ppo_epochs=2, kl_beta=0, epoch_steps=6, lr_init=0.2, lr_final=0.2,
                    eval_data=toy["data"], eval_every=3))
    log = read_log(out / "train_log.jsonl")
    steps = [r for r in log if "reward" in r]
    for a, b in zip(steps[::2], steps[1::2], strict=True):
        assert (a["reward"], a["completion_len"]) == (b["reward"], b["completion_len"])
        assert a["clip_frac"] == 0 and a["kl"] == 0
    assert max(b["clip_frac"] for b in steps[1::2]) > 0
    evals = [r for r in log if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(r["eval_loss"] == -r["eval_reward"] and 0 <= r["eval_reward_starts"] <= 1 for r in evals)


def test_two_processes_under_zero3_split_the_rollouts(toy, tmp_path):
    """Each process samples its own prompts' groups; under ZeRO-3 every process decodes all --max_new_tokens
    steps (each forward gathers the sharded weights in a collective), so none waits forever on another."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "rwkv_peft.train",
                        *grpo_flags(toy, out, devices=2, strategy="deepspeed_stage_3", peft="lora",
                                    lora_config='{"r":8,"alpha":16}', micro_bsz=2, epoch_steps=3, group_size=4)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    log = [x for x in read_log(out / "train_log.jsonl") if "reward" in x]
    assert [x["step"] for x in log] == [1, 2, 3] and log[0]["kl"] == 0
    assert (out / "rwkv-final.pth").is_file()


def test_resume_follows_the_uninterrupted_run(toy, tmp_path, monkeypatch):
    """Rollouts are drawn from the generator the trainer saves with each checkpoint: killed after its first
    epoch and resumed, a run logs the uninterrupted run's rewards and ends with its adapter."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    kw = dict(epoch_steps=2, epoch_count=2, max_new_tokens=3)
    main(grpo_flags(toy, full, **kw))
    interrupted_after_first_save(monkeypatch, lambda: main(grpo_flags(toy, cut, **kw)))
    main(grpo_flags(toy, cut, resume=1, **kw))
    logged = [[(r["step"], r["reward"], r["loss"]) for r in read_log(d / "train_log.jsonl")] for d in (full, cut)]
    assert logged[0] == logged[1] and len(logged[0]) == 4
    a, b = (torch.load(d / "rwkv-final.pth", weights_only=True) for d in (full, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
