"""get_kernels / triton_available: the backend switch the engine relies on."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from batchllm.kernels import BACKENDS, get_kernels, reference, triton_available
from tests.kernels.conftest import HAS_TRITON


def test_torch_backend_is_the_reference():
    k = get_kernels("torch")
    assert k.name == "torch" and k.paged_attention is reference.paged_attention
    assert k.silu_and_mul is reference.silu_and_mul


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="'cuda'.*torch, triton"):
        get_kernels("cuda")


def test_triton_availability_follows_device_and_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_available("cpu")
    assert triton_available(torch.device("cuda")) == HAS_TRITON
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available("cpu") == HAS_TRITON
    assert set(BACKENDS) == {"torch", "triton"}


def test_importing_kernels_does_not_import_triton():
    code = "import sys, batchllm.kernels; sys.exit(1 if 'triton' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
