"""Through the engine: decode batches that share a cached prefix take the shared-prefix attention
path of the Triton backend and give the same greedy tokens as the torch backend (float32).

Runs the Triton kernels through the interpreter on CPU (on CUDA when there is one), so the
prefix threshold (cascade_min_tokens) is lowered to keep the prompts short; the batch-size
threshold stays.
"""
from __future__ import annotations

import pytest

from batchllm import LLM, SamplingParams
from batchllm.runner.cascade import CascadePolicy, shared_prefix_blocks
from tests.e2e.test_generate import VOCAB, make_prompts
from tests.kernels.conftest import HAS_TRITON, ON_GPU

PARAMS = SamplingParams(temperature=0.0, max_tokens=5, min_tokens=5, ignore_eos=True)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("steps,async_rounds,eager", [(1, False, True), (3, True, True)]
                         + ([(3, True, False)] if ON_GPU else []),  # CUDA graphs of both variants
                         ids=["single-step", "async-rounds"] + (["async-rounds-graphs"] if ON_GPU else []))
def test_shared_prefix_decode_matches_torch_backend(tiny_model_dir, device, steps, async_rounds, eager):
    prompts = make_prompts(VOCAB, [3, 9, 1, 6, 12, 4, 7, 2, 5], seed=31, shared=40)  # 9 requests

    def run(backend: str, **kw) -> tuple[list[list[int]], dict]:
        llm = LLM(str(tiny_model_dir), dtype="float32", device=device.type, attention_backend=backend,
                  num_decode_steps=steps, async_scheduling=async_rounds, enforce_eager=eager,
                  cascade_min_tokens=32, **kw)
        outs = llm.generate(prompts, PARAMS)
        return [o.outputs[0].token_ids for o in outs], llm.stats()

    want, _ = run("torch")
    got, stats = run("triton")
    assert got == want
    assert stats["num_shared_prefix_steps"] >= 4  # every decode step after the prefill
    if steps == 1:
        off, stats = run("triton", cascade_attention=False)
        assert off == want and stats["num_shared_prefix_steps"] == 0


def test_shared_prefix_blocks_stops_at_a_difference_and_at_blocks_being_written():
    import numpy as np

    tables = np.array([[5, 6, 7, 8, 9], [5, 6, 7, 3, 2], [5, 6, 7, 8, 1]])
    assert shared_prefix_blocks(tables, np.array([80, 90, 70]), 16) == 3  # column 3 differs
    # row 1's first query sits in its block 2 (position 40): that block is being written
    assert shared_prefix_blocks(tables, np.array([80, 40, 70]), 16) == 2
    # rows 0 and 2 agree up to column 4; row 2's query (position 70) is in block 4
    assert shared_prefix_blocks(tables[[0, 2]], np.array([80, 70]), 16) == 4
    assert shared_prefix_blocks(tables, np.array([80, 9, 70]), 16) == 0


def test_shared_prefix_tokens_only_where_sharing_halves_the_keys_read():
    import numpy as np

    policy = CascadePolicy(True, 16, min_tokens=32, min_reqs=8)
    tables = np.tile(np.arange(40), (8, 1))
    tables[:, 4:] += 100 * np.arange(8)[:, None]  # 4 shared blocks = 64 keys, then each its own
    few_own = np.full(8, 64 + 20)  # 20 own keys each: sharing saves 7 x 64, far more than 8 x 20
    assert policy.shared_tokens(tables, few_own) == 64
    many_own = np.full(8, 64 + 600)  # 8 x 600 own keys: sharing would save under half
    assert policy.shared_tokens(tables, many_own) == 0
    assert policy.shared_tokens(tables[:7], few_own[:7]) == 0  # too few requests
    assert CascadePolicy(True, 16).shared_tokens(tables, few_own) == 0  # prefix under 256 keys
    assert CascadePolicy(False, 16, min_tokens=32).shared_tokens(tables, few_own) == 0  # off


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_samples_of_one_prompt_share_its_blocks(tiny_model_dir, device):
    """n samples of one prompt fork its blocks (the partial last one copied on write): their
    decode batch reads the shared blocks once and gives the torch backend's greedy tokens."""
    prompt = make_prompts(VOCAB, [45], seed=33)[0]  # 2 full blocks + a partial one
    params = SamplingParams(n=9, temperature=0.0, max_tokens=4, min_tokens=4, ignore_eos=True)

    def run(backend: str):
        llm = LLM(str(tiny_model_dir), dtype="float32", device=device.type, attention_backend=backend,
                  enforce_eager=True, cascade_min_tokens=32)
        out = llm.generate([prompt], params)[0]
        return [c.token_ids for c in out.outputs], llm.stats()

    want, _ = run("torch")
    got, stats = run("triton")
    assert got == want and len(got) == 9
    assert stats["num_shared_prefix_steps"] >= 3
