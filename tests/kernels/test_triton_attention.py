"""Triton paged attention matches the torch reference on mixed, decode-only and split-KV batches.

Tolerances: float32 runs agree to ~1e-6 (only the summation order differs: tiled online softmax
vs one softmax), so 1e-4 leaves margin without hiding a wrong mask or a missed key, which move
outputs by O(0.1). bf16 runs round P to bf16 before the P·V product and round the output, so
they get 2e-2 (a few bf16 ulps of values of size ~1).
"""
from __future__ import annotations

import pytest
import torch

from batchllm.kernels import reference
from tests.kernels.conftest import ON_GPU
from tests.kernels.paged_batch import make_batch

HEAD_DIM = 128 if ON_GPU else 32
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
TOL = dict(atol=2e-2, rtol=2e-2) if ON_GPU else dict(atol=1e-4, rtol=1e-4)
SCALE = 8 if ON_GPU else 1  # GPU runs use longer contexts and more requests


def _mixed_requests(block_size: int) -> list[tuple[int, int]]:
    s = SCALE
    return [
        (37 * s, 37 * s),                 # whole prompt prefill, partial last block
        (50 * s, 13),                     # prefill chunk over a cached prefix
        (19 * s, 1),                      # decode
        (block_size * 2, 1),              # decode at an exact block boundary
        (1, 1),                           # first token of a one-token prompt
        (3 * block_size + 5, block_size + 5),  # chunk crossing block boundaries
    ]


def _check(kernels, poison_empty, batch) -> None:
    expected = reference.paged_attention(*batch.args())
    with poison_empty():
        got = kernels.paged_attention(*batch.args())
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert not got.isnan().any(), "some output rows were never written (or read NaN cache slots)"
    torch.testing.assert_close(got.float(), expected.float(), **TOL)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("block_size", [16, 8])
def test_mixed_batch_matches_reference(triton_kernels, poison_empty, device, group, block_size):
    num_kv = 2
    batch = make_batch(_mixed_requests(block_size), num_heads=num_kv * group, num_kv_heads=num_kv,
                       head_dim=HEAD_DIM, block_size=block_size, dtype=DTYPE, device=device,
                       seed=1000 * group + block_size)
    _check(triton_kernels, poison_empty, batch)


@pytest.mark.parametrize("group", [1, 4])
def test_decode_only_batch_matches_reference(triton_kernels, poison_empty, device, group):
    requests = [(c * SCALE, 1) for c in (1, 15, 16, 17, 40, 63)]
    batch = make_batch(requests, num_heads=2 * group, num_kv_heads=2, head_dim=HEAD_DIM, block_size=16,
                       dtype=DTYPE, device=device, seed=7 + group)
    _check(triton_kernels, poison_empty, batch)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_launch_order_changes_nothing(triton_kernels, poison_empty, device, num_splits):
    """seq_order (the order requests start in, longest context first in the engine) is a
    permutation of the rows: each request's output must stay its own, whatever the order."""
    from batchllm.kernels.triton_attention import paged_attention_splits
    from batchllm.runner.model_runner import longest_first

    requests = [(c * SCALE, 1) for c in (5, 70, 16, 33, 1, 47)]
    batch = make_batch(requests, num_heads=8, num_kv_heads=2, head_dim=HEAD_DIM, block_size=16,
                       dtype=DTYPE, device=device, seed=21 + num_splits)
    order = longest_first(batch.seq_lens.cpu().numpy())
    assert [requests[i][0] for i in order] == sorted((c for c, _ in requests), reverse=True)
    expected = reference.paged_attention(*batch.args())
    with poison_empty():
        got = paged_attention_splits(*batch.args()[:7], 1, num_splits,
                                     seq_order=torch.from_numpy(order).to(device))
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), expected.float(), **TOL)


def test_group_of_three_heads(triton_kernels, poison_empty, device):
    """A group size that is not a power of two (padded rows must stay unwritten)."""
    batch = make_batch([(30, 30), (21, 1)], num_heads=6, num_kv_heads=2, head_dim=HEAD_DIM, block_size=8,
                       dtype=DTYPE, device=device, seed=3)
    _check(triton_kernels, poison_empty, batch)


@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_kv_matches_reference(triton_kernels, poison_empty, device, num_splits):
    from batchllm.kernels.triton_attention import paged_attention_splits

    # contexts shorter than num_splits tiles leave some splits empty; the merge must ignore them
    requests = [(c * SCALE, 1) for c in (70, 3, 33, 100)]
    batch = make_batch(requests, num_heads=4, num_kv_heads=2, head_dim=HEAD_DIM, block_size=16,
                       dtype=DTYPE, device=device, seed=50 + num_splits)
    expected = reference.paged_attention(*batch.args())
    with poison_empty():
        got = paged_attention_splits(batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
                                     batch.seq_lens, batch.query_start_loc, batch.scale, 1, num_splits)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), expected.float(), **TOL)


def test_split_heuristic_only_for_small_long_decode_batches():
    from batchllm.kernels.triton_attention import MIN_SPLIT_TOKENS, choose_num_splits

    long_ctx = 32 * MIN_SPLIT_TOKENS
    assert choose_num_splits(2, 8, 1, long_ctx, num_sms=132) > 1          # few requests, long context
    assert choose_num_splits(2, 8, 16, long_ctx, num_sms=132) == 1        # a prefill is in the batch
    assert choose_num_splits(64, 8, 1, long_ctx, num_sms=132) == 1        # already fills the GPU
    assert choose_num_splits(2, 8, 1, MIN_SPLIT_TOKENS, num_sms=132) == 1  # context too short to split
    # never more splits than MIN_SPLIT_TOKENS-sized pieces of the context
    assert choose_num_splits(1, 1, 1, 3 * MIN_SPLIT_TOKENS, num_sms=132) == 3


@pytest.mark.skipif(not ON_GPU, reason="long contexts are too slow for the Triton interpreter")
def test_public_wrapper_takes_split_path_on_long_decode(triton_kernels, poison_empty, device):
    batch = make_batch([(4000, 1), (2500, 1)], num_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                       dtype=torch.bfloat16, device=device, seed=99)
    _check(triton_kernels, poison_empty, batch)


def test_float16_inputs(triton_kernels, poison_empty, device):
    batch = make_batch([(20, 20), (9, 1)], num_heads=4, num_kv_heads=2, head_dim=HEAD_DIM, block_size=8,
                       dtype=torch.float16, device=device, seed=11)
    expected = reference.paged_attention(*batch.args())
    with poison_empty():
        got = triton_kernels.paged_attention(*batch.args())
    assert got.dtype == torch.float16 and not got.isnan().any()
    torch.testing.assert_close(got.float(), expected.float(), atol=1e-2, rtol=1e-2)
