"""Async scheduling plans every step, prefill included, while the one before it still runs:
outputs, logprobs, prefix-cache hits and row errors equal the synchronous engine's.

The next plan is made before the running step's samples are known (they are placeholders): a
request whose prompt ends in that step decodes next with its sampled token fed on the device,
chunked prompts go on with their next chunk, and waiting requests are admitted beside them.
"""
from __future__ import annotations

import pytest
import torch

from batchllm import LLM, SamplingParams
from tests.e2e.test_generate import VOCAB, make_prompts
from tests.e2e.test_runner_faults import with_small_memory


def engine(model_dir, asynchronous: bool, steps: int = 1, **kw) -> LLM:
    return LLM(str(model_dir), dtype="float32", device="cpu", num_decode_steps=steps,
               async_scheduling=asynchronous, **kw)


def chained(llm: LLM) -> int:
    return llm.stats()["num_chained_steps"]


@pytest.mark.parametrize("steps", [1, 4])
def test_chunked_prefill_and_waiting_requests(tiny_model_dir, steps):
    # a budget of 24 tokens: prompts are cut into chunks, and requests wait for room
    prompts = make_prompts(VOCAB, [5, 17, 33, 8, 40, 16, 3, 21], seed=31)
    sp = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=1)
          for n in (9, 1, 14, 6, 2, 11, 7, 5)]
    kw = dict(max_num_batched_tokens=24, max_num_seqs=4, block_size=4)
    want = engine(tiny_model_dir, False, **kw).generate(prompts, sp)
    llm = engine(tiny_model_dir, True, steps, **kw)
    got = llm.generate(prompts, sp)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert g.outputs[0].token_logprobs == pytest.approx(w.outputs[0].token_logprobs, abs=1e-5)
        assert [sorted(d) for d in g.outputs[0].logprobs] == \
            [sorted(d) for d in w.outputs[0].logprobs]
        assert g.outputs[0].finish_reason == w.outputs[0].finish_reason
    assert chained(llm) > 0


def test_sampling_stops_and_parallel_samples(tiny_model_dir):
    prompts = make_prompts(VOCAB, [6, 14, 9, 12], seed=32)
    base = engine(tiny_model_dir, False).generate(
        [prompts[3]], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    params = [SamplingParams(temperature=0.9, top_k=20, seed=3, max_tokens=11, ignore_eos=True),
              SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5,
                             max_tokens=9, ignore_eos=True, min_tokens=4),
              SamplingParams(n=3, temperature=0.7, seed=8, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                             stop=[base.text[4:6]], stop_token_ids=[base.token_ids[8]])]
    kw = dict(block_size=4, max_num_batched_tokens=16)
    want = engine(tiny_model_dir, False, **kw).generate(prompts, params)
    llm = engine(tiny_model_dir, True, **kw)
    got = llm.generate(prompts, params)
    for w, g in zip(want, got):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in w.outputs]
        assert [c.text for c in g.outputs] == [c.text for c in w.outputs]
        assert [(c.finish_reason, c.stop_reason) for c in g.outputs] == \
            [(c.finish_reason, c.stop_reason) for c in w.outputs]
    assert got[3].outputs[0].finish_reason == "stop"
    assert chained(llm) > 0


def test_prefix_cache_hits_as_many_as_synchronous(tiny_model_dir):
    # eight prompts behind one 40-token prefix: the first computes it, the others must wait for
    # it to be cached rather than compute it again in a step chained before it is
    prompts = make_prompts(VOCAB, [3, 9, 5, 12, 7, 4, 6, 10], seed=33, shared=40)
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kw = dict(block_size=8, max_num_batched_tokens=256)
    sync = engine(tiny_model_dir, False, **kw)
    want = sync.generate(prompts, sp)
    llm = engine(tiny_model_dir, True, **kw)
    got = llm.generate(prompts, sp)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert llm.stats()["prefix_cache_hits"] == sync.stats()["prefix_cache_hits"] >= 7 * 40
    assert chained(llm) > 0


def test_row_errors_and_length_limit(tiny_model_dir):
    good = make_prompts(VOCAB, [5, 30], seed=34)
    prompts = [good[0], [], [1, 2, 99999], list(range(10, 80)), good[1]]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    want = engine(tiny_model_dir, False, max_model_len=40).generate(prompts, sp)
    llm = engine(tiny_model_dir, True, max_model_len=40)
    got = llm.generate(prompts, sp)
    assert [o.error for o in got] == [o.error for o in want]
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert got[4].outputs[0].finish_reason == "length" and len(got[4].outputs[0].token_ids) == 10
    assert chained(llm) > 0


def test_out_of_memory_in_a_chained_step_is_split(tiny_model_dir, monkeypatch):
    prompts = make_prompts(VOCAB, [6, 19, 11, 30, 4], seed=35)
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in engine(tiny_model_dir, False).generate(prompts, sp)]
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    llm = with_small_memory(engine(tiny_model_dir, True), 2)  # > 2 requests: out of memory
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, sp)] == want
    assert llm.stats()["num_oom_splits"] > 0 and chained(llm) > 0
