"""FP8 weights on the GPU: torch._scaled_mm (row-wise scales) and the Triton per-token quantizer
against the float32 reference, no host sync inside a layer (CUDA graphs capture it), and the engine
with FP8 weights against bf16 on the same random weights. Prints `FP8 {json}` lines.
Run: python -m pytest tests/gpu/test_fp8_gpu.py -m gpu -s
"""
from __future__ import annotations

import gc
import json

import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.layers.linear import MergedColumnParallelLinear
from batchllm.layers.quantization.fp8 import (Fp8LinearMethod, quantize_rows, quantize_weight,
                                              reference_linear, scaled_mm_linear, select_gemm)
from benchmarks.fp8_accuracy import teacher_forced_logits
from tests.tiny_models import make_tiny_model_dir

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
HOPPER_OR_ADA = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _report(**row: object) -> None:
    print("FP8 " + json.dumps(row), flush=True)


@pytest.mark.skipif(not HOPPER_OR_ADA, reason="float8 matrix units need compute capability 8.9+")
def test_scaled_mm_is_chosen_and_matches_the_reference():
    gemm, token_quant = select_gemm(CUDA)
    assert gemm == "scaled_mm"
    assert token_quant.__module__.endswith("triton_fp8"), "the Triton quantizer was not taken"
    g = torch.Generator(device=CUDA).manual_seed(0)
    for m, k, n in [(1, 2048, 8192), (37, 4096, 6144), (512, 8192, 2048)]:
        x = torch.randn(m, k, device=CUDA, generator=g).bfloat16()
        wq, ws = quantize_weight(torch.randn(n, k, device=CUDA, generator=g) / k ** 0.5)
        bias = torch.randn(n, device=CUDA, generator=g).bfloat16()
        got = scaled_mm_linear(x, wq, ws, bias, None, token_quant).float()
        want = reference_linear(x.float(), wq, ws, bias.float())
        err = ((got - want).abs().max() / want.abs().max()).item()
        _report(case="scaled_mm_vs_reference", m=m, k=k, n=n, rel_max_err=err)
        assert err < 1e-2  # bf16 output rounding (2^-8) plus accumulation order


def test_triton_quantizer_matches_torch_on_cuda():
    from batchllm.layers.quantization.triton_fp8 import per_token_quant

    x = torch.randn(300, 14336, device=CUDA).bfloat16() * 4
    q, s = per_token_quant(x, 1200.0)
    q_ref, s_ref = quantize_rows(x, 1200.0)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    differ = (q.float() != q_ref.float()).float().mean().item()
    _report(case="triton_quant_vs_torch", share_differing=differ)
    assert differ < 1e-3  # approximate division: rarely one float8 step apart


@pytest.mark.skipif(not HOPPER_OR_ADA, reason="float8 matrix units need compute capability 8.9+")
def test_an_fp8_layer_runs_without_host_syncs_and_replays_in_a_cuda_graph():
    layer = MergedColumnParallelLinear(1024, [2048, 2048]).to(CUDA, torch.bfloat16)
    torch.nn.init.normal_(layer.weight, std=0.02)
    layer.set_quant_method(Fp8LinearMethod(), from_existing=True)
    gemm, token_quant = select_gemm(CUDA)
    layer.quant_method.gemm, layer.quant_method.token_quant = gemm, token_quant
    x = torch.randn(64, 1024, device=CUDA, dtype=torch.bfloat16)
    layer(x)  # compiles the quantizer
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside raises
    try:
        layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, layer(x), rtol=0, atol=0)


def test_engine_with_fp8_weights_follows_bf16(tmp_path):
    """Random weights (tiny Llama, bf16): FP8 greedy tokens through CUDA graphs follow FP8 eager
    ones (bar near-ties: the GEMM's tiling depends on the batch size), and FP8 teacher-forced
    top-1 tokens agree with bf16's on most positions."""
    folder = make_tiny_model_dir(tmp_path / "m", "llama", hidden_size=512, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                 intermediate_size=1536, max_position_embeddings=1024)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 250, (int(n),), generator=g).tolist() for n in (5, 40, 130, 17)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    runs, logits = {}, {}
    for name, kw in (("bf16", {}), ("fp8", dict(quantization="fp8")),
                     ("fp8-eager", dict(quantization="fp8", enforce_eager=True))):
        llm = LLM(str(folder), dtype="bfloat16", device="cuda", gpu_memory_utilization=0.3, **kw)
        runs[name] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
        seqs = [p + r for p, r in zip(prompts, runs["bf16"])]
        logits[name] = teacher_forced_logits(llm.engine.model, seqs, 24)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    top1 = (logits["fp8"].argmax(-1) == logits["bf16"].argmax(-1)).float().mean().item()
    diff = (logits["fp8"] - logits["bf16"]).abs().mean().item()
    _report(case="engine_fp8_vs_bf16", teacher_forced_top1=top1, mean_abs_logit_diff=diff,
            mean_abs_logit=logits["bf16"].abs().mean().item())
    same = sum(a == b for r, e in zip(runs["fp8"], runs["fp8-eager"]) for a, b in zip(r, e))
    assert same >= 0.9 * sum(map(len, runs["fp8"]))  # GEMM tiling may differ by batch size
    assert top1 > 0.8
