"""GPU correctness of the transformers fallback: architectures with no native implementation (and
Llama forced through it with model_impl=transformers) against HF transformers on the same random
weights, on CUDA, with both kernel backends, the engine's multi-step decode and CUDA graphs (the
Triton backend captures the fallback's decode steps like a native model's).

The same checks and bounds as test_parity.py: float32 greedy equal to HF `generate`, float32
teacher-forced logits within 1e-3, bf16 logits within 2x HF-bf16's own error + 0.02. Each case
prints a `PARITY {json}` line with `impl: transformers`.
Run: python -m pytest tests/gpu/test_fallback_gpu.py -m gpu -s
"""
from __future__ import annotations

import pytest
import torch

from batchllm import LLM, SamplingParams
from tests.gpu.test_parity import (BACKENDS, NEW_TOKENS, _free, _report, no_tf32, prompts,  # noqa: F401
                                   reference, teacher_forced_logits)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# the four fallback families of tests/tiny_models.py, and a native one forced through the fallback
FAMILIES = ("phi3", "olmo2", "granite", "gemma2", "llama")


def _llm(folder, dtype: str, backend: str) -> LLM:
    from batchllm.models.transformers_fallback import TransformersForCausalLM

    llm = LLM(str(folder), dtype=dtype, device="cuda", attention_backend=backend,
              gpu_memory_utilization=0.3, model_impl="transformers")
    assert isinstance(llm.engine.model, TransformersForCausalLM)
    return llm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fallback_float32_greedy_equals_hf_generate(family, backend, reference, prompts):
    ref = reference(family)
    llm = _llm(ref.folder, "float32", backend)
    graphs = llm.engine.runner.graphs is not None
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS,
                                                min_tokens=NEW_TOKENS, ignore_eos=True))
    got = [list(o.outputs[0].token_ids) for o in outs]
    err = (teacher_forced_logits(llm, prompts[4]) - ref.logits32).abs().max().item()
    del llm, outs
    _free()
    _report(family=family, impl="transformers", backend=backend, dtype="float32",
            cuda_graphs=graphs, greedy_equal=got == ref.greedy, max_logit_err=err)
    assert got == ref.greedy, f"{family}/{backend}: fallback float32 greedy differs from HF generate"
    assert err < 1e-3, f"{family}/{backend}: fallback float32 logits differ from HF by {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fallback_bfloat16_logits_within_hf_bfloat16_error(family, backend, reference, prompts):
    ref = reference(family)
    llm = _llm(ref.folder, "bfloat16", backend)
    err = (teacher_forced_logits(llm, prompts[4]) - ref.logits32).abs().max().item()
    del llm
    _free()
    bound = 2 * ref.hf_bf16_err + 0.02
    _report(family=family, impl="transformers", backend=backend, dtype="bfloat16",
            max_logit_err=err, hf_bf16_max_logit_err=ref.hf_bf16_err, bound=bound)
    assert err <= bound, (f"{family}/{backend}: fallback bf16 logit error {err:.3g} against HF "
                          f"float32 exceeds 2 x HF bf16's own ({ref.hf_bf16_err:.3g}) + 0.02")
