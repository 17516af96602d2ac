"""Model shapes of BENCHMARKS.md as HF config dicts, their parameter counts, and dummy model folders.

Throughput depends on shapes, not weight values, so every benchmark model is a config.json in a
temporary folder, loaded with load_format="dummy" (random weights) and no tokenizer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
              rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
              attention_bias=False, mlp_bias=False, bos_token_id=128000, eos_token_id=128001,
              initializer_range=0.02, torch_dtype="bfloat16", use_cache=True)

# Qwen3-MoE: every layer routed (decoder_sparse_step 1, no mlp_only_layers), top-k weights renormalized
_QWEN3_MOE = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_act="silu",
                  rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                  attention_bias=False, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                  bos_token_id=151643, eos_token_id=151645, initializer_range=0.02,
                  torch_dtype="bfloat16", use_cache=True)

SHAPES: dict[str, dict] = {
    "Llama-3.2-1B": dict(_LLAMA, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, intermediate_size=8192, vocab_size=128256,
                         tie_word_embeddings=True),
    "Llama-3.1-8B": dict(_LLAMA, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
                         tie_word_embeddings=False),
    "Llama-3.1-70B": dict(_LLAMA, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, head_dim=128, intermediate_size=28672, vocab_size=128256,
                          tie_word_embeddings=False),
    "Qwen3-0.6B": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu",
                       hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
                       attention_bias=False, bos_token_id=151643, eos_token_id=151645,
                       initializer_range=0.02, torch_dtype="bfloat16", use_cache=True),
    "Qwen3-30B-A3B": dict(_QWEN3_MOE, hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                          moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                          vocab_size=151936, tie_word_embeddings=False),
    # not in BENCHMARKS.md: smoke-test shapes for CPU runs of the scripts (their vocabularies hold
    # every workload's token ids)
    "Tiny": dict(_LLAMA, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128, vocab_size=151936, tie_word_embeddings=True),
    "Tiny-MoE": dict(_QWEN3_MOE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
                     num_experts=8, num_experts_per_tok=2, vocab_size=151936, tie_word_embeddings=True),
}


@dataclass(frozen=True, slots=True)
class ShapeStats:
    """What the roofline needs about a shape (bf16: 2 bytes per parameter / cache element)."""

    non_embedding_params: int  # transformer blocks + final norm (no embedding, no lm_head); with
    # experts, those a token uses (router + top-k experts): the compute per token
    vocab: int
    hidden: int
    tied: bool
    kv_bytes_per_token: int    # K and V of every layer, bf16
    unused_expert_params: int = 0  # experts a token does not use (all of them are read per step)

    @property
    def weight_bytes_per_step(self) -> int:
        """Bytes of weights one forward step reads: the blocks plus the lm_head (the embedding
        lookup reads only a few rows; a tied lm_head is the embedding matrix, read once). A batched
        decode step of a mixture of experts reads every expert (at 256 requests, top 8 of 128,
        each expert is picked by some request with probability 1 - (120/128)^256 > 0.99999)."""
        return 2 * (self.non_embedding_params + self.unused_expert_params + self.vocab * self.hidden)


def shape_stats(name: str) -> ShapeStats:
    c = SHAPES[name]
    h, d = c["hidden_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    per_layer = h * q + 2 * h * kv + q * h + 2 * h
    unused = 0
    if "num_experts" in c:  # every layer routed (the shapes here have no dense layers)
        expert = 3 * h * c["moe_intermediate_size"]
        per_layer += h * c["num_experts"] + c["num_experts_per_tok"] * expert
        unused = c["num_hidden_layers"] * (c["num_experts"] - c["num_experts_per_tok"]) * expert
    else:
        per_layer += 3 * h * c["intermediate_size"]
    if c["model_type"] in ("qwen3", "qwen3_moe"):
        per_layer += 2 * d  # q_norm and k_norm
    non_emb = c["num_hidden_layers"] * per_layer + h
    return ShapeStats(non_emb, c["vocab_size"], h, c["tie_word_embeddings"],
                      2 * c["num_hidden_layers"] * kv * 2, unused)


def write_model_dir(name: str, folder: Path) -> Path:
    """Write `name`'s config.json into folder/name and return that folder."""
    if name not in SHAPES:
        raise KeyError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    out = Path(folder) / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(SHAPES[name], indent=2))
    return out
