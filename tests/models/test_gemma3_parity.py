"""Gemma 3 against HF transformers on the same random weights (float32): logits, greedy tokens and
log-probs, through chunked prefill, preemption and prefix-cache hits.

The tiny model (tests/tiny_models.py) alternates local layers (an 8-key window) and global ones,
with distinct rotary bases and attention scale; prompts run to 52 tokens, so every local layer
drops keys. Tolerance 1e-4 on logits of size ~1-6, as tests/models/test_parity.py argues: a
window off by one key, a local/global rotary mix-up, a norm without its (1 + weight) or a missed
soft-cap move these logits by 1e-2 or more.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.config import ModelConfig
from batchllm.loader import load_model
from batchllm.models import gemma3
from batchllm.models.registry import get_model_class
from tests.e2e.test_generate import hf_greedy, make_prompts
from tests.models.test_parity import _hf_logits, _our_logits

CPU = torch.device("cpu")
VOCAB = 250
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12, ignore_eos=True, logprobs=1)


def _hf_logprobs(folder, prompts: list[list[int]], outputs: list[list[int]]) -> list[list[float]]:
    """HF's log p of each generated token, teacher-forced over prompt + output."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    result = []
    for prompt, out in zip(prompts, outputs):
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([prompt + out])).logits[0].float(), dim=-1)
        n = len(prompt)
        result.append([logp[n - 1 + i, t].item() for i, t in enumerate(out)])
    return result


@pytest.fixture(scope="module")
def folder(tiny_model_factory):
    return tiny_model_factory("gemma3")


@pytest.fixture(scope="module")
def reference(folder):
    prompts = make_prompts(VOCAB, [5, 17, 33, 8, 40, 16])
    tokens = hf_greedy(folder, prompts, GREEDY.max_tokens)
    return prompts, tokens, _hf_logprobs(folder, prompts, tokens)


def _check(outs, prompts, tokens, logprobs) -> None:
    assert [o.outputs[0].token_ids for o in outs] == tokens
    for out, want in zip(outs, logprobs):
        assert out.outputs[0].token_logprobs == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("family, overrides", [
    ("gemma3", {}),
    # HF's Gemma 3 applies the final soft-cap and, on transformers 5.x, not the attention one
    ("gemma3", dict(tie_word_embeddings=True, final_logit_softcapping=3.0, attn_logit_softcapping=1.0)),
    ("gemma3_mm", dict(tie_word_embeddings=True)),
])
@torch.inference_mode()
def test_logits_match_transformers(tiny_model_factory, family, overrides):
    folder = tiny_model_factory(family, **overrides)
    model, hf_config = load_model(ModelConfig(model=str(folder)), CPU)
    assert hf_config.num_hidden_layers == 4  # the text config, also for the multimodal one
    ids = torch.randint(0, 270, (30,), generator=torch.Generator().manual_seed(5)).tolist()
    expected = _hf_logits(folder, ids)
    torch.testing.assert_close(_our_logits(model, ids, [30]), expected, atol=1e-4, rtol=0)
    # prefill chunks past the window, then decode steps reading keys written before
    torch.testing.assert_close(_our_logits(model, ids, [9, 11, 1, 1, 8]), expected, atol=1e-4, rtol=0)


@torch.inference_mode()
def test_scaled_global_rope_matches_transformers(tmp_path):
    """Linear rope scaling applies to the global layers only (as Gemma 3 4B+ configs set it)."""
    from tests.tiny_models import make_tiny_model_dir

    folder = make_tiny_model_dir(tmp_path, "gemma3", rope_scaling={"rope_type": "linear", "factor": 4.0})
    model, _ = load_model(ModelConfig(model=str(folder)), CPU)
    assert gemma3.rope_params(model.config, gemma3.GLOBAL)["rope_type"] == "linear"
    assert gemma3.rope_params(model.config, gemma3.LOCAL)["rope_type"] == "default"
    ids = torch.randint(0, 270, (26,), generator=torch.Generator().manual_seed(6)).tolist()
    torch.testing.assert_close(_our_logits(model, ids, [26]), _hf_logits(folder, ids), atol=1e-4, rtol=0)


