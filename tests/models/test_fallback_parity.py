"""The transformers fallback vs transformers itself on the same tiny random weights (float32), for
architectures with no native implementation (Phi-3, OLMo 2, Granite, Gemma 2): teacher-forced
logits within 1e-4, greedy outputs equal to HF `generate`, also when requests are preempted and
when prompts hit the prefix cache; and model_impl=transformers on a native architecture gives the
native outputs.

The tolerance is test_parity.py's. The tiny configs (tests/tiny_models.py) turn each family's
peculiarities away from their defaults: a dropped sliding window moves these logits by ~3, a head
that skipped Granite's logits_scaling or Gemma 2's soft-cap by far more than 1e-4.
"""
from __future__ import annotations

import pytest
import torch

from batchllm import LLM
from batchllm.config import ModelConfig
from batchllm.loader import ModelLoadError, load_model
from batchllm.models.transformers_fallback import TransformersForCausalLM
from tests.e2e.test_generate import GREEDY, VOCAB, hf_greedy, make_prompts
from tests.models.test_parity import _hf_logits, _our_logits

CPU = torch.device("cpu")
FAMILIES = ["phi3", "olmo2", "granite", "gemma2"]


@pytest.mark.parametrize("family, overrides", [
    *[(f, {}) for f in FAMILIES], ("olmo2", dict(tie_word_embeddings=True)),
    ("gemma2", dict(num_hidden_layers=3, tie_word_embeddings=True)),
])
@torch.inference_mode()
def test_logits_match_transformers(tiny_model_factory, family, overrides):
    folder = tiny_model_factory(family, **overrides)
    model, hf_config = load_model(ModelConfig(model=str(folder)), CPU)
    assert isinstance(model, TransformersForCausalLM)
    assert (model.family.num_heads, model.family.num_kv_heads, model.family.head_dim) == (4, 2, 16)
    token_ids = torch.randint(0, 270, (23,), generator=torch.Generator().manual_seed(5)).tolist()
    expected = _hf_logits(folder, token_ids)
    torch.testing.assert_close(_our_logits(model, token_ids, [23]), expected, atol=1e-4, rtol=0)
    # prefill in chunks, then single-token decode steps: reads back K/V written by earlier steps
    stepped = _our_logits(model, token_ids, [9, 6, 1, 1, 6])
    torch.testing.assert_close(stepped, expected, atol=1e-4, rtol=0)


def test_logits_buffer_is_filled_in_place(tiny_model_factory):
    """CUDA graphs hand compute_logits a static buffer: the logits must land in it."""
    model, _ = load_model(ModelConfig(model=str(tiny_model_factory("granite"))), CPU)
    hidden = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    out = torch.full((4, model.config.vocab_size), float("nan"))
    with torch.inference_mode():
        got = model.compute_logits(hidden, out=out[:3])
        expected = model.compute_logits(hidden)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out[:3], expected, atol=0, rtol=0)
    assert out[3].isnan().all()


@pytest.fixture(scope="module", params=FAMILIES)
def fallback_reference(request, tiny_model_factory):
    folder = tiny_model_factory(request.param)
    prompts = make_prompts(VOCAB, [5, 17, 33, 8, 40, 16])
    return folder, prompts, hf_greedy(folder, prompts, GREEDY.max_tokens)


def test_greedy_matches_hf_generate(fallback_reference):
    folder, prompts, expected = fallback_reference
    llm = LLM(str(folder), dtype="float32", device="cpu", max_num_batched_tokens=64)
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_keeps_greedy_outputs(fallback_reference, mode):
    folder, prompts, expected = fallback_reference
    # 16 blocks of 4 tokens cannot hold six requests of up to 52 tokens: preemption is forced
    llm = LLM(str(folder), dtype="float32", device="cpu", block_size=4, num_gpu_blocks_override=16,
              preemption_mode=mode, swap_space=0.01, max_num_batched_tokens=32,
              enable_prefix_caching=False)
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.stats()["num_preemptions"] > 0


