"""Qwen3-MoE and Mixtral vs Hugging Face transformers on the same tiny random weights (float32):
teacher-forced logits within 1e-4, greedy outputs equal to HF `generate`, also when requests are
preempted and when prompts hit the prefix cache; every expert of the checkpoint must land.

The tolerance is test_parity.py's: two correct float32 implementations differ by ~1e-6 here,
while routing a token to a wrong expert, a missed renormalization or a dense layer built as a
sparse one moves these logits by 1e-1 or more.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from batchllm import LLM
from batchllm.config import ModelConfig
from batchllm.loader import ModelLoadError, checkpoint_weights, load_model
from tests.e2e.test_generate import GREEDY, VOCAB, hf_greedy, make_prompts
from tests.models.test_parity import _hf_logits, _our_logits

CPU = torch.device("cpu")
# Qwen3-MoE with dense layers: decoder_sparse_step 2 makes layers 1 and 3 sparse, mlp_only_layers
# takes layer 3 back, so only layer 1 routes; its top-k weights are not renormalized
QWEN_DENSE_LAYERS = dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=(3,),
                         norm_topk_prob=False)


@pytest.mark.parametrize("family, overrides", [
    ("qwen3_moe", {}), ("qwen3_moe", QWEN_DENSE_LAYERS), ("qwen3_moe", dict(tie_word_embeddings=True)),
    ("mixtral", {}), ("mixtral", dict(num_experts_per_tok=1, num_hidden_layers=3)),
])
@torch.inference_mode()
def test_logits_match_transformers(tiny_model_factory, family, overrides):
    folder = tiny_model_factory(family, **overrides)
    model, _ = load_model(ModelConfig(model=str(folder)), CPU)
    token_ids = torch.randint(0, 270, (23,), generator=torch.Generator().manual_seed(5)).tolist()
    expected = _hf_logits(folder, token_ids)
    torch.testing.assert_close(_our_logits(model, token_ids, [23]), expected, atol=1e-4, rtol=0)
    # prefill in chunks, then single-token decode steps (one token routed alone)
    stepped = _our_logits(model, token_ids, [9, 6, 1, 1, 6])
    torch.testing.assert_close(stepped, expected, atol=1e-4, rtol=0)


def test_dense_and_sparse_layers_follow_the_config(tiny_model_factory):
    folder = tiny_model_factory("qwen3_moe", **QWEN_DENSE_LAYERS)
    model, _ = load_model(ModelConfig(model=str(folder)), CPU)
    routed = [hasattr(layer.mlp, "experts") for layer in model.model.layers]
    assert routed == [False, True, False, False]


def test_more_experts_per_token_than_experts_is_refused_by_name():
    from batchllm.models.moe import MoeForCausalLM
    from tests.tiny_models import tiny_config

    with pytest.raises(ValueError, match=r"num_experts_per_tok=5 in config.json .* experts \(4\)"):
        MoeForCausalLM(tiny_config("mixtral", num_experts_per_tok=5), torch.float32, CPU)


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe_reference(request, tiny_model_factory):
    folder = tiny_model_factory(request.param)
    prompts = make_prompts(VOCAB, [5, 17, 33, 8, 40, 16])
    return folder, prompts, hf_greedy(folder, prompts, GREEDY.max_tokens)


def test_greedy_matches_hf_generate(moe_reference):
    folder, prompts, expected = moe_reference
    llm = LLM(str(folder), dtype="float32", device="cpu", max_num_batched_tokens=64)
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_keeps_greedy_outputs(moe_reference, mode):
    folder, prompts, expected = moe_reference
    # 16 blocks of 4 tokens cannot hold six requests of up to 52 tokens: preemption is forced
    llm = LLM(str(folder), dtype="float32", device="cpu", block_size=4, num_gpu_blocks_override=16,
              preemption_mode=mode, swap_space=0.01, max_num_batched_tokens=32,
              enable_prefix_caching=False)
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.stats()["num_preemptions"] > 0


def test_prefix_cache_hits_keep_outputs(moe_reference):
    folder = moe_reference[0]
    prompts = make_prompts(VOCAB, [3, 9, 5, 12], seed=1, shared=40)
    expected = hf_greedy(folder, prompts, GREEDY.max_tokens)
    llm = LLM(str(folder), dtype="float32", device="cpu", block_size=8,
              enable_prefix_caching=True, max_num_seqs=1)
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    # the 40 shared tokens are 5 full blocks of 8; the three later prompts reuse them
    assert llm.stats()["prefix_cache_hits"] >= 3 * 40
    assert all(o.num_cached_tokens >= 40 for o in outs[1:])


def _rewrite_checkpoint(src, dst, edit) -> None:
    """Copy a model folder, passing its tensors through edit(name, tensor) -> (name, tensor) | None."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = {}
    for name, tensor in load_file(dst / "model.safetensors").items():
        kept = edit(name, tensor)
        if kept is not None:
            tensors[kept[0]] = kept[1]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_every_expert_must_load(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("mixtral")
    model, _ = load_model(ModelConfig(model=str(folder)), CPU)
    weights, _ = checkpoint_weights(folder, "auto", allow_pickle=False)
    assert len(model.load_weights(weights)) == model.expected_weight_count()

    up = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    _rewrite_checkpoint(folder, tmp_path / "no-up", lambda n, t: None if n == up else (n, t))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj \(rows 3:4\)"):
        load_model(ModelConfig(model=str(tmp_path / "no-up")), CPU)

    def renumber(name, tensor):  # expert 3 of layer 0 saved as expert 7 of a 4-expert model
        return name.replace("layers.0.block_sparse_moe.experts.3.", "layers.0.block_sparse_moe.experts.7."), tensor

    _rewrite_checkpoint(folder, tmp_path / "expert-7", renumber)
    with pytest.raises(ModelLoadError, match=r"experts\.7\.w1\.weight' is for expert 7, but this "
                                             r"layer has experts 0\.\.3"):
        load_model(ModelConfig(model=str(tmp_path / "expert-7")), CPU)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_transformers_stacked_experts_load_the_same(tiny_model_factory, family):
    """transformers' in-memory names hold all experts in one tensor (what a GGUF file loads as)."""
    from transformers import AutoModelForCausalLM

    from batchllm.loader import check_all_loaded

    folder = tiny_model_factory(family)
    expected, _ = load_model(ModelConfig(model=str(folder)), CPU)
    model, _ = load_model(ModelConfig(model=str(folder), load_format="dummy"), CPU)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert any(name.endswith("experts.gate_up_proj") for name in hf.state_dict())
    check_all_loaded(model, model.load_weights(hf.state_dict().items()), "transformers")
    for (name, got), want in zip(model.named_parameters(), expected.parameters()):
        assert torch.equal(got, want), name
