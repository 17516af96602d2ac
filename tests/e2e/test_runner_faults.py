"""The runner shrinks a step that runs out of device memory instead of failing the engine."""
from __future__ import annotations

import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.runner.model_runner import EngineFaultError
from tests.e2e.test_generate import VOCAB, make_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def with_small_memory(llm: LLM, max_reqs: int) -> LLM:
    """The engine's model raises a real OutOfMemoryError for a step of more than max_reqs requests."""
    model = llm.engine.model
    real = model.forward

    def forward(input_ids, positions, kv_caches, meta):
        if meta.seq_lens.numel() > max_reqs:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(input_ids, positions, kv_caches, meta)

    model.forward = forward
    return llm


def test_out_of_memory_step_is_split_and_outputs_unchanged(tiny_model_dir, monkeypatch):
    prompts = make_prompts(VOCAB, [6, 19, 11, 30, 4], seed=11)
    base = [o.outputs[0].token_ids for o in
            LLM(str(tiny_model_dir), dtype="float32", device="cpu").generate(prompts, GREEDY)]
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    llm = with_small_memory(LLM(str(tiny_model_dir), dtype="float32", device="cpu"), 2)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert got == base
    assert llm.stats()["num_oom_splits"] > 0


def test_single_request_out_of_memory_is_a_clear_fault(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    llm = with_small_memory(LLM(str(tiny_model_dir), dtype="float32", device="cpu"), 0)
    with pytest.raises(EngineFaultError, match="max_num_batched_tokens"):
        llm.generate(make_prompts(VOCAB, [5], seed=12), GREEDY)


def test_capture_sizes_cover_every_batch():
    from batchllm.runner.cuda_graphs import capture_sizes

    for top in (100, 1000, 1024):
        sizes = capture_sizes(top)
        assert sizes[0] == 1 and sizes[-1] == top and sizes == sorted(set(sizes))
        # every batch size maps to a captured size at most 16 rows above it, or 1/8 above 256
        for b in range(1, top + 1):
            s = next(x for x in sizes if x >= b)
            assert s - b < max(16, b / 8)


def test_a_request_the_sampler_cannot_take_fails_alone(tiny_model_dir):
    """One request whose sampling state cannot be built (here: the generator refuses its seed)
    becomes an error output; the requests beside it in the same steps are unchanged."""
    prompts = make_prompts(VOCAB, [6, 19, 11], seed=13)
    params = [SamplingParams(temperature=0.8, seed=s, max_tokens=8) for s in (1, 2, 3)]
    base = LLM(str(tiny_model_dir), dtype="float32", device="cpu").generate(prompts, params)
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu")
    sampler = llm.engine.runner.sampler
    real = sampler.add_request

    def add_request(req_id, prompt_token_ids, params, seed, eos_token_id):
        if seed == 2:
            raise RuntimeError("Overflow when unpacking long long")
        return real(req_id, prompt_token_ids, params, seed, eos_token_id)

    sampler.add_request = add_request
    got = llm.generate(prompts, params)
    assert got[1].error and "Overflow when unpacking long long" in got[1].error
    assert got[1].outputs[0].finish_reason == "error"
    for i in (0, 2):
        assert got[i].error is None
        assert got[i].outputs[0].token_ids == base[i].outputs[0].token_ids
