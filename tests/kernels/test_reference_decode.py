"""The torch reference's batched decode path equals its per-request path, also over poisoned slots."""
from __future__ import annotations

import torch

from batchllm.kernels.reference import paged_attention


def test_batched_decode_equals_per_request_attention():
    g = torch.Generator().manual_seed(5)
    num_blocks, bs, hkv, d, h = 40, 4, 2, 8, 6
    k_cache = torch.randn(num_blocks, bs, hkv, d, generator=g)
    v_cache = torch.randn(num_blocks, bs, hkv, d, generator=g)
    seq_lens = torch.tensor([1, 5, 13, 8], dtype=torch.int32)
    tables = torch.randperm(num_blocks, generator=g)[:16].view(4, 4).to(torch.int32)
    # poison every slot past each request's length: a reused block may hold NaN from before
    for b, n in enumerate(seq_lens.tolist()):
        for pos in range(n, 16):
            blk = tables[b, pos // bs]
            k_cache[blk, pos % bs] = float("nan")
            v_cache[blk, pos % bs] = float("nan")
    tables[0, 1:] = 10_000  # entries past the last block are arbitrary, even out of range
    q = torch.randn(4, h, d, generator=g)
    qsl = torch.arange(5, dtype=torch.int32)
    batched = paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, 0.3, 1, 13)
    tables[0, 1:] = 0
    looped = paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, 0.3, 2, 13)  # per request
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)
