"""Gemma 3 text decoder: Gemma3ForCausalLM, and the text half of Gemma3ForConditionalGeneration.

What differs from models/llama.py (as HF transformers 5.x's modeling_gemma3 computes it):
- layers alternate sliding-window (local) and global attention (`layer_types`, or older configs'
  `sliding_window_pattern`: every n-th layer global); local layers attend to the last
  `sliding_window` keys and rotate by `rope_parameters["sliding_attention"]` (older configs:
  `rope_local_base_freq`), global layers by `rope_parameters["full_attention"]` (`rope_theta`
  and `rope_scaling`);
- RMSNorms scale by (1 + weight), q/k norms over each head, four norms a block (input,
  post-attention, pre-feedforward, post-feedforward), GeGLU (tanh GELU), embeddings scaled by
  sqrt(hidden) rounded to the model's dtype, softmax scale `query_pre_attn_scalar ** -0.5`,
  `final_logit_softcapping` on the logits when set. `attn_logit_softcapping` is not applied:
  HF's Gemma 3 attention does not pass it to its attention functions either.
Vision weights of a Gemma3ForConditionalGeneration checkpoint are skipped (text only).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import SimpleNamespace

import torch
from torch import nn

from batchllm.kernels import KernelSet
from batchllm.layers.activation import GeluTanhAndMul
from batchllm.layers.attention import AttentionMetadata, PagedAttention
from batchllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from batchllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from batchllm.layers.norm import GemmaRMSNorm
from batchllm.layers.rotary import cos_sin_cache
from batchllm.models import loading
from batchllm.models.llama import FUSED_NAMES

LOCAL, GLOBAL = "sliding_attention", "full_attention"
# checkpoint prefixes of Gemma3ForConditionalGeneration's text model (transformers 5.x, then 4.x)
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
_VISION_PARTS = ("vision_tower.", "multi_modal_projector.")


class UnsupportedGemmaConfigError(ValueError):
    """A Gemma 3 config asks for something this decoder does not do; the message names the key."""


def text_config(hf_config):
    """The text model's config: `text_config` of a Gemma3ForConditionalGeneration config, else itself."""
    sub = getattr(hf_config, "text_config", None)
    return sub if sub is not None else hf_config


def layer_types(cfg) -> list[str]:
    """Each layer's attention kind, LOCAL or GLOBAL."""
    n = cfg.num_hidden_layers
    kinds = getattr(cfg, "layer_types", None)
    if kinds is None:
        pattern = int(getattr(cfg, "sliding_window_pattern", None) or 6)
        kinds = [GLOBAL if (i + 1) % pattern == 0 else LOCAL for i in range(n)]
    kinds = list(kinds)
    bad = sorted(set(kinds) - {LOCAL, GLOBAL})
    if bad or len(kinds) != n:
        raise UnsupportedGemmaConfigError(
            f"config layer_types {kinds!r}: expected {n} entries (num_hidden_layers), each "
            f"{LOCAL!r} or {GLOBAL!r}")
    return kinds


def rope_params(cfg, kind: str) -> dict:
    """The rotary settings of one kind of layer, from `rope_parameters[kind]` (transformers 5.x)
    or the older `rope_theta` + `rope_scaling` (global) / `rope_local_base_freq` (local)."""
    nested = getattr(cfg, "rope_parameters", None) or {}
    if kind in nested and nested[kind] is not None:
        params = dict(nested[kind])
    elif kind == GLOBAL:
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(cfg, "rope_theta", 1_000_000.0))
    else:
        params = {"rope_theta": getattr(cfg, "rope_local_base_freq", 10_000.0)}
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _family(cfg) -> SimpleNamespace:
    """What a Gemma 3 text config means for the decoder (head counts are the model's totals)."""
    if getattr(cfg, "use_bidirectional_attention", False):
        raise UnsupportedGemmaConfigError(
            "config use_bidirectional_attention=true (an embedding model) is not supported: "
            "batchllm generates with causal attention")
    act = getattr(cfg, "hidden_activation", None) or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise UnsupportedGemmaConfigError(
            f"config hidden_activation={act!r} is not supported (Gemma 3 uses 'gelu_pytorch_tanh')")
    kinds = layer_types(cfg)
    window = getattr(cfg, "sliding_window", None)
    if LOCAL in kinds and not (isinstance(window, int) and window >= 1):
        raise UnsupportedGemmaConfigError(
            f"config sliding_window={window!r}: local layers need a window of at least 1 token")
    num_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    return SimpleNamespace(
        num_heads=num_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        bias=bool(getattr(cfg, "attention_bias", False)),
        eps=cfg.rms_norm_eps,
        scale=float(getattr(cfg, "query_pre_attn_scalar", None) or head_dim) ** -0.5,
        layer_types=kinds,
        sliding_window=window,
        final_logit_softcapping=getattr(cfg, "final_logit_softcapping", None),
    )


