"""One decoder for the Llama family: Llama 2/3/3.1/3.2, Mistral, SmolLM2, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k RMSNorm).

Assembled from batchllm.layers: fused q/k/v and gate/up projections (four matrix products a
layer), each split for tensor parallelism by its layer; `load_weights` maps the checkpoint's
separate tensors onto the fused parameters and lets each layer's weight_loader place its slice.
"""
from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace

import torch
from torch import nn

from batchllm.kernels import KernelSet
from batchllm.layers.activation import SiluAndMul
from batchllm.layers.attention import AttentionMetadata, PagedAttention
from batchllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from batchllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from batchllm.layers.norm import RMSNorm
from batchllm.layers.rotary import cos_sin_cache, rope_parameters
from batchllm.models import loading

# HF checkpoint module names -> our fused module and the part each fills
FUSED_NAMES: loading.FusedNames = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


def _family(hf_config) -> SimpleNamespace:
    """What the family flags of a config mean for the decoder (head counts are the model's totals)."""
    model_type = getattr(hf_config, "model_type", "llama")
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    return SimpleNamespace(
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        qkv_bias=bool(getattr(hf_config, "attention_bias", False)) or model_type == "qwen2",
        o_bias=bool(getattr(hf_config, "attention_bias", False)) and model_type != "qwen2",
        mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        eps=hf_config.rms_norm_eps,
    )


class LlamaAttention(nn.Module):
    """qkv projection, optional q/k norm, rotary, paged attention over this rank's heads, o projection."""

    def __init__(self, hidden: int, f: SimpleNamespace, kernels: KernelSet):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(hidden, f.head_dim, f.num_heads, f.num_kv_heads,
                                          bias=f.qkv_bias)
        self.o_proj = RowParallelLinear(f.num_heads * f.head_dim, hidden, bias=f.o_bias)
        self.qk_norm = f.qk_norm
        if f.qk_norm:
            self.q_norm = RMSNorm(f.head_dim, f.eps, kernels)
            self.k_norm = RMSNorm(f.head_dim, f.eps, kernels)
        qkv = self.qkv_proj  # this rank's heads
        self.num_heads, self.num_kv_heads, self.head_dim = qkv.num_heads, qkv.num_kv_heads, f.head_dim
        self.q_size, self.kv_size = qkv.q_size, qkv.kv_size
        self.attn = PagedAttention(qkv.num_heads, qkv.num_kv_heads, f.head_dim, kernels)
        self.kernels = kernels

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache,
                meta: AttentionMetadata, cos_sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.kernels.rotary_embedding(q, k, positions, cos_sin)
        o = self.attn(q, k, v.contiguous(), kv_cache, meta)
        return self.o_proj(o.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up fused into one column-parallel product."""

    def __init__(self, hidden: int, inter: int, bias: bool, kernels: KernelSet):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias=bias)
        self.down_proj = RowParallelLinear(inter, hidden, bias=bias)
        self.act_fn = SiluAndMul(kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block: attention, then the MLP (the gated one unless another is given, e.g. experts)."""

    def __init__(self, hf_config, f: SimpleNamespace, kernels: KernelSet, mlp: nn.Module | None = None):
        super().__init__()
        hidden = hf_config.hidden_size
        self.self_attn = LlamaAttention(hidden, f, kernels)
        self.mlp = mlp if mlp is not None else LlamaMLP(hidden, hf_config.intermediate_size,
                                                        f.mlp_bias, kernels)
        self.input_layernorm = RMSNorm(hidden, f.eps, kernels)
        self.post_attention_layernorm = RMSNorm(hidden, f.eps, kernels)

    def forward(self, positions, hidden, residual, kv_cache, meta: AttentionMetadata, cos_sin):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta, cos_sin)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM over a paged KV cache: forward() gives hidden states, compute_logits() logits."""

    def __init__(self, hf_config, dtype: torch.dtype, device: torch.device | str,
                 kernels: KernelSet | None = None):
        super().__init__()
        if kernels is None:
            from batchllm.kernels import get_kernels

            kernels = get_kernels("torch")
        self.config, f = hf_config, self.decoder_family(hf_config)
        self.family = f
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        vocab, hidden = hf_config.vocab_size, hf_config.hidden_size
        with torch.device("meta"):
            self.model = nn.Module()
            self.model.embed_tokens = VocabParallelEmbedding(vocab, hidden)
            self.model.layers = nn.ModuleList(
                self.decoder_layer(i, f, kernels) for i in range(hf_config.num_hidden_layers))
            self.model.norm = RMSNorm(hidden, f.eps, kernels)
            self.lm_head = ParallelLMHead(vocab, hidden, tied=self.tie_word_embeddings)
        self.to(dtype).to_empty(device=device)
        if self.tie_word_embeddings:  # after to_empty, which gives every parameter a new tensor
            self.lm_head.tie_to(self.model.embed_tokens)
        max_pos = getattr(hf_config, "max_position_embeddings", 4096)
        self.cos_sin = cos_sin_cache(f.head_dim, max_pos, rope_parameters(hf_config),
                                     torch.device(device))

    def decoder_family(self, hf_config) -> SimpleNamespace:
        """The family flags the layers are built from (a subclass adds its own)."""
        return _family(hf_config)

    def decoder_layer(self, index: int, f: SimpleNamespace, kernels: KernelSet) -> nn.Module:
        """Layer `index` of the stack (built on the meta device; a subclass may vary the MLP)."""
        return DecoderLayer(self.config, f, kernels)

    def use_kernels(self, kernels: KernelSet) -> None:
        """Switch every layer to another kernel set (torch reference or Triton)."""
        for module in self.modules():
            if hasattr(module, "kernels"):
                module.kernels = kernels

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """This rank's LM head weight (the embedding's when tied)."""
        return self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.model.embed_tokens(input_ids), None
        for layer, kv in zip(self.model.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv, attn_metadata, self.cos_sin)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits in the model's dtype (the sampler reads bf16 logits as they are; float32
        copies of a [batch, vocab] matrix cost a pass over it each step). `out`: write there."""
        return self.lm_head(hidden, out)

    def activation_bytes(self, num_tokens: int, num_sampled: int) -> int:
        """Device memory one full step needs beyond weights and cache, kept on the safe side:
        a few hidden-sized and intermediate-sized activations per token, float32 logits, probs
        and sampling noise per sampled row, and a 10% + 256 MiB margin for the allocator."""
        cfg = self.config
        elem = next(self.parameters()).element_size()
        per_token = elem * (8 * cfg.hidden_size + 6 * cfg.intermediate_size)
        logits = num_sampled * cfg.vocab_size * 4 * 4
        return int((per_token * num_tokens + logits) * 1.1) + (256 << 20)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Place checkpoint tensors (HF names) through each layer's weight_loader; returns the
        names filled (`name[start:end]` for parts of fused parameters)."""
        return loading.load_checkpoint_weights(self, weights, FUSED_NAMES, self._skips)

    def _skips(self, name: str) -> bool:
        """Checkpoint tensors with no parameter of their own here."""
        return "rotary_emb.inv_freq" in name or (
            name == "lm_head.weight" and self.tie_word_embeddings)

    def expected_weight_count(self) -> int:
        """How many load_weights entries a complete checkpoint fills (fused parts count apiece)."""
        return loading.expected_weight_count(self, FUSED_NAMES)
