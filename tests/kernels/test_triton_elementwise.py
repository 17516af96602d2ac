"""Triton write_kv, RMSNorm, fused add+RMSNorm, rotary and SiLU-and-mul match the torch references.

float32 tolerances (1e-5) cover a different reduction order in the RMS mean; bf16 ones (1e-2)
cover one rounding of the output. write_kv is a copy, so it must match exactly.
"""
from __future__ import annotations

import pytest
import torch

from batchllm.kernels import reference
from tests.kernels.conftest import ON_GPU
from tests.kernels.paged_batch import cache_like_engine

DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]
ROWS = 515 if ON_GPU else 7
HIDDEN = 2048 if ON_GPU else 48  # not a power of two on CPU: masked tail lanes


def _tol(dtype: torch.dtype) -> dict:
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("head_major", [True, False])
@pytest.mark.parametrize("block_size", [16, 8])
def test_write_kv_matches_reference_and_skips_padding(triton_kernels, device, block_size, head_major):
    g = torch.Generator().manual_seed(block_size)
    num_blocks, hkv, d, t = 6, 3, 16, 11
    k = torch.randn(t, hkv, d, generator=g)
    v = torch.randn(t, hkv, d, generator=g)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:t]
    slots[[2, 7]] = -1  # padding tokens
    kv = [x.to(device) for x in (k, v)]
    if head_major:  # as the engine stores it
        got_k, got_v, exp_k, exp_v = (cache_like_engine(num_blocks, block_size, hkv, d, float("nan"), torch.float32,
                                                        device) for _ in range(4))
    else:
        got_k, got_v, exp_k, exp_v = (torch.full((num_blocks, block_size, hkv, d), float("nan"), device=device)
                                      for _ in range(4))
    reference.write_kv(*kv, exp_k, exp_v, slots.to(device))
    triton_kernels.write_kv(*kv, got_k, got_v, slots.to(device))
    torch.testing.assert_close(got_k, exp_k, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(got_v, exp_v, equal_nan=True, atol=0, rtol=0)
    assert got_k.isnan().sum() == exp_k.isnan().sum() > 0  # untouched slots stay untouched
    for s in slots.tolist():  # each token's K sits at its slot, whatever the memory order
        if s >= 0:
            t = slots.tolist().index(s)
            assert torch.equal(got_k[s // block_size, s % block_size].cpu(), k[t])


def test_write_kv_from_strided_views_casts_to_cache_dtype(triton_kernels, device):
    """K and V are usually slices of one fused qkv output; the cache may be narrower than them."""
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(9, 4 + 2 + 2, 16, generator=g).to(device)
    k, v = qkv[:, 4:6], qkv[:, 6:8]
    slots = torch.arange(9, device=device) * 2
    got = [torch.zeros(3, 8, 2, 16, dtype=torch.float16, device=device) for _ in range(2)]
    exp = [torch.zeros(3, 8, 2, 16, dtype=torch.float16, device=device) for _ in range(2)]
    triton_kernels.write_kv(k, v, *got, slots)
    reference.write_kv(k, v, *exp, slots)
    assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference(triton_kernels, poison_empty, device, dtype):
    g = torch.Generator().manual_seed(21)
    x = (torch.randn(ROWS, HIDDEN, generator=g) * 3).to(dtype).to(device)
    w = torch.randn(HIDDEN, generator=g).to(dtype).to(device)
    with poison_empty():
        got = triton_kernels.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(got, reference.rms_norm(x, w, 1e-6), **_tol(dtype))


def test_rms_norm_over_head_dim_of_3d_input(triton_kernels, poison_empty, device):
    """Qwen3's q/k norm: [T, H, D] normalized over D."""
    g = torch.Generator().manual_seed(22)
    x = torch.randn(5, 3, 32, generator=g).to(device)
    w = torch.randn(32, generator=g).to(device)
    with poison_empty():
        got = triton_kernels.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(got, reference.rms_norm(x, w, 1e-6), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_matches_reference(triton_kernels, poison_empty, device, dtype):
    g = torch.Generator().manual_seed(23)
    x, res = (torch.randn(ROWS, HIDDEN, generator=g).to(dtype).to(device) for _ in range(2))
    w = torch.randn(HIDDEN, generator=g).to(dtype).to(device)
    x_before, res_before = x.clone(), res.clone()
    with poison_empty():
        y, new_res = triton_kernels.fused_add_rms_norm(x, res, w, 1e-5)
    exp_y, exp_res = reference.fused_add_rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(new_res, exp_res, atol=0, rtol=0)  # one add in the input dtype
    torch.testing.assert_close(y, exp_y, **_tol(dtype))
    assert torch.equal(x, x_before) and torch.equal(res, res_before)  # inputs are not modified


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_reference_on_strided_qk(triton_kernels, poison_empty, device, dtype):
    g = torch.Generator().manual_seed(31)
    t, h, hkv, d = (37, 8, 2, 128) if ON_GPU else (6, 4, 2, 16)
    qkv = torch.randn(t, h + 2 * hkv, d, generator=g).to(dtype).to(device)
    q, k = qkv[:, :h], qkv[:, h:h + hkv]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    angles = torch.arange(64).float()[:, None] * inv_freq[None, :]
    cache = torch.cat((angles.cos(), angles.sin()), dim=-1).to(device)
    positions = torch.randint(0, 64, (t,), generator=g).to(device)
    with poison_empty():
        got_q, got_k = triton_kernels.rotary_embedding(q, k, positions, cache)
    exp_q, exp_k = reference.rotary_embedding(q, k, positions, cache)
    torch.testing.assert_close(got_q, exp_q, **_tol(dtype))
    torch.testing.assert_close(got_k, exp_k, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_reference(triton_kernels, poison_empty, device, dtype):
    g = torch.Generator().manual_seed(41)
    inter = 5632 if ON_GPU else 40
    x = torch.randn(ROWS, 2 * inter, generator=g).to(dtype).to(device)
    with poison_empty():
        got = triton_kernels.silu_and_mul(x)
    torch.testing.assert_close(got, reference.silu_and_mul(x), **_tol(dtype))