def test_prefix_cache_hits_keep_outputs(fallback_reference):
    folder = fallback_reference[0]
    prompts = make_prompts(VOCAB, [3, 9, 5, 12], seed=1, shared=40)
    expected = hf_greedy(folder, prompts, GREEDY.max_tokens)
    llm = LLM(str(folder), dtype="float32", device="cpu", block_size=8,
              enable_prefix_caching=True, max_num_seqs=1)
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    # the 40 shared tokens are 5 full blocks of 8; the three later prompts reuse them
    assert llm.stats()["prefix_cache_hits"] >= 3 * 40
    assert all(o.num_cached_tokens >= 40 for o in outs[1:])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_model_impl_transformers_on_a_native_architecture_matches_native(tiny_model_factory, family):
    folder = tiny_model_factory(family)
    native, _ = load_model(ModelConfig(model=str(folder)), CPU)
    fallback, _ = load_model(ModelConfig(model=str(folder), model_impl="transformers"), CPU)
    assert not isinstance(native, TransformersForCausalLM)
    assert isinstance(fallback, TransformersForCausalLM)
    token_ids = make_prompts(VOCAB, [30], seed=3)[0]
    with torch.inference_mode():
        torch.testing.assert_close(_our_logits(fallback, token_ids, [12, 1, 17]),
                                   _our_logits(native, token_ids, [30]), atol=1e-4, rtol=0)
    prompts = make_prompts(VOCAB, [5, 17, 33, 8], seed=4)
    runs = [LLM(str(folder), dtype="float32", device="cpu", max_num_batched_tokens=32,
                model_impl=impl).generate(prompts, GREEDY) for impl in ("native", "transformers")]
    assert [o.outputs[0].token_ids for o in runs[0]] == [o.outputs[0].token_ids for o in runs[1]]


def test_dummy_weights_fill_every_parameter(tiny_model_factory):
    model, _ = load_model(ModelConfig(model=str(tiny_model_factory("phi3")), load_format="dummy"), CPU)
    for name, p in model.named_parameters():
        assert p.isfinite().all(), name
        assert (p == 1).all() if "norm" in name else p.std() > 0.01, name


def test_a_tensor_with_no_place_or_missing_is_named(tiny_model_factory, tmp_path):
    from tests.models.test_moe_parity import _rewrite_checkpoint

    folder = tiny_model_factory("olmo2")
    q_norm = "model.layers.1.self_attn.q_norm.weight"
    _rewrite_checkpoint(folder, tmp_path / "no-norm", lambda n, t: None if n == q_norm else (n, t))
    with pytest.raises(ModelLoadError, match=r"lacks weights for 1 parameters: hf\.model\.layers\.1"
                                             r"\.self_attn\.q_norm\.weight"):
        load_model(ModelConfig(model=str(tmp_path / "no-norm")), CPU)
    _rewrite_checkpoint(folder, tmp_path / "extra",
                        lambda n, t: (n.replace("layers.0.mlp.up_proj", "layers.0.mlp.w3"), t))
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.0\.mlp\.w3\.weight' has no place "
                                             r"in transformers' Olmo2ForCausalLM"):
        load_model(ModelConfig(model=str(tmp_path / "extra")), CPU)


def test_cuda_graphs_only_where_transformers_code_is_known_to_capture(tiny_model_factory):
    """Decode graphs (engine/build.py) capture the fallback only for model types seen to replay
    on a GPU, and never with a rotary that picks its frequencies from the batch on the host."""
    from tests.tiny_models import tiny_config

    def graphs(cfg) -> bool:
        return TransformersForCausalLM(cfg, torch.float32, CPU).supports_cuda_graphs

    assert graphs(tiny_config("phi3")) and graphs(tiny_config("gemma2"))
    assert not graphs(tiny_config("qwen3"))  # runs, but not seen in a graph
    longrope = dict(type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8)
    assert not graphs(tiny_config("phi3", rope_scaling=longrope, original_max_position_embeddings=256))
    assert not graphs(tiny_config("llama", rope_scaling=dict(rope_type="dynamic", factor=2.0)))
