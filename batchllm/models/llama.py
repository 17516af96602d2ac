"""One decoder for the Llama family: Llama 2/3/3.1/3.2, Mistral, SmolLM2, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k RMSNorm).

Projections are fused (q/k/v into one matrix, gate/up into one) so each layer runs four matrix
products; `load_weights` takes the checkpoint's separate tensors by their HF names and places them.
"""
from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace

import torch
from torch import nn

from batchllm.layers.attention import AttentionMetadata, PagedAttention
from batchllm.layers.rotary import cos_sin_cache, rope_parameters


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, kernels: SimpleNamespace):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps, self.kernels = eps, kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self.kernels.rms_norm(x, self.weight, self.eps)
        return self.kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)


def _family(hf_config) -> SimpleNamespace:
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


class DecoderLayer(nn.Module):
    def __init__(self, hf_config, f: SimpleNamespace, kernels: SimpleNamespace):
        super().__init__()
        hidden, inter = hf_config.hidden_size, hf_config.intermediate_size
        self.f, self.kernels = f, kernels
        self.q_size, self.kv_size = f.num_heads * f.head_dim, f.num_kv_heads * f.head_dim
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=f.qkv_bias)
        self.self_attn.o_proj = nn.Linear(self.q_size, hidden, bias=f.o_bias)
        if f.qk_norm:
            self.self_attn.q_norm = RMSNorm(f.head_dim, f.eps, kernels)
            self.self_attn.k_norm = RMSNorm(f.head_dim, f.eps, kernels)
        self.attn = PagedAttention(f.num_heads, f.num_kv_heads, f.head_dim, kernels)
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=f.mlp_bias)
        self.mlp.down_proj = nn.Linear(inter, hidden, bias=f.mlp_bias)
        self.input_layernorm = RMSNorm(hidden, f.eps, kernels)
        self.post_attention_layernorm = RMSNorm(hidden, f.eps, kernels)

    def forward(self, positions, hidden, residual, kv_cache, meta: AttentionMetadata, cos_sin):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        f, attn = self.f, self.self_attn
        qkv = attn.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, f.num_heads, f.head_dim)
        k = k.view(-1, f.num_kv_heads, f.head_dim)
        v = v.view(-1, f.num_kv_heads, f.head_dim)
        if f.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self.kernels.rotary_embedding(q, k, positions, cos_sin)
        o = self.attn(q, k, v.contiguous(), kv_cache, meta)
        hidden = attn.o_proj(o.reshape(-1, self.q_size))
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        hidden = self.mlp.down_proj(self.kernels.silu_and_mul(self.mlp.gate_up_proj(hidden)))
        return hidden, residual


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM over a paged KV cache: forward() gives hidden states, compute_logits() logits."""

    def __init__(self, hf_config, dtype: torch.dtype, device: torch.device | str,
                 kernels: SimpleNamespace | None = None):
        super().__init__()
        if kernels is None:
            from batchllm.kernels import get_kernels

            kernels = get_kernels("torch")
        self.config, f = hf_config, _family(hf_config)
        self.family = f
        with torch.device("meta"):
            self.model = nn.Module()
            self.model.embed_tokens = nn.Embedding(hf_config.vocab_size, hf_config.hidden_size)
            self.model.layers = nn.ModuleList(
                DecoderLayer(hf_config, f, kernels) for _ in range(hf_config.num_hidden_layers))
            self.model.norm = RMSNorm(hf_config.hidden_size, f.eps, kernels)
            self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
            if not self.tie_word_embeddings:
                self.lm_head = nn.Linear(hf_config.hidden_size, hf_config.vocab_size, bias=False)
        self.to(dtype).to_empty(device=device)
        max_pos = getattr(hf_config, "max_position_embeddings", 4096)
        self.cos_sin = cos_sin_cache(f.head_dim, max_pos, rope_parameters(hf_config),
                                     torch.device(device))

    def use_kernels(self, kernels: SimpleNamespace) -> None:
        """Switch every layer to another kernel set (torch reference or Triton)."""
        for module in self.modules():
            if hasattr(module, "kernels"):
                module.kernels = kernels

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight

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
        if out is None:
            return torch.nn.functional.linear(hidden, self.lm_head_weight)
        return torch.mm(hidden, self.lm_head_weight.t(), out=out)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (HF names) into the fused parameters; returns the names placed."""
        params = dict(self.named_parameters())
        f = self.family
        q, kv = f.num_heads * f.head_dim, f.num_kv_heads * f.head_dim
        inter = self.config.intermediate_size
        fused = {"q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, kv),
                 "v_proj": ("qkv_proj", q + kv, kv), "gate_proj": ("gate_up_proj", 0, inter),
                 "up_proj": ("gate_up_proj", inter, inter)}
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            parts = name.split(".")
            target, rows = name, None
            if len(parts) >= 2 and parts[-2] in fused:
                dest, start, size = fused[parts[-2]]
                target = ".".join(parts[:-2] + [dest, parts[-1]])
                rows = (start, size)
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            param = params[target]
            with torch.no_grad():
                dst = param if rows is None else param.narrow(0, rows[0], rows[1])
                if dst.shape != tensor.shape:
                    raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(dst.shape)}")
                dst.copy_(tensor.to(device=dst.device, dtype=dst.dtype))
            loaded.add(target if rows is None else f"{target}[{rows[0]}:{rows[0] + rows[1]}]")
        return loaded

    def expected_weight_count(self) -> int:
        """How many load_weights entries a complete checkpoint fills (fused parts count apiece)."""
        n = 0
        for name, _ in self.named_parameters():
            n += 3 if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias") else (
                2 if "gate_up_proj" in name else 1)
        return n
