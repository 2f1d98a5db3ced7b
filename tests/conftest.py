"""Shared fixtures: tiny RWKV models, perturbed away from their init so every parameter matters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rwkv_peft.model import RWKV7, VERSIONS, init_model


def perturbed(version: str, n_layer: int = 2, n_embd: int = 128, vocab: int = 300, head_size: int = 64,
              seed: int = 0, op: str = "torch", **dims: int) -> nn.Module:
    """An fp32 model of ``version`` with every parameter moved off its init (so zeros don't hide bugs)."""
    cfg = VERSIONS[version].config(n_layer, n_embd, vocab, head_size, **dims)
    model = init_model(cfg, seed=seed, op=op)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() < 2 else 0.05))
    return model


def perturbed_model(
    n_layer: int = 2,
    n_embd: int = 128,
    vocab: int = 300,
    head_size: int = 64,
    seed: int = 0,
    op: str = "torch",
) -> RWKV7:
    """``perturbed`` for x070, the version most tests use."""
    return perturbed("x070", n_layer, n_embd, vocab, head_size, seed, op)


@pytest.fixture
def tiny_model() -> RWKV7:
    return perturbed_model()


@pytest.fixture
def one_thread():
    """Tiny shapes gain nothing from threads, and on a shared 2-core box they lose a lot to contention.

    Modules of tiny-tensor tests use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def auto_precision_is_fp32():
    """``--precision auto`` reads /proc/cpuinfo: in tests it sees a CPU without bf16 arithmetic, so a run
    computes the same on every machine (test_precision fakes the flags it tests; subprocess runs pin
    ``--precision`` in their flags)."""
    from rwkv_peft import precision

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(precision, "CPUINFO", "/nonexistent/cpuinfo")
        yield
