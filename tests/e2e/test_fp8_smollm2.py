"""FP8 weights on the real default model (SmolLM2-135M, CPU, float32 reference): how closely W8A8
follows the unquantized model, over the first 32 greedy tokens of 64 prompts.

Measured (benchmarks/fp8_accuracy.py, CPU, 1 thread): 90.1% of teacher-forced positions pick the
same top-1 token; mean |logit difference| 0.61 against a mean |logit| of 5.98 (max 5.8); greedy
continuations equal at 32-34% of positions, the first 8-10 tokens equal on average (3-6% of prompts
equal for all 32). For scale, bf16 weights alone (no FP8) give 0.11 mean |logit difference| and
94% teacher-forced top-1 on the same model: a 135M model is sensitive, and e4m3's 3 mantissa bits
move every weight by ~2.6% (rms). A broken scale, a transposed layout or a lost part of a fused
projection gives agreement near 0 and logit differences of the logits' own size.
"""
from __future__ import annotations

import pytest
import torch

from batchllm.layers.quantization import fp8_layers
from benchmarks.fp8_accuracy import accuracy_prompts, measure

pytestmark = pytest.mark.slow


def test_fp8_follows_the_unquantized_default_model(smollm2_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~1 min; on a busy 2-core machine two threads took 20
    try:
        figures = measure(str(smollm2_dir), accuracy_prompts(64), tokens=32, device="cpu", seed=0)
    finally:
        torch.set_num_threads(threads)
    print(figures)
    assert figures["teacher_forced_top1_agreement"] >= 0.85
    assert figures["mean_abs_logit_diff"] <= 0.15 * figures["mean_abs_logit"]
    assert figures["token_agreement"] >= 0.2
    assert figures["mean_leading_equal"] >= 5


def test_the_default_model_holds_fp8_projections(smollm2_dir):
    from batchllm import LLM, SamplingParams

    llm = LLM(str(smollm2_dir), device="cpu", quantization="fp8")
    layers = fp8_layers(llm.engine.model)
    assert len(layers) == 4 * llm.engine.hf_config.num_hidden_layers
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=8))
    assert "Paris" in out[0].outputs[0].text
