"""The runner shrinks a step that runs out of device memory instead of failing the engine."""
from __future__ import annotations

import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.runner.model_runner import EngineFaultError, ModelRunner
from tests.e2e.test_generate import VOCAB, make_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def test_out_of_memory_step_is_split_and_outputs_unchanged(tiny_model_dir, monkeypatch):
    prompts = make_prompts(VOCAB, [6, 19, 11, 30, 4], seed=11)
    base = [o.outputs[0].token_ids for o in
            LLM(str(tiny_model_dir), dtype="float32", device="cpu").generate(prompts, GREEDY)]

    real = ModelRunner._forward_and_sample

    def forward_with_small_memory(self, chunks):
        # a real OutOfMemoryError raised by a step of more than two requests
        if len(chunks) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, chunks)

    monkeypatch.setattr(ModelRunner, "_forward_and_sample", forward_with_small_memory)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu")
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert got == base
    assert llm.stats()["num_oom_splits"] > 0


def test_single_request_out_of_memory_is_a_clear_fault(tiny_model_dir, monkeypatch):
    def always_oom(self, chunks):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(ModelRunner, "_forward_and_sample", always_oom)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu")
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