class Gemma3Attention(nn.Module):
    """qkv projection, per-head q/k norm, rotary, paged attention (windowed on local layers), o projection."""

    def __init__(self, hidden: int, f: SimpleNamespace, local: bool, kernels: KernelSet):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(hidden, f.head_dim, f.num_heads, f.num_kv_heads, bias=f.bias)
        self.o_proj = RowParallelLinear(f.num_heads * f.head_dim, hidden, bias=f.bias)
        self.q_norm = GemmaRMSNorm(f.head_dim, f.eps, kernels)
        self.k_norm = GemmaRMSNorm(f.head_dim, f.eps, kernels)
        qkv = self.qkv_proj  # this rank's heads
        self.num_heads, self.num_kv_heads, self.head_dim = qkv.num_heads, qkv.num_kv_heads, f.head_dim
        self.q_size, self.kv_size = qkv.q_size, qkv.kv_size
        self.attn = PagedAttention(qkv.num_heads, qkv.num_kv_heads, f.head_dim, kernels, scale=f.scale,
                                   sliding_window=f.sliding_window if local else None)
        self.kernels = kernels

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache,
                meta: AttentionMetadata, cos_sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.view(-1, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim))
        q, k = self.kernels.rotary_embedding(q, k, positions, cos_sin)
        o = self.attn(q, k, v.reshape(-1, self.num_kv_heads, self.head_dim).contiguous(), kv_cache, meta)
        return self.o_proj(o.reshape(-1, self.q_size))


class Gemma3MLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)), gate and up fused into one column-parallel product."""

    def __init__(self, hidden: int, inter: int, kernels: KernelSet):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias=False)
        self.down_proj = RowParallelLinear(inter, hidden, bias=False)
        self.act_fn = GeluTanhAndMul(kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class Gemma3DecoderLayer(nn.Module):
    """x + post_attn(attn(input(x))), then + post_ff(mlp(pre_ff(.))), the adds fused into the next norm."""

    def __init__(self, cfg, f: SimpleNamespace, local: bool, kernels: KernelSet):
        super().__init__()
        hidden = cfg.hidden_size
        self.local = local
        self.self_attn = Gemma3Attention(hidden, f, local, kernels)
        self.mlp = Gemma3MLP(hidden, cfg.intermediate_size, kernels)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, GemmaRMSNorm(hidden, f.eps, kernels))

    def forward(self, positions, hidden, residual, kv_cache, meta: AttentionMetadata, cos_sin):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, kv_cache, meta, cos_sin))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma3ForCausalLM(nn.Module):
    """Gemma 3 over a paged KV cache: forward() gives hidden states, compute_logits() logits."""

    def __init__(self, hf_config, dtype: torch.dtype, device: torch.device | str,
                 kernels: KernelSet | None = None):
        super().__init__()
        if kernels is None:
            from batchllm.kernels import get_kernels

            kernels = get_kernels("torch")
        cfg = text_config(hf_config)
        self.config, f = cfg, _family(cfg)
        self.family = f
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", True))
        vocab, hidden = cfg.vocab_size, cfg.hidden_size
        with torch.device("meta"):
            self.model = nn.Module()
            self.model.embed_tokens = VocabParallelEmbedding(vocab, hidden)
            self.model.layers = nn.ModuleList(
                Gemma3DecoderLayer(cfg, f, kind == LOCAL, kernels) for kind in f.layer_types)
            self.model.norm = GemmaRMSNorm(hidden, f.eps, kernels)
            self.lm_head = ParallelLMHead(vocab, hidden, tied=self.tie_word_embeddings)
        self.to(dtype).to_empty(device=device)
        if self.tie_word_embeddings:  # after to_empty, which gives every parameter a new tensor
            self.lm_head.tie_to(self.model.embed_tokens)
        # HF multiplies by sqrt(hidden) held in the weights' dtype (bf16: sqrt(3072) -> 55.5)
        self.embed_scale = float(torch.tensor(hidden ** 0.5, dtype=dtype))
        max_pos = getattr(cfg, "max_position_embeddings", 8192)
        self.cos_sin = {kind: cos_sin_cache(f.head_dim, max_pos, rope_params(cfg, kind), torch.device(device))
                        for kind in sorted(set(f.layer_types))}

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
        hidden, residual = self.model.embed_tokens(input_ids) * self.embed_scale, None
        local, full = self.cos_sin.get(LOCAL), self.cos_sin.get(GLOBAL)
        for layer, kv in zip(self.model.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv, attn_metadata,
                                     local if layer.local else full)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits in the model's dtype, soft-capped (cap * tanh(logits / cap)) when the config
        says so, in place. `out`: write them there."""
        logits = self.lm_head(hidden, out)
        cap = self.family.final_logit_softcapping
        if cap:
            logits.div_(cap).tanh_().mul_(cap)
        return logits

    def activation_bytes(self, num_tokens: int, num_sampled: int) -> int:
        """Device memory one full step needs beyond weights and cache, kept on the safe side (as
        LlamaForCausalLM's, plus the two extra hidden-sized norms of a block)."""
        cfg = self.config
        elem = next(self.parameters()).element_size()
        per_token = elem * (10 * cfg.hidden_size + 6 * cfg.intermediate_size)
        logits = num_sampled * cfg.vocab_size * 4 * 4
        return int((per_token * num_tokens + logits) * 1.1) + (256 << 20)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Place checkpoint tensors (HF names; a Gemma3ForConditionalGeneration's text tensors
        renamed to Gemma3ForCausalLM's) through each layer's weight_loader; returns the names filled."""
        return loading.load_checkpoint_weights(self, _text_weights(weights), FUSED_NAMES, self._skips)

    def _skips(self, name: str) -> bool:
        """Checkpoint tensors with no parameter of their own here."""
        return "rotary_emb." in name or (name == "lm_head.weight" and self.tie_word_embeddings)

    def expected_weight_count(self) -> int:
        """How many load_weights entries a complete checkpoint fills (fused parts count apiece)."""
        return loading.expected_weight_count(self, FUSED_NAMES)


def _text_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The text model's tensors under Gemma3ForCausalLM's names; vision tower and projector dropped."""
    for name, tensor in weights:
        if any(part in name for part in _VISION_PARTS):
            continue
        for old, new in _TEXT_PREFIXES:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        yield name, tensor
