"""The compiled one-token decode step (rwkv_peft.model.decode) against the model's forward_state and
the official runtime: logits, states, batches, bf16 weights, adapted linears, models it must decline."""

from __future__ import annotations

import pytest
import torch
from helpers import perturbed, perturbed_model
from torch import nn

from rwkv_peft.decoder import Decoder
from rwkv_peft.model.decode import stepper
from rwkv_peft.peft import MissConfig, adapter_disabled, apply_peft
from rwkv_peft.runtime import load_runtime, runtime_generate

VOCAB = 300


def _model(seed: int = 3) -> nn.Module:
    return perturbed_model(n_layer=3, n_embd=128, vocab=VOCAB, head_size=32, seed=seed).eval()


def _steps(step, model, idx: torch.Tensor, fed: int) -> tuple[torch.Tensor, list]:
    """Logits (B, T - fed, V) of decoding idx[:, fed:] one token at a time after forward_state read idx[:, :fed]."""
    with torch.no_grad():
        _, state = model.forward_state(idx[:, :fed], None)
        out = []
        for t in range(fed, idx.shape[1]):
            logits, state = step(idx[:, t], state)
            out.append(logits)
    return torch.stack(out, 1), state


def _assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    assert err <= rtol, err


@pytest.mark.parametrize("adapted", [False, True])
def test_step_equals_forward_state(adapted: bool) -> None:
    """A batch of 3, 5 steps after a prompt: logits and every state part as forward_state gives them
    (fp32; only the summation order differs), also with MiSS adapters (their merged weights)."""
    model = _model()
    if adapted:
        apply_peft(model, "miss", MissConfig(r=16))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".miss"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    idx = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, want_state = model.forward_state(idx, None)
    st = stepper(model)
    assert st is not None
    got, state = _steps(st.step, model, idx, 7)
    _assert_close(got, full[:, 7:], 1e-5)
    for got_block, want_block in zip(state, want_state, strict=True):
        for g_, w_ in zip(got_block, want_block, strict=True):
            _assert_close(g_, w_, 1e-5)
    if adapted:  # switched off (the reference model of DPO / GRPO), the step is the base's
        with adapter_disabled(model), torch.no_grad():
            base_logits = model.forward_state(idx, None)[0]
            got, _ = _steps(stepper(model).step, model, idx, 7)
        _assert_close(got, base_logits[:, 7:], 1e-5)
        assert ((base_logits - full).abs().max() > 1e-2).item()  # the adapter does change the logits


def test_bf16_weights_are_the_fp32_step_on_rounded_weights() -> None:
    """bf16 matrices are widened exactly and everything else runs in fp32: the bf16 step equals the
    fp32 step of the same model with its weights rounded to bf16, bit for bit."""
    model = _model().bfloat16()
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    got, _ = _steps(stepper(model).step, model, idx, 4)
    model32 = _model()
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    want, _ = _steps(stepper(model32).step, model, idx, 4)  # same bf16 prompt state
    assert torch.equal(got, want)


def test_declines_models_it_does_not_know() -> None:
    assert stepper(perturbed("x060", n_layer=1, n_embd=64, vocab=VOCAB, head_size=32)) is None
    model = _model()
    model.blocks[1].ffn.extra = nn.Parameter(torch.zeros(128))  # e.g. a newer block's tensor
    assert stepper(model) is None
    assert stepper(_model().half()) is None


def test_batched_greedy_equals_the_runtime_per_sequence(tmp_path) -> None:
    """Three prompts of different lengths decoded together (Decoder.feed_each + steps) give each one the
    runtime's greedy tokens."""
    from rwkv_peft.model import save_model

    model = _model(seed=8)
    save_model(model, tmp_path / "m.pth")
    runtime = load_runtime(tmp_path / "m.pth", "x070")
    prompts = [[5, 17, 42], [7, 7, 200, 3, 9, 11], [250]]
    dec = Decoder(model)
    assert dec.stepper is not None
    dec.feed_each(prompts)
    steps = dec.steps(lambda logits: logits.argmax(-1).tolist())
    got = list(zip(*(next(steps) for _ in range(8)), strict=True))
    for p, toks in zip(prompts, got, strict=True):
        assert list(toks) == runtime_generate(runtime, p, 8)
