"""Kernel tests run on CUDA when there is one, else through Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture
def triton_kernels():
    if not HAS_TRITON:
        pytest.skip("triton is not importable: the Triton kernels cannot be tested here")
    from batchllm.kernels import get_kernels

    return get_kernels("triton")


@pytest.fixture
def poison_empty(monkeypatch):
    """Within `with poison_empty():`, torch.empty returns NaN-filled float tensors, so output
    elements a kernel forgets to write show up as NaN instead of stale memory."""
    import contextlib

    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    @contextlib.contextmanager
    def poisoned():
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", nan_empty)
            yield

    return poisoned
