"""Decode attention with a shared prefix (cascade): the same outputs as plain paged attention.

The batch's requests share their first P cache blocks (their block tables agree there), as after
a prefix-cache hit or a fork for n samples. The Triton path reads those keys once for the whole
batch and merges that partial with each request's own keys; a wrong split of the keys (a key
counted twice or skipped), a wrong merge or a wrong row-to-head mapping moves outputs by O(0.1),
far beyond the tolerances of test_triton_attention.py, which are reused here.
"""
from __future__ import annotations

import pytest
import torch

from batchllm.kernels import reference
from tests.kernels.conftest import ON_GPU
from tests.kernels.paged_batch import make_batch
from tests.kernels.test_triton_attention import DTYPE, HEAD_DIM, SCALE, TOL

BLOCK = 16


def _shared_batch(ctx: list[int], prefix_blocks: int, *, group: int, dtype=DTYPE, seed: int = 0):
    """A decode batch whose requests all read the first prefix_blocks blocks of request 0."""
    b = make_batch([(c, 1) for c in ctx], num_heads=2 * group, num_kv_heads=2, head_dim=HEAD_DIM,
                   block_size=BLOCK, dtype=dtype, device=torch.device("cpu"), seed=seed)
    b.block_tables[:, :prefix_blocks] = b.block_tables[0, :prefix_blocks]
    return b


def _run(triton_attention, b, device, prefix_len: int, **kw):
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in b.args()[:7]]
    plen = torch.tensor([prefix_len], dtype=torch.int32, device=device)
    return triton_attention.shared_prefix_attention(*args, plen, **kw)


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("prefix_splits,own_splits", [(1, 1), (3, 1), (2, 3)])
def test_shared_prefix_matches_plain_attention(triton_kernels, poison_empty, device, group, prefix_splits,
                                               own_splits):
    from batchllm.kernels import triton_attention

    p = 3  # shared blocks; contexts end just after the prefix, at a block edge and well past it
    ctx = [c * SCALE if c * SCALE > p * BLOCK else c for c in (p * BLOCK + 1, p * BLOCK + 16, 90, 130, 77)]
    b = _shared_batch(ctx, p, group=group, seed=group * 10 + prefix_splits)
    expected = reference.paged_attention(*b.args())
    with poison_empty():
        got = _run(triton_attention, b, device, p * BLOCK, prefix_splits=prefix_splits, own_splits=own_splits)
    assert not got.isnan().any(), "some rows were never written or read NaN slots"
    torch.testing.assert_close(got.float().cpu(), expected.float(), **TOL)


def test_shared_prefix_through_paged_attention(triton_kernels, device):
    """The kernel set's paged_attention takes the shared-prefix path when given a prefix length,
    and a zero-length prefix is plain attention; in either, with requests started in any order."""
    b = _shared_batch([70, 45, 100], 2, group=2, seed=5)
    expected = reference.paged_attention(*b.args())
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in b.args()]
    order = torch.tensor([2, 0, 1], dtype=torch.int32, device=device)  # longest context first
    for plen in (2 * BLOCK, 0):
        for seq_order in (None, order):
            got = triton_kernels.paged_attention(
                *args, shared_prefix_len=torch.tensor([plen], dtype=torch.int32, device=device),
                seq_order=seq_order)
            torch.testing.assert_close(got.float().cpu(), expected.float(), **TOL)


def test_shared_prefix_fp8_cache(triton_kernels, device):
    """With a float8 cache the shared-prefix path matches plain attention over the same cache."""
    from batchllm.kernels import triton_attention

    b = _shared_batch([80, 50, 66, 49], 3, group=4, dtype=torch.float32, seed=9)
    b.k_cache = reference.to_cache_dtype(b.k_cache.nan_to_num(), torch.float8_e4m3fn)
    b.v_cache = reference.to_cache_dtype(b.v_cache.nan_to_num(), torch.float8_e4m3fn)
    b.q = b.q.to(torch.bfloat16) if ON_GPU else b.q
    expected = reference.paged_attention(*b.args())
    got = _run(triton_attention, b, device, 3 * BLOCK, prefix_splits=2)
    torch.testing.assert_close(got.float().cpu(), expected.float(), atol=3e-2, rtol=3e-2)
