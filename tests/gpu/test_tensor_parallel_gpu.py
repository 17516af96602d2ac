"""Tensor parallelism on CUDA: 2 ranks give the float32 greedy tokens and log-probs of 1 rank.

With 2 or more GPUs the ranks talk over NCCL, one GPU each, with CUDA graphs; on a one-GPU machine
both ranks share it over gloo (BATCHLLM_TP_SHARE_GPU=1, eager: a functional check, not a speed one).
Run: python -m pytest tests/gpu -m gpu -s
"""
from __future__ import annotations

import pytest
import torch

from batchllm import LLM, SamplingParams
from tests.tiny_models import make_tiny_model_dir

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPE = dict(hidden_size=256, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
             head_dim=32, intermediate_size=512, max_position_embeddings=1024)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_two_ranks_equal_one_on_cuda(tmp_path, monkeypatch, family):
    shared = torch.cuda.device_count() < 2
    if shared:
        monkeypatch.setenv("BATCHLLM_TP_SHARE_GPU", "1")
    folder = make_tiny_model_dir(tmp_path / family, family, **SHAPE)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 250, (n,), generator=g).tolist() for n in (7, 33, 129, 300, 18)]
    sp = SamplingParams(temperature=0.0, max_tokens=24, min_tokens=24, logprobs=2)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        outs = []
        for tp in (1, 2):
            # sharing one GPU, each rank sizes its KV cache from the same free memory: take a third
            llm = LLM(str(folder), dtype="float32", device="cuda", tensor_parallel_size=tp,
                      enforce_eager=shared, num_decode_steps=4, async_scheduling=True,
                      gpu_memory_utilization=0.3 if shared else 0.9)
            try:
                outs.append(llm.generate(prompts, sp))
            finally:
                llm.shutdown()
                del llm
                torch.cuda.empty_cache()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    for a, b in zip(*outs, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].token_logprobs == pytest.approx(a.outputs[0].token_logprobs, abs=1e-3)
    print(f"TP {family}: 2 ranks ({'one shared GPU, gloo' if shared else 'NCCL'}) equal 1 rank")
