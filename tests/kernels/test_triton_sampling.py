"""Triton greedy_sample matches the torch reference: the same tokens (ties to the first index),
log-probs within float32 rounding, and the same bad rows for NaN, +inf and all -inf rows.

On CPU the interpreter runs small rows with a 64-wide tile, so every row spans several tiles
and most end in a partial one.
"""
from __future__ import annotations

import pytest
import torch

from batchllm.kernels import greedy_sample_for, reference
from tests.kernels.conftest import HAS_TRITON, ON_GPU

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VOCABS = [128256, 50000, 4096] if ON_GPU else [64, 100, 300, 5]
MULTI_TILE_VOCAB = 10000 if ON_GPU else 300  # several tiles, the last one partial
BLOCK = None if ON_GPU else 64  # None: the kernel's own tile (4096)
LOGPROB_TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture
def greedy_sample():
    if not HAS_TRITON:
        pytest.skip("triton is not importable: the Triton kernels cannot be tested here")
    from batchllm.kernels import triton_sampling

    return lambda logits: triton_sampling.greedy_sample(logits, block=BLOCK)


def _assert_matches_reference(got, logits: torch.Tensor) -> None:
    tokens, logprobs, bad = got
    exp_tokens, exp_logprobs, exp_bad = reference.greedy_sample(logits)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32 and bad.dtype == torch.bool
    assert torch.equal(bad, exp_bad)
    assert torch.equal(tokens, exp_tokens)
    torch.testing.assert_close(logprobs, exp_logprobs, equal_nan=True, **LOGPROB_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
def test_random_logits_match_reference(greedy_sample, poison_empty, device, dtype, vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(7, vocab, generator=g) * 4).to(dtype).to(device)
    with poison_empty():
        got = greedy_sample(logits)
    _assert_matches_reference(got, logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_go_to_the_first_index(greedy_sample, device, dtype):
    vocab = MULTI_TILE_VOCAB
    logits = torch.zeros(4, vocab)
    last = vocab - 1
    logits[0, [3, 9, last]] = 5.0  # within one tile and across tiles
    logits[1, [last - 1, last]] = 5.0  # both in the partial last tile
    logits[2] = 1.0  # all equal: token 0
    logits[3, [vocab // 2, 2]] = 7.0  # the later tile's index is listed first; the earlier wins
    logits = logits.to(dtype).to(device)
    _assert_matches_reference(greedy_sample(logits), logits)
    assert greedy_sample(logits)[0].tolist() == [3, last - 1, 0, 2]


def test_close_float32_values_are_not_merged_into_a_tie(greedy_sample, device):
    """Adjacent float32 values stay distinct (no scaling before the argmax)."""
    vocab = MULTI_TILE_VOCAB
    logits = torch.zeros(1, vocab)
    logits[0, 1] = 3.0
    logits[0, vocab - 1] = torch.nextafter(torch.tensor(3.0), torch.tensor(4.0))
    logits = logits.to(device)
    assert greedy_sample(logits)[0].tolist() == [vocab - 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_rows_match_reference(greedy_sample, device, dtype):
    vocab = MULTI_TILE_VOCAB
    inf, nan = float("inf"), float("nan")
    logits = torch.randn(9, vocab, generator=torch.Generator().manual_seed(7))
    logits[0] = -inf  # all -inf: bad
    logits[1, : vocab - 3] = -inf  # only the tail finite: fine
    logits[2, 0] = nan  # NaN first, below the max
    logits[3, vocab - 1] = nan  # NaN in the partial last tile
    logits[4, vocab // 2] = inf  # +inf: bad
    logits[5, [1, vocab - 1]] = torch.tensor([inf, -inf])
    logits[6] = -inf
    logits[6, 5] = nan  # NaN among -inf
    logits[7, 2] = -inf  # a few -inf: fine
    logits[8, [0, 1]] = torch.tensor([nan, inf])
    logits = logits.to(dtype).to(device)
    tokens, logprobs, bad = greedy_sample(logits)
    assert bad.tolist() == [True, False, True, True, True, True, True, False, True]
    assert tokens[bad].eq(0).all()
    _assert_matches_reference((tokens, logprobs, bad), logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_row_view_matches_its_contiguous_copy(greedy_sample, device, dtype):
    """Logits may be a slice of a larger buffer: rows [::2] of a wider tensor, from column 3."""
    vocab = MULTI_TILE_VOCAB
    g = torch.Generator().manual_seed(11)
    big = torch.randn(10, vocab + 17, generator=g).to(dtype).to(device)
    view = big[::2, 3:3 + vocab]
    assert not view.is_contiguous()
    got = greedy_sample(view)
    _assert_matches_reference(got, view)
    for a, b in zip(got, greedy_sample(view.contiguous())):
        assert torch.equal(a, b)


def test_empty_batch(greedy_sample, device):
    tokens, logprobs, bad = greedy_sample(torch.zeros(0, VOCABS[0], device=device))
    assert tokens.shape == logprobs.shape == bad.shape == (0,)


def test_greedy_sample_for_picks_triton_on_cuda_only(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert greedy_sample_for("cpu") is reference.greedy_sample  # the interpreter would only slow it
    if ON_GPU:
        from batchllm.kernels import triton_sampling

        assert greedy_sample_for("cuda") is triton_sampling.greedy_sample
