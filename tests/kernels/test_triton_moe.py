"""Fused mixture-of-experts: the torch reference equals the per-token formula, the Triton kernel
equals the reference, and the expert grouping places every token-expert pair exactly once.

float32 tolerance (1e-5) covers a different summation order in the products; bf16 (GPU only)
covers one rounding of the intermediate and of each expert's output.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchllm.kernels import get_kernels, reference
from tests.kernels.conftest import HAS_TRITON, ON_GPU

DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]
# (tokens, experts, top_k, hidden, intermediate): hidden and intermediate are not multiples of
# the CPU tiles (32), so masked tails are exercised; one token alone is a decode step
CASES = [(7, 4, 2, 48, 40), (1, 8, 2, 48, 40), (13, 8, 3, 32, 24)]
if ON_GPU:
    CASES += [(300, 128, 8, 2048, 768), (5, 8, 2, 4096, 1792)]


def _inputs(tokens: int, experts: int, top_k: int, hidden: int, inter: int, seed: int,
            dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5
    logits = torch.randn(tokens, experts, generator=g)
    weights, ids = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return ([t.to(dtype).to(device) for t in (x, w13, w2)]
            + [weights.to(device), ids.to(torch.int32 if seed % 2 else torch.int64).to(device)])


def _per_token(x, w13, w2, weights, ids) -> torch.Tensor:
    """The definition, one token and one chosen expert at a time."""
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate, up = w13[e, :inter] @ x[t], w13[e, inter:] @ x[t]
            out[t] += weights[t, k] * (w2[e] @ (F.silu(gate) * up))
    return out


def test_reference_equals_per_token_formula():
    x, w13, w2, weights, ids = _inputs(9, 6, 3, 16, 12, seed=1)
    torch.testing.assert_close(reference.fused_moe(x, w13, w2, weights, ids),
                               _per_token(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


def test_reference_skips_unused_experts_and_empty_batches():
    x, w13, w2, weights, ids = _inputs(5, 6, 2, 16, 12, seed=2)
    ids = ids.clamp(max=1)  # only experts 0 and 1 are hit (both picks may be the same expert)
    torch.testing.assert_close(reference.fused_moe(x, w13, w2, weights, ids),
                               _per_token(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)
    assert reference.fused_moe(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 16)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
@pytest.mark.parametrize("block_m", [16, 32])
def test_align_groups_every_pair_once_by_expert(block_m):
    from batchllm.kernels.triton_moe import moe_align_block_size

    g = torch.Generator().manual_seed(block_m)
    experts, top_k = 8, 2
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(37)])
    ids[ids == 3] = 4  # expert 3 unused: it must get no tile
    sorted_ids, expert_ids, num_padded = moe_align_block_size(ids, experts, block_m)
    flat = ids.reshape(-1)
    counts = torch.bincount(flat, minlength=experts)
    assert int(num_padded) == int(((counts + block_m - 1) // block_m * block_m).sum())
    used = sorted_ids[:int(num_padded)]
    real = used[used < flat.numel()]
    assert sorted(real.tolist()) == list(range(flat.numel()))  # every pair exactly once
    assert (sorted_ids[int(num_padded):] == flat.numel()).all()  # the rest is padding
    tiles = used.view(-1, block_m)
    for tile, expert in zip(tiles, expert_ids[:tiles.shape[0]].tolist()):
        pairs = tile[tile < flat.numel()].long()
        assert len(pairs) > 0 and (flat[pairs] == expert).all()
    assert 3 not in expert_ids[:tiles.shape[0]].tolist()
    assert (expert_ids[tiles.shape[0]:] == experts).all()  # tiles past the end name no expert


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_triton_fused_moe_matches_reference(triton_kernels, poison_empty, device, dtype, case):
    x, w13, w2, weights, ids = _inputs(*case, seed=sum(case), dtype=dtype, device=device)
    with poison_empty():
        got = triton_kernels.fused_moe(x, w13, w2, weights, ids)
    expected = reference.fused_moe(x, w13, w2, weights, ids)
    assert got.dtype == dtype and got.shape == x.shape
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, expected, **tol)


def test_triton_fused_moe_reads_strided_tokens(triton_kernels, device):
    """The router's input may be a column slice of a wider tensor (row stride != hidden)."""
    x, w13, w2, weights, ids = _inputs(6, 4, 2, 32, 24, seed=7, device=device)
    wide = torch.cat([x, torch.full_like(x, float("nan"))], dim=1)
    got = triton_kernels.fused_moe(wide[:, :32], w13, w2, weights, ids)
    torch.testing.assert_close(got, reference.fused_moe(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


def test_triton_fused_moe_refuses_mismatched_shapes(triton_kernels, device):
    x, w13, w2, weights, ids = _inputs(3, 4, 2, 32, 24, seed=9, device=device)
    with pytest.raises(ValueError, match=r"w2 \(4, 24, 32\)"):
        triton_kernels.fused_moe(x, w13, w2.transpose(1, 2), weights, ids)
    assert triton_kernels.fused_moe(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 32)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA GPU")
def test_triton_fused_moe_replays_in_a_cuda_graph(triton_kernels, device):
    """Decode steps are captured: no host sync, and a replay routes the new ids, not the captured ones."""
    shape = (64, 16, 4, 256, 128)
    x, w13, w2, weights, ids = _inputs(*shape, seed=3, device=device)
    triton_kernels.fused_moe(x, w13, w2, weights, ids)  # compiles the kernels
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside raises
    try:
        triton_kernels.fused_moe(x, w13, w2, weights, ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_kernels.fused_moe(x, w13, w2, weights, ids)
    fresh = _inputs(*shape, seed=4, device=device)
    for static, new in zip((x, weights, ids), (fresh[0], fresh[3], fresh[4])):
        static.copy_(new)
    graph.replay()
    torch.testing.assert_close(out, reference.fused_moe(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not importable")
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("eager", [True] + ([False] if ON_GPU else []), ids=lambda e: "eager" if e else "graphs")
def test_engine_on_triton_kernels_matches_torch_backend(tiny_model_factory, device, family, eager):
    """The whole engine with the Triton kernel set (the interpreter on CPU; on CUDA also decode
    through CUDA graphs, several steps a round) gives the torch backend's greedy tokens (float32)."""
    from batchllm import LLM, SamplingParams
    from tests.e2e.test_generate import VOCAB, make_prompts

    folder = tiny_model_factory(family)
    prompts = make_prompts(VOCAB, [5, 17, 9], seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8, ignore_eos=True)

    def run(backend: str) -> list[list[int]]:
        llm = LLM(str(folder), dtype="float32", device=device.type, attention_backend=backend,
                  enforce_eager=eager)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    assert run("triton") == run("torch")


def test_kernel_sets_carry_their_fused_moe():
    assert get_kernels("torch").fused_moe is reference.fused_moe
    if HAS_TRITON:
        from batchllm.kernels import triton_moe

        assert get_kernels("triton").fused_moe is triton_moe.fused_moe
