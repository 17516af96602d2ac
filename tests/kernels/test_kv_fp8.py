"""A float8 (e4m3) KV cache: writes saturate instead of overflowing, attention reads it back.

Triton's CPU interpreter rounds float8 wrongly where rounding carries into the exponent (1.98
becomes 1.0, not 2.0), so the Triton write into a float8 cache is checked on CUDA only; the
attention kernels read a cache written by the reference, which the interpreter handles exactly.
"""
from __future__ import annotations

import pytest
import torch

from batchllm.kernels import reference
from tests.kernels.conftest import ON_GPU
from tests.kernels.paged_batch import cache_like_engine, make_batch

FP8 = torch.float8_e4m3fn


def _caches(num_blocks: int, block_size: int, heads: int, dim: int, device) -> tuple:
    return tuple(cache_like_engine(num_blocks, block_size, heads, dim, 0.0, FP8, device) for _ in range(2))


def test_reference_write_saturates_and_skips_padding():
    k = torch.tensor([[[1000.0, -1e4, 3.3, 0.01]], [[1.0, 2.0, 3.0, 4.0]]])
    v = -k
    k_cache, v_cache = _caches(2, 2, 1, 4, "cpu")
    reference.write_kv(k, v, k_cache, v_cache, torch.tensor([3, -1]))
    assert k_cache[1, 1, 0].float().tolist() == [448.0, -448.0, 3.25, 0.009765625]
    assert v_cache[1, 1, 0].float().tolist() == [-448.0, 448.0, -3.25, -0.009765625]
    assert k_cache.float().abs().sum() == k_cache[1, 1].float().abs().sum()  # slot -1: nothing


@pytest.mark.skipif(not ON_GPU, reason="the Triton interpreter's float8 rounding is not the GPU's")
def test_triton_write_matches_reference_bytes(triton_kernels, device):
    g = torch.Generator().manual_seed(3)
    k = (torch.randn(37, 4, 64, generator=g) * 200).bfloat16().to(device)  # many beyond +-448
    v = torch.randn(37, 4, 64, generator=g).bfloat16().to(device)
    slots = torch.randperm(8 * 16, generator=g)[:37]
    slots[5] = -1
    slots = slots.to(device)
    exp, got = _caches(8, 16, 4, 64, device), _caches(8, 16, 4, 64, device)
    reference.write_kv(k, v, *exp, slots)
    triton_kernels.write_kv(k, v, *got, slots)
    for e, x in zip(exp, got):
        assert torch.equal(e.view(torch.uint8), x.view(torch.uint8))
    assert got[0].float().abs().max() == 448.0


@pytest.mark.parametrize("requests,head_dim", [
    ([(37, 37), (20, 1), (70, 5)], 32),  # prefill, decode and a chunk after a cached prefix
    ([(33, 1), (64, 1), (9, 1)], 32),  # decode only
    ([(33, 1), (64, 1), (9, 1)], 128),  # decode only, the 8B shape's head size (its own tiles)
])
def test_attention_over_fp8_cache(triton_kernels, device, requests, head_dim):
    b = make_batch(requests, num_heads=8, num_kv_heads=2, head_dim=head_dim, block_size=16,
                   dtype=torch.float32, device=torch.device("cpu"), seed=len(requests))
    fp8 = [torch.full_like(b.k_cache, float("nan"), dtype=FP8) for _ in range(2)]
    written = ~b.k_cache.isnan()
    for src, dst in zip((b.k_cache, b.v_cache), fp8):
        dst.view(torch.uint8)[written] = reference.to_cache_dtype(src[written], FP8).view(torch.uint8)
    args = [b.q, *fp8, b.block_tables, b.seq_lens, b.query_start_loc]
    exact = reference.paged_attention(*args, b.scale, b.max_query_len, b.max_seq_len)
    got = triton_kernels.paged_attention(*[a.to(device) for a in args], b.scale, b.max_query_len,
                                         b.max_seq_len).cpu()
    # the kernel computes in float16 over a float8 cache (q rounded to 11 bits)
    torch.testing.assert_close(got, exact, atol=3e-3, rtol=3e-3)
    # against the full-precision cache: off by float8's rounding (3 mantissa bits), not more
    full = reference.paged_attention(*b.args())
    err = (exact - full).abs().max().item()
    assert 0 < err < 0.15
