"""Gemma's elementwise kernels: GELU(tanh)-and-mul and RMSNorm with a (1 + weight) scale, Triton
against the torch references, and the references against HF's Gemma 3 modules.

Tolerances are test_triton_elementwise.py's (1e-5 float32, 1e-2 bf16).
"""
from __future__ import annotations

import pytest
import torch

from batchllm.kernels import reference
from tests.kernels.test_triton_elementwise import DTYPES, HIDDEN, ROWS, _tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_tanh_and_mul_matches_reference(triton_kernels, poison_empty, device, dtype):
    g = torch.Generator().manual_seed(43)
    inter = 5632 if device.type == "cuda" else 40
    x = (torch.randn(ROWS, 2 * inter, generator=g) * 4).to(dtype).to(device)  # tails of tanh too
    x[0, :3] = torch.tensor([30.0, -30.0, 0.0])  # saturated and zero gates
    with poison_empty():
        got = triton_kernels.gelu_tanh_and_mul(x)
    torch.testing.assert_close(got, reference.gelu_tanh_and_mul(x), **_tol(dtype))


def test_gelu_tanh_reference_is_hf_gelu_pytorch_tanh():
    from transformers.activations import ACT2FN

    g = torch.Generator().manual_seed(44)
    gate, up = torch.randn(2, 9, 24, generator=g)
    want = ACT2FN["gelu_pytorch_tanh"](gate) * up
    # the same function; on a strided half of cat(gate, up) torch takes another vector path (1 ulp)
    torch.testing.assert_close(reference.gelu_tanh_and_mul(torch.cat([gate, up], -1)), want,
                               atol=1e-6, rtol=1e-6)
    wrong = torch.nn.functional.gelu(gate) * up  # the exact (erf) GELU differs by far more
    assert (wrong - want).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_weight_offset_matches_reference(triton_kernels, poison_empty, device, dtype):
    g = torch.Generator().manual_seed(45)
    x, res = ((torch.randn(ROWS, HIDDEN, generator=g) * 3).to(dtype).to(device) for _ in range(2))
    w = (torch.randn(HIDDEN, generator=g) * 0.1).to(dtype).to(device)
    with poison_empty():
        got = triton_kernels.rms_norm(x, w, 1e-6, weight_offset=1.0)
        y, new_res = triton_kernels.fused_add_rms_norm(x, res, w, 1e-6, weight_offset=1.0)
    torch.testing.assert_close(got, reference.rms_norm(x, w, 1e-6, weight_offset=1.0), **_tol(dtype))
    exp_y, exp_res = reference.fused_add_rms_norm(x, res, w, 1e-6, weight_offset=1.0)
    torch.testing.assert_close(y, exp_y, **_tol(dtype))
    torch.testing.assert_close(new_res, exp_res, atol=0, rtol=0)
    # the offset matters: without it the scale is w, not 1 + w
    assert (reference.rms_norm(x, w, 1e-6).float() - got.float()).abs().max() > 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_offset_reference_is_hf_gemma3_norm(dtype):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    g = torch.Generator().manual_seed(46)
    norm = Gemma3RMSNorm(32, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=g) * 0.3)
    x = (torch.randn(4, 3, 32, generator=g) * 2).to(dtype)
    got = reference.rms_norm(x, norm.weight, 1e-6, weight_offset=1.0)
    torch.testing.assert_close(got, norm(x), atol=0, rtol=0)
