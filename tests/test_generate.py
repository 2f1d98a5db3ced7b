"""Generation and state files against the official `rwkv` runtime: greedy decoding, chat, exported states.

Tolerance 1e-4 on logits: fp32 on both sides, the runtime's own op order (measured ~1e-6).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli, perturbed

from rwkv_peft.data import BinIdxWriter, largest_magic_prime
from rwkv_peft.data.tokenizer import get_tokenizer
from rwkv_peft.decoder import Decoder, Generation, generate, load_for_generation
from rwkv_peft.generate import ChatSession, main
from rwkv_peft.merge import main as merge_main
from rwkv_peft.merge import merge_adapter
from rwkv_peft.model import load_model, save_model
from rwkv_peft.peft import MissConfig, adapter_config, apply_peft, load_adapter, trainable_state_dict
from rwkv_peft.peft.state import merge_state, read_state_file
from rwkv_peft.runtime import load_runtime, runtime_generate, runtime_initial_state, runtime_logits
from rwkv_peft.sampling import Sampling, sample
from rwkv_peft.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
PROMPT = "User: Tom has 3 apples and buys 5 more. How many now?\n\nAssistant:"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("world")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per version: a tiny World-vocab base, a random MiSS adapter (with adapter_config.json), the merged file."""
    out = {}
    for version in ("x070", "x060", "x052"):
        d = tmp_path_factory.mktemp(version)
        base = perturbed(version, n_layer=2, n_embd=64, vocab=65536, head_size=32, seed=7)
        save_model(base, d / "base.pth")
        cfg = MissConfig(r=8)
        apply_peft(base, "miss", cfg)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in base.named_parameters():
                if name.endswith(".miss"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        save_model(trainable_state_dict(base), d / "adapter.pth")
        (d / "adapter_config.json").write_text(json.dumps(adapter_config(base, "miss", cfg)))
        merge_adapter(d / "base.pth", d / "adapter.pth", d / "merged.pth")
        out[version] = {"base": d / "base.pth", "adapter": d / "adapter.pth", "merged": d / "merged.pth"}
    return out


def greedy(model, tok, tokens: list[int], n: int) -> list[int]:
    dec = Decoder(model, tok)
    dec.feed(tokens)
    return dec.generate(n, Sampling(temperature=0), stop=(), stop_tokens=()).tokens


@pytest.mark.parametrize("version", ["x070", "x060", "x052"])
def test_greedy_equals_runtime_on_merged_model(models, tok, version: str, capsys) -> None:
    files = models[version]
    prompt = tok.encode(PROMPT)
    want = runtime_generate(load_runtime(files["merged"], version), prompt, 32)
    print(f"{version} runtime greedy: {want}")
    assert len(set(want)) > 3  # a real continuation, not one token repeated
    assert greedy(load_for_generation(str(files["merged"])), tok, prompt, 32) == want
    assert greedy(load_for_generation(str(files["base"]), adapter=str(files["adapter"])), tok, prompt, 32) == want

    capsys.readouterr()
    assert main(["--model", str(files["merged"]), "--prompt", PROMPT.replace("\n", "\\n"), "--max_tokens", "32",
                 "--temperature", "0", "--device", "cpu"]) == 0
    shown = want[: want.index(0)] if 0 in want else want  # the end token stops the CLI
    assert capsys.readouterr().out == tok.decode(shown) + "\n"


def test_chat_state_carries_and_each_turn_feeds_only_its_new_tokens(models, tok) -> None:
    model = load_for_generation(str(models["x070"]["merged"]))
    system = "You are a careful assistant who answers questions about arithmetic word problems. " * 3
    greedy8 = Sampling(temperature=0)
    dec = Decoder(model, tok)
    session = ChatSession(dec, system)
    turn1 = session.turn_text("Tom has 3 apples and buys 5 more. How many now?")
    g1, n1 = session.ask("Tom has 3 apples and buys 5 more. How many now?", 8, greedy8)
    turn2 = session.turn_text("And if he eats 2?")
    g2, n2 = session.ask("And if he eats 2?", 8, greedy8)
    assert n1 > 40 and n2 == len(tok.encode(turn2)) < 20  # turn 2 reads its own text, not the transcript
    assert dec.fed == n1 + g1.fed + n2 + g2.fed
    # the carried state is the state of the whole conversation read in one go
    fresh = Decoder(model, tok)
    assert turn1.startswith("System: ") and turn1.endswith("\n\nAssistant:")
    fresh.feed(tok.encode(turn1) + g1.tokens[: g1.fed] + tok.encode(turn2) + g2.tokens[: g2.fed])
    for a, b in zip(dec.state, fresh.state, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_chat_through_a_pipe(models, tok) -> None:
    """Two turns on stdin give two answers on stdout; --verbose counts what each turn fed (stderr)."""
    merged = models["x070"]["merged"]
    lines = ["Tom has 3 apples and buys 5 more. How many now?", "And if he eats 2?"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "rwkv_peft.generate", "--model", str(merged), "--chat",
                          "--temperature", "0", "--max_tokens", "8", "--stop", "\\n", "--verbose", "--device", "cpu"],
                         input="\n".join(lines) + "\n", capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    session = ChatSession(Decoder(load_for_generation(str(merged)), tok))
    expect = [session.ask(m, 8, Sampling(temperature=0), stop=("\n",)) for m in lines]
    assert run.stdout == "".join(g.text.lstrip() + "\n" for g, _ in expect)
    fed = [int(line.split()[1]) for line in run.stderr.splitlines() if line.startswith("[fed ")]
    assert fed == [n for _, n in expect] and fed[1] < fed[0] + len(expect[0][0].tokens)


def test_chat_reads_non_utf8_stdin_answers_and_continues(models, tok) -> None:
    """The adversarial case: a Latin-1 line once ended the chat with a UnicodeEncodeError traceback. Bad bytes
    are read as U+FFFD (said once on stderr), the turn is answered and the next one too."""
    merged = models["x070"]["merged"]
    run = subprocess.run([sys.executable, "-m", "rwkv_peft.generate", "--model", str(merged), "--chat",
                          "--temperature", "0", "--max_tokens", "6", "--stop", "\\n", "--device", "cpu"],
                         input=b"caf\xe9 \xff\xfe\nna\xefve\n", capture_output=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0 and b"Traceback" not in run.stderr, run.stderr.decode()
    assert run.stderr.decode().count("not valid UTF-8") == 1
    session = ChatSession(Decoder(load_for_generation(str(merged)), tok))
    expect = [session.ask(m, 6, Sampling(temperature=0), stop=("\n",))[0].text.lstrip() + "\n"
              for m in ("caf\ufffd \ufffd\ufffd", "na\ufffdve")]
    assert run.stdout.decode() == "".join(expect)


def test_prompt_file_and_flags_with_bad_utf8_equal_the_replaced_text(models, tmp_path, capsys) -> None:
    flags = ["--model", str(models["x070"]["merged"]), "--max_tokens", "6", "--temperature", "0", "--device", "cpu"]
    (tmp_path / "p.txt").write_bytes(b"Caf\xe9\nau lait")
    assert main([*flags, "--prompt", "Caf\ufffd\\nau lait"]) == 0
    want = capsys.readouterr()
    assert "UTF-8" not in want.err
    assert main([*flags, "--prompt_file", str(tmp_path / "p.txt")]) == 0
    got = capsys.readouterr()
    assert got.out == want.out and got.err.count("--prompt_file") == 1
    assert main([*flags, "--prompt", "Caf\udce9\\nau lait"]) == 0  # argv's undecodable bytes (surrogateescape)
    got = capsys.readouterr()
    assert got.out == want.out and got.err.count("--prompt is not valid UTF-8") == 1


class Scripted(torch.nn.Module):
    """A stand-in model whose greedy output is a fixed token script (the state is the position)."""

    def __init__(self, script: list[int], vocab: int = 65536):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward_state(self, idx: torch.Tensor, state):
        pos = (0 if state is None else state) + idx.shape[1]
        logits = torch.zeros(1, idx.shape[1], self.vocab)
        logits[0, -1, self.script[min(pos - 1, len(self.script) - 1)]] = 10.0
        return logits, pos


def test_stop_strings_and_utf8_never_stream_half(tok) -> None:
    text = "Hi 你好.\n\nUser: more"
    script = tok.encode("x") + [b for ch in text.encode() for b in [ch + 1]]  # byte tokens: 你 spans 3 tokens
    assert tok.decode(script[1:]) == text
    chunks: list[str] = []
    dec = Decoder(Scripted(script[1:]), tok)
    dec.feed(script[:1])
    g = dec.generate(100, Sampling(temperature=0), on_text=chunks.append)
    assert g.stop_reason == "stop" and g.text == "Hi 你好." and "".join(chunks) == g.text
    assert all("\ufffd" not in c and not c.endswith("\n") for c in chunks)
    assert g.fed == len(g.tokens) - 1 and tok.decode(g.tokens[: g.fed]) == "Hi 你好.\n\nUser"
    chunks.clear()
    dec = Decoder(Scripted(script[1:]), tok)
    dec.feed(script[:1])
    g = dec.generate(5, Sampling(temperature=0), on_text=chunks.append)  # ends inside 你: held, then flushed
    assert g.stop_reason == "length" and g.text == tok.decode(script[1:6]) == "Hi \ufffd"
    assert chunks == ["H", "i", " ", "\ufffd"]


def test_ids_without_text_decode_to_nothing(tok) -> None:
    """World models have 65536 rows but ids 65530.. are unassigned: a model may still pick one."""
    dec = Decoder(Scripted([65535] + tok.encode(" ok")), tok)
    dec.feed([1])
    g = dec.generate(2, Sampling(temperature=0, alpha_frequency=1.0), stop=())
    assert g.tokens[0] == 65535 and g.text == " ok" and dec.text(g.tokens) == " ok"


def test_sampling_rules() -> None:
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert {sample(logits, s, s.rng()) for s in [Sampling(top_k=1, top_p=1.0, seed=i) for i in range(5)]} == {0}
    assert {sample(logits, Sampling(top_p=0.01), torch.Generator().manual_seed(s)) for s in range(20)} == {0}
    seen = {sample(logits, Sampling(top_p=1.0, temperature=2.0), torch.Generator().manual_seed(s)) for s in range(200)}
    assert seen == {0, 1, 2, 3}
    assert {sample(logits, Sampling(top_p=0.85), torch.Generator().manual_seed(s)) for s in range(200)} == {0, 1}


def test_presence_and_frequency_penalties(tok) -> None:
    """PIPELINE's rule: logit -= presence + frequency * count, counts fading by alpha_decay per token."""

    class Fixed(Scripted):
        def forward_state(self, idx, state):
            logits = torch.full((1, idx.shape[1], 65536), -10.0)
            logits[0, -1, 100:104] = torch.tensor([3.0, 2.0, 1.0, 0.5])
            return logits, state

    dec = Decoder(Fixed([]), tok)
    dec.feed([1])
    plain = dec.generate(4, Sampling(temperature=0), stop=()).tokens
    assert plain == [100] * 4
    dec.feed([1])
    g = dec.generate(4, Sampling(temperature=0, alpha_presence=1.5), stop=())
    assert g.tokens == [100, 101, 100, 100]  # 3-1.5 < 2; then 3-1.5 > 2-1.5 and > 1, however often
    dec.feed([1])
    g = dec.generate(3, Sampling(temperature=0, alpha_frequency=1.2, alpha_decay=0.5), stop=())
    assert g.tokens == [100, 101, 100]  # 3-1.2 < 2; then 3-0.6 > 2-1.2


def test_library_generate_keeps_training_mode(models, tok) -> None:
    model = load_model(models["x070"]["merged"])
    model.train()
    g = generate(model, tok, PROMPT, max_tokens=4, sampling=Sampling(seed=0))
    assert isinstance(g, Generation) and len(g.tokens) <= 4 and model.training


# ----------------------------------------------------------------------------- state files


@pytest.fixture(scope="module")
def state_runs(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """A real state-tuning run (the trainer, DeepSpeed) per version on a tiny World-vocab base."""
    out = {}
    for version in ("x070", "x060"):
        d = tmp_path_factory.mktemp(f"state_{version}")
        save_model(perturbed(version, n_layer=2, n_embd=64, vocab=65536, head_size=32, seed=3), d / "base.pth")
        succ = np.random.default_rng(0).permutation(np.arange(1, 257))
        ids = [int(succ[i % 256]) for i in range(3000)]
        w = BinIdxWriter(str(d / "data"))
        w.add_document(np.asarray(ids, dtype=np.uint16))
        w.close()
        flags = {"load_model": d / "base.pth", "data_file": d / "data", "data_type": "binidx", "proj_dir": d / "out",
                 "peft": "state", "ctx_len": 16, "micro_bsz": 2, "epoch_steps": 3, "epoch_count": 1,
                 "lr_init": 0.1, "lr_final": 0.1, "op": "torch", "progress": 0, "accelerator": "cpu",
                 "precision": "fp32", "magic_prime": largest_magic_prime(len(ids), 16)}
        train_main(cli(flags))
        out[version] = {"base": d / "base.pth", "state": d / "out" / "rwkv-final.pth", "dir": d}
    return out


def adapted_logits(run: dict, tokens: list[int]) -> torch.Tensor:
    model = load_model(run["base"], op="torch")
    apply_peft(model, "state")
    load_adapter(model, str(run["state"]))
    return model(torch.tensor([tokens]))[0].detach()


@pytest.mark.parametrize("version", ["x070", "x060"])
def test_exported_state_reproduces_the_adapted_model_in_the_runtime(state_runs, version: str) -> None:
    run = state_runs[version]
    sd = torch.load(run["state"], weights_only=True)
    assert sorted(sd) == [f"blocks.{i}.att.time_state" for i in range(2)]  # RWKV-PEFT's state file
    assert all(tuple(t.shape) == (2, 32, 32) and t.abs().max() > 0 for t in sd.values())
    tokens = list(range(30, 60))
    ours = adapted_logits(run, tokens)
    runtime = load_runtime(run["base"], version)
    states = read_state_file(run["state"], load_model(run["base"], device="meta"))
    theirs = runtime_logits(runtime, tokens, "seq", runtime_initial_state(runtime, states))
    print(f"{version} runtime with exported state vs adapted: {(ours - theirs).abs().max():.3g}")
    torch.testing.assert_close(theirs, ours, atol=TOL, rtol=0)
    flipped = runtime_logits(runtime, tokens, "seq", runtime_initial_state(runtime, [s.mT for s in states]))
    assert (flipped - ours).abs().max() > 100 * TOL  # the orientation is checked, not assumed
    assert (runtime_logits(runtime, tokens, "seq") - ours).abs().max() > 100 * TOL  # and the state matters


@pytest.mark.parametrize("version", ["x070", "x060"])
def test_generate_with_state_file_equals_runtime_greedy(state_runs, tok, version: str) -> None:
    run = state_runs[version]
    prompt = tok.encode(PROMPT)
    runtime = load_runtime(run["base"], version)
    states = read_state_file(run["state"], load_model(run["base"], device="meta"))
    want = runtime_generate(runtime, prompt, 16, runtime_initial_state(runtime, states))
    model = load_for_generation(str(run["base"]), state=str(run["state"]))
    assert greedy(model, tok, prompt, 16) == want
    assert greedy(load_for_generation(str(run["base"]), adapter=str(run["state"])), tok, prompt, 16) == want


def test_merge_state_file_runs_in_the_runtime_x060(state_runs) -> None:
    """RWKV-PEFT's merge_state.py layout (base + time_state): the runtime's own loader applies the state."""
    run = state_runs["x060"]
    merged = run["dir"] / "merged_state.pth"
    subprocess.run([sys.executable, str(ROOT / "merge" / "merge_state.py"), "--base_model", str(run["base"]),
                    "--state_checkpoint", str(run["state"]), "--output", str(merged)], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
    tokens = list(range(30, 60))
    ours = adapted_logits(run, tokens)
    torch.testing.assert_close(runtime_logits(load_runtime(merged, "x060"), tokens, "seq"), ours, atol=TOL, rtol=0)
    model = load_for_generation(str(merged), op="torch")  # generate --model reads the merged state too
    torch.testing.assert_close(model(torch.tensor([tokens]))[0].detach(), ours, atol=1e-5, rtol=0)
    again = run["dir"] / "merged_again.pth"  # the one merge command recognises a state adapter by itself
    merge_main(["--base_model", str(run["base"]), "--peft_checkpoint", str(run["state"]), "--output", str(again)])
    a, b = torch.load(merged, weights_only=True), torch.load(again, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="--verify: not available for a --peft state adapter"):
        merge_main(["--base_model", str(run["base"]), "--peft_checkpoint", str(run["state"]), "--output",
                    str(run["dir"] / "v.pth"), "--verify"])


def test_state_file_errors_are_one_line(state_runs, models, tmp_path) -> None:
    run = state_runs["x070"]
    with pytest.raises(ValueError, match="ignores a time_state inside an x070"):
        merge_state(run["base"], run["state"], tmp_path / "m.pth")
    assert not (tmp_path / "m.pth").exists()
    with pytest.raises(ValueError, match="besides time_state"):
        load_for_generation(str(run["base"]), state=str(models["x070"]["adapter"]))
    bad = tmp_path / "bad.pth"
    torch.save({"blocks.0.att.time_state": torch.zeros(2, 32, 32)}, bad)
    with pytest.raises(ValueError, match="missing blocks.1.att.time_state"):
        load_for_generation(str(run["base"]), state=str(bad))
    assert main(["--model", str(run["base"]), "--state", str(bad), "--prompt", "x", "--device", "cpu"]) == 2


def test_cli_seed_repeats_and_no_seed_varies(models, capsys) -> None:
    flags = ["--model", str(models["x070"]["merged"]), "--prompt", "Once", "--max_tokens", "8", "--top_p", "1",
             "--temperature", "1.5", "--stop", "", "--device", "cpu"]
    outs = []
    for extra in (["--seed", "3"], ["--seed", "3"], [], []):
        assert main(flags + extra) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[2] != outs[3]