@torch.inference_mode()
def test_transformers_4_checkpoint_names_load(tiny_model_factory, tmp_path):
    """Gemma3ForConditionalGeneration checkpoints on the Hub (written by transformers 4.x) name the
    text model language_model.model.* and hold a vision tower, which is skipped."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_model_factory("gemma3_mm")
    shutil.copytree(src, tmp_path, dirs_exist_ok=True)
    tensors = load_file(src / "model.safetensors")
    renamed = {}
    for name, t in tensors.items():
        if name.startswith("model.language_model."):
            name = "language_model.model." + name.removeprefix("model.language_model.")
        elif name == "lm_head.weight":
            name = "language_model.lm_head.weight"
        elif name.startswith("model."):
            name = name.removeprefix("model.")  # vision_tower.*, multi_modal_projector.*
        renamed[name] = t
    assert any(n.startswith("vision_tower.") for n in renamed)
    save_file(renamed, tmp_path / "model.safetensors")
    model, _ = load_model(ModelConfig(model=str(tmp_path)), CPU)
    ids = torch.randint(0, 270, (20,), generator=torch.Generator().manual_seed(7)).tolist()
    torch.testing.assert_close(_our_logits(model, ids, [20]), _hf_logits(src, ids), atol=1e-4, rtol=0)


def test_greedy_and_logprobs_match_hf_generate(folder, reference):
    prompts, tokens, logprobs = reference
    llm = LLM(str(folder), dtype="float32", device="cpu", max_num_batched_tokens=64)
    _check(llm.generate(prompts, GREEDY), prompts, tokens, logprobs)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_keeps_outputs(folder, reference, mode):
    prompts, tokens, logprobs = reference
    # 16 blocks of 4 tokens cannot hold six requests of up to 52 tokens: preemption is forced
    llm = LLM(str(folder), dtype="float32", device="cpu", block_size=4, num_gpu_blocks_override=16,
              preemption_mode=mode, swap_space=0.01, max_num_batched_tokens=32,
              enable_prefix_caching=False)
    _check(llm.generate(prompts, GREEDY), prompts, tokens, logprobs)
    assert llm.stats()["num_preemptions"] > 0


def test_prefix_cache_hits_keep_outputs(folder):
    prompts = make_prompts(VOCAB, [3, 9, 5, 12], seed=1, shared=40)
    tokens = hf_greedy(folder, prompts, GREEDY.max_tokens)
    logprobs = _hf_logprobs(folder, prompts, tokens)
    llm = LLM(str(folder), dtype="float32", device="cpu", block_size=8, max_num_seqs=1)
    outs = llm.generate(prompts, GREEDY)
    _check(outs, prompts, tokens, logprobs)
    assert llm.stats()["prefix_cache_hits"] >= 3 * 40
    assert all(o.num_cached_tokens >= 40 for o in outs[1:])


def test_registry_serves_both_architectures_and_model_types():
    for arch in ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"):
        assert get_model_class(SimpleNamespace(architectures=[arch])) is gemma3.Gemma3ForCausalLM
    for model_type in ("gemma3_text", "gemma3"):
        assert get_model_class(SimpleNamespace(model_type=model_type)) is gemma3.Gemma3ForCausalLM


def test_older_config_keys():
    """sliding_window_pattern (every n-th layer global) and rope_theta / rope_scaling /
    rope_local_base_freq, as configs written before transformers 5 hold them."""
    cfg = SimpleNamespace(num_hidden_layers=7, sliding_window_pattern=3, rope_theta=5e5,
                          rope_scaling={"type": "linear", "factor": 8.0}, rope_local_base_freq=1e4)
    assert gemma3.layer_types(cfg) == [gemma3.LOCAL, gemma3.LOCAL, gemma3.GLOBAL] * 2 + [gemma3.LOCAL]
    assert gemma3.rope_params(cfg, gemma3.GLOBAL) == {"type": "linear", "factor": 8.0,
                                                       "rope_theta": 5e5, "rope_type": "linear"}
    assert gemma3.rope_params(cfg, gemma3.LOCAL) == {"rope_theta": 1e4, "rope_type": "default"}


@pytest.mark.parametrize("change, key", [
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(hidden_activation="gelu"), "hidden_activation"),
    (dict(layer_types=["sliding_attention", "chunked_attention"]), "layer_types"),
    (dict(sliding_window=None), "sliding_window"),
])
def test_configs_it_cannot_run_are_refused_by_key(change, key):
    cfg = SimpleNamespace(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                          sliding_window=8, hidden_activation="gelu_pytorch_tanh",
                          num_attention_heads=2, hidden_size=16, rms_norm_eps=1e-6)
    for name, value in change.items():
        setattr(cfg, name, value)
    with pytest.raises(gemma3.UnsupportedGemmaConfigError, match=key):
        gemma3._family(cfg)
