"""The engine and jobs with FP8 weights (tiny random models, CPU): quantization: fp8 runs, an FP8
checkpoint gives the same tokens as quantizing its float original, the _scaled_mm path the GPU
takes gives the reference path's tokens, jobs take and fingerprint the setting."""
from __future__ import annotations

import json

import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.config import ConfigError
from batchllm.jobs import JobError, run_job, validate_job
from batchllm.layers.quantization import fp8_layers
from tests.e2e.test_generate import VOCAB, make_prompts
from tests.layers.test_fp8_checkpoints import write_fp8_checkpoint

PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)


def generate(model, prompts, **kw) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(model), dtype="float32", device="cpu", **kw)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, PARAMS)], llm


def test_fp8_checkpoint_gives_the_tokens_of_quantizing_its_float_original(tiny_model_dir, tmp_path):
    prompts = make_prompts(VOCAB, [5, 17, 9, 30], seed=7)
    quantized, llm = generate(tiny_model_dir, prompts, quantization="fp8")
    assert len(fp8_layers(llm.engine.model)) == 8
    stored, _ = generate(write_fp8_checkpoint(tiny_model_dir, tmp_path / "ct", "ct-channel"), prompts)
    assert stored == quantized


def test_scaled_mm_path_gives_the_reference_tokens(tiny_model_dir):
    """The GPU's GEMM (torch._scaled_mm, bf16 out) run through the whole engine on CPU, where
    this torch build has it; bf16 rounding of each product may flip a near-tie, rarely."""
    from tests.layers.test_fp8_linear import _scaled_mm_runs_here

    if not _scaled_mm_runs_here():
        pytest.skip("this torch build has no CPU torch._scaled_mm")
    prompts = make_prompts(VOCAB, [5, 17, 9, 30], seed=8)
    llm = LLM(str(tiny_model_dir), dtype="bfloat16", device="cpu", quantization="fp8")
    ref = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, PARAMS)]
    for layer in fp8_layers(llm.engine.model).values():
        layer.quant_method.gemm = "scaled_mm"
    got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, PARAMS)]
    same = sum(a == b for p, q in zip(ref, got) for a, b in zip(p, q))
    assert same >= 0.9 * 8 * len(prompts)


def test_moe_models_keep_experts_and_router_in_their_dtype(tiny_model_factory, tmp_path):
    """quantization: fp8 leaves the experts and the router alone; an FP8 checkpoint's experts
    are dequantized as they stream in (q * scale, exactly)."""
    from safetensors.torch import load_file

    folder = tiny_model_factory("qwen3_moe")
    prompts = make_prompts(VOCAB, [6, 20], seed=9)
    for source in (folder, write_fp8_checkpoint(folder, tmp_path / "ct", "ct-channel")):
        tokens, llm = generate(source, prompts, quantization="fp8")
        model = llm.engine.model
        names = set(fp8_layers(model))
        assert "model.layers.0.self_attn.qkv_proj" in names
        assert not any("mlp" in n for n in names)  # routers and experts stay float32
        mlp = model.model.layers[1].mlp
        assert mlp.gate.weight.dtype == mlp.experts.down_proj.dtype == torch.float32
        assert all(len(t) == 8 for t in tokens)
    ckpt = load_file(source / "model.safetensors")
    expert = "model.layers.1.mlp.experts.5.down_proj"
    assert ckpt[f"{expert}.weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(mlp.experts.down_proj[5],
                       ckpt[f"{expert}.weight"].float() * ckpt[f"{expert}.weight_scale"])


def test_invalid_quantization_is_refused_by_name(tiny_model_dir):
    with pytest.raises(ConfigError, match="quantization='int4'"):
        LLM(str(tiny_model_dir), device="cpu", quantization="int4")


def _job(tmp_path, model, **engine) -> dict:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"the cat {i} sat"}) + "\n"
                           for i in range(3)))
    return {"model": str(model), "input": {"path": str(src)},
            "output": {"path": str(tmp_path / "out")},
            "sampling": {"max_tokens": 4, "temperature": 0.0},
            "engine": {"device": "cpu", "dtype": "float32", **engine}}


def test_jobs_take_the_setting_and_fingerprint_it(tiny_model_dir, tmp_path):
    with pytest.raises(JobError, match="engine.quantization"):
        validate_job(_job(tmp_path, tiny_model_dir, quantization="int8"))
    result = run_job(_job(tmp_path, tiny_model_dir, quantization="fp8"))
    assert result.summary["rows"] == 3 and result.summary["errors"] == 0
    record = json.loads((result.output_path / "job.json").read_text())
    assert record["details"]["engine"]["quantization"] == "fp8"
    # the same folder with the weights unquantized is a different job: refused, not mixed
    with pytest.raises(JobError, match="different job|--overwrite"):
        run_job(_job(tmp_path, tiny_model_dir))


@pytest.mark.slow
def test_two_ranks_load_an_fp8_checkpoint_like_one(tiny_model_dir, tmp_path):
    """Tensor parallelism slices FP8 weights and their scales with their rows (lazy reads).
    Each rank quantizes its own half of the row-parallel inputs, so the sum rounds differently:
    measured on this model, first-token log-probs move by 0.04-0.19 between one and two ranks,
    as much as FP8 itself moves them from float32 (0.02-0.10; float32 TP 2 equals TP 1)."""
    folder = write_fp8_checkpoint(tiny_model_dir, tmp_path / "ct", "ct-channel")
    prompts = make_prompts(VOCAB, [5, 17, 9, 30], seed=10)
    one = LLM(str(folder), dtype="float32", device="cpu").generate(prompts, PARAMS)
    llm = LLM(str(folder), dtype="float32", device="cpu", tensor_parallel_size=2)
    try:
        two = llm.generate(prompts, PARAMS)
    finally:
        llm.shutdown()
    for a, b in zip(one, two):  # the first token of each prompt (later ones follow any flip)
        a, b = a.outputs[0], b.outputs[0]
        assert a.token_ids[0] == b.token_ids[0]
        assert abs(a.token_logprobs[0] - b.token_logprobs[0]) < 0.3
