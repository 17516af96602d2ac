"""Through the engine with the Triton kernels (the interpreter on CPU): Gemma 3's windowed layers,
GeGLU and (1 + weight) norms give the torch backend's greedy tokens (float32), also in decode
batches that share a cached prefix, where the global layers read it once (cascade) and the
local ones take the plain windowed path.
"""
from __future__ import annotations

import pytest

from batchllm import LLM, SamplingParams
from tests.e2e.test_generate import VOCAB, make_prompts
from tests.kernels.conftest import HAS_TRITON

PARAMS = SamplingParams(temperature=0.0, max_tokens=5, min_tokens=5, ignore_eos=True)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_gemma3_triton_backend_matches_torch_with_shared_prefix(tiny_model_factory, device):
    folder = tiny_model_factory("gemma3")
    prompts = make_prompts(VOCAB, [3, 9, 1], seed=41, shared=40)

    def run(backend: str) -> tuple[list[list[int]], dict]:
        llm = LLM(str(folder), dtype="float32", device=device.type, attention_backend=backend,
                  enforce_eager=True, cascade_min_tokens=32, cascade_min_reqs=2)
        outs = llm.generate(prompts, PARAMS)
        return [o.outputs[0].token_ids for o in outs], llm.stats()

    want, _ = run("torch")
    got, stats = run("triton")
    assert got == want
    assert stats["num_shared_prefix_steps"] >= 1  # steps whose global layers read the prefix once
