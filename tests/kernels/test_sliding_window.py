"""Sliding-window attention (Gemma 3's local layers): Triton matches the torch reference, and the
reference sees exactly the W keys q_pos - W + 1 .. q_pos.

Batches mix whole prompts, prefill chunks over cached keys (their first query far past the
window), decode tokens and block-boundary cases, with windows from 1 key to more than a context;
the Triton tiles (16 keys here, 32-64 on a GPU) then start inside, at and across window edges.
Tolerances are test_triton_attention.py's: a key wrongly in or out of a window moves outputs by
O(0.1).
"""
from __future__ import annotations

import pytest
import torch

from batchllm.kernels import reference
from tests.kernels.conftest import ON_GPU
from tests.kernels.paged_batch import make_batch
from tests.kernels.test_triton_attention import DTYPE, HEAD_DIM, SCALE, TOL


def _requests(block_size: int) -> list[tuple[int, int]]:
    s = SCALE
    return [
        (37 * s, 37 * s),                      # whole prompt prefill
        (50 * s, 13),                          # prefill chunk over a cached prefix
        (19 * s, 1),                           # decode
        (block_size * 2, 1),                   # decode at an exact block boundary
        (1, 1),                                # first token of a one-token prompt
        (3 * block_size + 5, block_size + 5),  # chunk crossing block boundaries
    ]


def _check(kernels, poison_empty, batch, window: int | None, **kw) -> torch.Tensor:
    expected = reference.paged_attention(*batch.args(), sliding_window=window)
    with poison_empty():
        got = kernels.paged_attention(*batch.args(), sliding_window=window, **kw)
    assert not got.isnan().any(), "some output rows were never written (or read NaN cache slots)"
    torch.testing.assert_close(got.float(), expected.float(), **TOL)
    return expected


@pytest.mark.parametrize("window", [1, 5, 8, 16, 23 * SCALE])
@pytest.mark.parametrize("group,block_size", [(1, 16), (2, 8), (4, 16)])
def test_mixed_batch_with_window_matches_reference(triton_kernels, poison_empty, device, window, group,
                                                   block_size):
    batch = make_batch(_requests(block_size), num_heads=2 * group, num_kv_heads=2, head_dim=HEAD_DIM,
                       block_size=block_size, dtype=DTYPE, device=device, seed=window * 7 + group)
    expected = _check(triton_kernels, poison_empty, batch, window)
    # the window changes the result wherever a context is longer than it
    if window < 37 * SCALE:
        full = reference.paged_attention(*batch.args())
        assert (full.float() - expected.float()).abs().max() > 1e-2


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [4, 17, 40 * SCALE])
def test_decode_with_window_and_splits_matches_reference(triton_kernels, poison_empty, device, num_splits,
                                                         window):
    from batchllm.kernels.triton_attention import paged_attention_splits

    requests = [(c * SCALE, 1) for c in (1, 15, 16, 17, 40, 63, 100)]
    batch = make_batch(requests, num_heads=8, num_kv_heads=2, head_dim=HEAD_DIM, block_size=16,
                       dtype=DTYPE, device=device, seed=30 + window + num_splits)
    expected = reference.paged_attention(*batch.args(), sliding_window=window)
    with poison_empty():
        got = paged_attention_splits(*batch.args()[:7], 1, num_splits, sliding_window=window)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), expected.float(), **TOL)


def test_window_ignores_a_shared_prefix(triton_kernels, poison_empty, device):
    """A decode batch that shares its first blocks takes the plain path for a windowed layer: the
    shared-prefix kernel reads the prefix whole for every row, which a window must not."""
    requests = [(c * SCALE, 1) for c in (70, 45, 100, 52)]
    batch = make_batch(requests, num_heads=4, num_kv_heads=2, head_dim=HEAD_DIM, block_size=16,
                       dtype=DTYPE, device=device, seed=77)
    batch.block_tables[:, :2] = batch.block_tables[0, :2].clone()
    prefix = torch.tensor([32], dtype=torch.int32, device=device)
    _check(triton_kernels, poison_empty, batch, 20, shared_prefix_len=prefix)


def test_chunked_prefill_with_window_equals_one_pass(triton_kernels, device):
    """A prompt run in chunks (each attending to the keys of the chunks before) gives the rows of
    the whole-prompt pass, through either backend."""
    ctx, window = 45 * SCALE, 11
    whole = make_batch([(ctx, ctx)], num_heads=4, num_kv_heads=2, head_dim=HEAD_DIM, block_size=8,
                       dtype=DTYPE, device=device, seed=91)
    want = reference.paged_attention(*whole.args(), sliding_window=window)
    start = 0
    for size in (9, 20, 1, ctx - 30):
        end = start + size
        args = list(whole.args())
        args[0] = whole.q[start:end]
        args[4] = torch.tensor([end], dtype=torch.int32, device=device)
        args[5] = torch.tensor([0, size], dtype=torch.int32, device=device)
        args[7], args[8] = size, end
        for kernels in (reference, triton_kernels):
            got = kernels.paged_attention(*args, sliding_window=window)
            torch.testing.assert_close(got.float(), want[start:end].float(), **TOL)
        start = end


def test_reference_window_sees_exactly_the_last_w_keys():
    """Against attention computed by hand over the keys q_pos - W + 1 .. q_pos (so the Triton
    tests above compare with the right thing); W = 1 returns each query's own value."""
    batch = make_batch([(30, 30), (26, 1), (12, 5)], num_heads=2, num_kv_heads=1, head_dim=16,
                       block_size=8, dtype=torch.float32, device=torch.device("cpu"), seed=5)
    window = 6
    got = reference.paged_attention(*batch.args(), sliding_window=window)
    starts = batch.query_start_loc.tolist()
    for b, ctx in enumerate(batch.seq_lens.tolist()):
        keys = reference.gather_kv(batch.k_cache, batch.block_tables[b], ctx)[:, 0]
        vals = reference.gather_kv(batch.v_cache, batch.block_tables[b], ctx)[:, 0]
        q_len = starts[b + 1] - starts[b]
        for i in range(q_len):
            pos = ctx - q_len + i
            lo = max(0, pos - window + 1)
            q = batch.q[starts[b] + i]  # [H, D]
            w = torch.softmax(q @ keys[lo:pos + 1].T * batch.scale, dim=-1)
            torch.testing.assert_close(got[starts[b] + i], w @ vals[lo:pos + 1], atol=1e-5, rtol=1e-5)
    own = reference.paged_attention(*batch.args(), sliding_window=1)
    last = reference.gather_kv(batch.v_cache, batch.block_tables[1], 26)[25, 0]
    torch.testing.assert_close(own[30], last.expand(2, -1))


@pytest.mark.parametrize("bad", [0, -3])
def test_window_below_one_is_refused(triton_kernels, device, bad):
    batch = make_batch([(5, 5)], num_heads=2, num_kv_heads=1, head_dim=16, block_size=8,
                       dtype=torch.float32, device=device, seed=1)
    for kernels in (reference, triton_kernels):
        with pytest.raises(ValueError, match="sliding_window"):
            kernels.paged_attention(*batch.args(), sliding_window=bad)


@pytest.mark.skipif(not ON_GPU, reason="long contexts are too slow for the Triton interpreter")
def test_long_decode_with_window_takes_the_split_path(triton_kernels, poison_empty, device):
    batch = make_batch([(4000, 1), (2500, 1)], num_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                       dtype=torch.bfloat16, device=device, seed=99)
    _check(triton_kernels, poison_empty, batch, 1024)
