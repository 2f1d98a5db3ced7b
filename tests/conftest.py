"""Shared fixtures (helpers.py holds the shared functions: tests import that module, never this one)."""

from __future__ import annotations

import pytest
import torch


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
