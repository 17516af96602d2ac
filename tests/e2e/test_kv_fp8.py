"""kv_cache_dtype="fp8": a float8 KV cache holds more tokens and generates what full precision does,
up to float8 rounding of K and V."""
from __future__ import annotations

import pytest

from batchllm import LLM, SamplingParams
from batchllm.config import ConfigError
from tests.e2e.test_generate import VOCAB, make_prompts


def test_fp8_cache_fits_more_tokens_and_stays_close(tiny_model_dir):
    prompts = make_prompts(VOCAB, [5, 17, 33, 8], seed=31)
    sp = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    full = LLM(str(tiny_model_dir), dtype="float32", device="cpu")
    fp8 = LLM(str(tiny_model_dir), dtype="float32", device="cpu", kv_cache_dtype="fp8")
    # the same CPU budget holds 4x the blocks at 1 byte per element instead of 4
    assert fp8.stats()["num_gpu_blocks"] == 4 * full.stats()["num_gpu_blocks"]
    worst = 0.0
    for a, b in zip(full.generate(prompts, sp), fp8.generate(prompts, sp)):
        top_a, top_b = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        for tok in set(top_a) & set(top_b):
            worst = max(worst, abs(top_a[tok].logprob - top_b[tok].logprob))
    assert 0 < worst < 0.5  # float8 K/V were really used; a wrong cache would be off by O(1)


def test_fp8_cache_under_preemption_keeps_its_own_outputs(tiny_model_dir):
    """Swap and recompute move or rebuild float8 blocks exactly: outputs equal the unpressured
    float8 run."""
    prompts = make_prompts(VOCAB, [5, 17, 33, 8, 40, 16], seed=32)
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    base = [o.outputs[0].token_ids for o in LLM(str(tiny_model_dir), dtype="float32", device="cpu",
                                                 kv_cache_dtype="fp8").generate(prompts, sp)]
    for mode in ("recompute", "swap"):
        llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", kv_cache_dtype="fp8",
                  block_size=4, num_gpu_blocks_override=24, max_num_seqs=3, preemption_mode=mode,
                  swap_space=0.01, max_num_batched_tokens=32)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, sp)] == base
        assert llm.stats()["num_preemptions"] > 0


def test_unknown_kv_cache_dtype_is_named():
    with pytest.raises(ConfigError, match="kv_cache_dtype='int4'"):
        LLM("unused", kv_cache_dtype="int4")
