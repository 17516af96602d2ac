"""GPU correctness: every supported family against HF transformers on the same random weights, on CUDA.

For each family (llama, mistral, qwen2, qwen3, qwen3_moe, mixtral, gemma3) and each kernel backend (torch, triton):
- float32 greedy generation equals HF `generate` token for token (TF32 off on both sides; HF's
  min_new_tokens masks EOS, so ours masks it too with min_tokens), through the engine's
  multi-step decode and CUDA graphs; float32 teacher-forced logits within 1e-3 of HF's;
- bfloat16 teacher-forced logits: our error against HF float32 is at most 2x HF-bfloat16's own
  error against HF float32, plus 0.02 — bf16 rounding of 8 mantissa bits makes ~1e-2 relative
  logit noise unavoidable; a wrong rotary, norm or mask gives errors of order 1.
Each case prints a `PARITY {json}` line (benchmarks/gpu_suite.sh collects them into parity.json).
Run: python -m pytest tests/gpu -m gpu -s
"""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.layers.attention import AttentionMetadata
from tests.tiny_models import make_tiny_model_dir

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPE = dict(hidden_size=256, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
             head_dim=32, intermediate_size=512, max_position_embeddings=1024)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma3")
BACKENDS = ("torch", "triton")
NEW_TOKENS = 16


@dataclass(slots=True)
class Reference:
    """HF transformers on one family's random weights."""

    folder: Path
    greedy: list[list[int]]  # float32 generate, NEW_TOKENS per prompt
    logits32: torch.Tensor   # float32 logits of the long prompt
    hf_bf16_err: float       # HF bf16's own max logit error against HF float32


@pytest.fixture(scope="module")
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, 250, (n,), generator=g).tolist() for n in (7, 33, 64, 129, 300, 18)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prompts, no_tf32):
    """family -> Reference, computed once per family."""
    from transformers import AutoModelForCausalLM

    made: dict[str, Reference] = {}

    def get(family: str) -> Reference:
        if family in made:
            return made[family]
        folder = make_tiny_model_dir(tmp_path_factory.mktemp(f"gpu-{family}"), family, **SHAPE)
        hf32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda().eval()
        hf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
        want = []
        with torch.no_grad():
            for p in prompts:
                x = torch.tensor([p], device="cuda")
                y = hf32.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
                want.append(y[0, len(p):].tolist())
            long_ids = torch.tensor([prompts[4]], device="cuda")
            ref32 = hf32(long_ids).logits[0].float()
            ref16 = hf16(long_ids).logits[0].float()
        made[family] = Reference(folder, want, ref32, (ref16 - ref32).abs().max().item())
        del hf32, hf16
        _free()
        return made[family]

    return get


def _free() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def teacher_forced_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Logits of every position, prefilling `ids` in two chunks through the engine's paged cache."""
    eng = llm.engine
    model, dev, bs = eng.model, eng.device, eng.config.cache.block_size
    n = len(ids)
    table = torch.arange((n + bs - 1) // bs, dtype=torch.int32, device=dev)[None] + 1
    caches = eng.kv_cache.layer_caches()
    x = torch.tensor(ids, device=dev)
    out = []
    with torch.inference_mode():
        for s, e in ((0, n // 2), (n // 2, n)):
            pos = torch.arange(s, e, device=dev)
            meta = AttentionMetadata(
                slot_mapping=table[0][pos // bs].long() * bs + pos % bs,
                query_start_loc=torch.tensor([0, e - s], dtype=torch.int32, device=dev),
                seq_lens=torch.tensor([e], dtype=torch.int32, device=dev), block_tables=table,
                max_query_len=e - s, max_seq_len=e)
            out.append(model.compute_logits(model(x[s:e], pos, caches, meta)))
    return torch.cat(out).float()


def _report(**row: object) -> None:
    print("PARITY " + json.dumps(row), flush=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_float32_greedy_equals_hf_generate(family, backend, reference, prompts):
    ref = reference(family)
    llm = LLM(str(ref.folder), dtype="float32", device="cuda", attention_backend=backend,
              gpu_memory_utilization=0.3, block_size=16)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS,
                                                min_tokens=NEW_TOKENS, ignore_eos=True))
    got = [list(o.outputs[0].token_ids) for o in outs]
    err = (teacher_forced_logits(llm, prompts[4]) - ref.logits32).abs().max().item()
    del llm, outs
    _free()
    _report(family=family, backend=backend, dtype="float32", greedy_equal=got == ref.greedy,
            max_logit_err=err)
    assert got == ref.greedy, f"{family}/{backend}: float32 greedy differs from HF generate"
    assert err < 1e-3, f"{family}/{backend}: float32 logits differ from HF by {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_logits_within_hf_bfloat16_error(family, backend, reference, prompts):
    ref = reference(family)
    llm = LLM(str(ref.folder), dtype="bfloat16", device="cuda", attention_backend=backend,
              gpu_memory_utilization=0.3)
    err = (teacher_forced_logits(llm, prompts[4]) - ref.logits32).abs().max().item()
    del llm
    _free()
    bound = 2 * ref.hf_bf16_err + 0.02
    _report(family=family, backend=backend, dtype="bfloat16", max_logit_err=err,
            hf_bf16_max_logit_err=ref.hf_bf16_err, bound=bound)
    assert err <= bound, (f"{family}/{backend}: bf16 logit error {err:.3g} against HF float32 exceeds "
                          f"2 x HF bf16's own ({ref.hf_bf16_err:.3g}) + 0.02")
