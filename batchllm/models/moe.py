"""Mixture-of-experts decoders, Qwen3-MoE and Mixtral (flags, not files): Llama's decoder with a routed FusedMoE MLP.

    Qwen3-MoE (e.g. Qwen3-30B-A3B: 128 experts, top 8): q/k RMSNorm as Qwen3; the top-k weights
      are renormalized to sum to 1 when `norm_topk_prob`; a layer named in `mlp_only_layers`, or
      one that `decoder_sparse_step` skips, keeps a dense gated MLP (`intermediate_size`).
    Mixtral (8 experts, top 2): always renormalized, i.e. a softmax over the top-k logits.

The router (a replicated [E, H] gate, softmax in float32, top-k) lives here, on every
tensor-parallel rank; the experts are one FusedMoE a layer (stacked weights, split by intermediate
features). Attention, norms, embeddings, rotary and the forward pass are LlamaForCausalLM's.
Checkpoints hold one tensor per expert and projection (`experts.<e>.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.<e>.w1.weight`), placed by FusedMoE's weight_loader; transformers' own
stacked parameters (`mlp.experts.gate_up_proj`, what a GGUF file loads into) fit as they are.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from types import SimpleNamespace

import torch
from torch import nn

from batchllm.kernels import KernelSet
from batchllm.layers.fused_moe import FusedMoE, expert_parts
from batchllm.layers.linear import ReplicatedLinear
from batchllm.models import loading
from batchllm.models.llama import FUSED_NAMES, DecoderLayer, LlamaForCausalLM

# "<prefix>.experts.<e>.<projection>.weight" of a checkpoint
_EXPERT_TENSOR = re.compile(r"(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight")


def route(router_logits: torch.Tensor, top_k: int,
          renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, K] float32, expert ids [T, K]): the k most probable experts of each token under
    softmax(router_logits) in float32, their probabilities rescaled to sum to 1 when
    `renormalize` (which equals a softmax over the top-k logits)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class SparseMoeBlock(nn.Module):
    """The routed MLP: gate (router logits) -> top-k experts -> their weighted sum."""

    def __init__(self, hidden: int, f: SimpleNamespace, kernels: KernelSet):
        super().__init__()
        self.gate = ReplicatedLinear(hidden, f.num_experts, bias=False)
        self.experts = FusedMoE(f.num_experts, hidden, f.moe_intermediate_size, kernels)
        self.top_k, self.renormalize = f.top_k, f.renormalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        return self.experts(x, weights, ids)


def moe_family(hf_config, f: SimpleNamespace) -> SimpleNamespace:
    """Add the mixture-of-experts flags of a Qwen3-MoE or Mixtral config to the decoder's flags `f`."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ("qwen3_moe", "mixtral"):
        raise ValueError(f"model_type {model_type!r} is not a mixture of experts batchllm knows "
                         f"(qwen3_moe, mixtral)")
    qwen = model_type == "qwen3_moe"
    num_layers = hf_config.num_hidden_layers
    f.qk_norm = qwen
    f.num_experts = hf_config.num_experts if qwen else hf_config.num_local_experts
    f.top_k = hf_config.num_experts_per_tok
    if qwen:
        f.moe_intermediate_size = hf_config.moe_intermediate_size
        f.renormalize = bool(hf_config.norm_topk_prob)
        step = hf_config.decoder_sparse_step
        dense = set(hf_config.mlp_only_layers or [])
        f.sparse_layers = frozenset(i for i in range(num_layers) if f.num_experts > 0 and
                                    i not in dense and step > 0 and (i + 1) % step == 0)
        f.expert_parts = expert_parts("gate_proj", "up_proj", "down_proj")
    else:
        f.moe_intermediate_size = hf_config.intermediate_size
        f.renormalize = True
        f.sparse_layers = frozenset(range(num_layers))
        f.expert_parts = expert_parts("w1", "w3", "w2")
    if f.sparse_layers and not 0 < f.top_k <= f.num_experts:
        raise ValueError(f"num_experts_per_tok={f.top_k} in config.json must be between 1 and the "
                         f"number of experts ({f.num_experts})")
    return f


class MoeForCausalLM(LlamaForCausalLM):
    """Qwen3-MoE and Mixtral over the paged KV cache; forward, logits and kernels as the dense decoder."""

    def decoder_family(self, hf_config) -> SimpleNamespace:
        return moe_family(hf_config, super().decoder_family(hf_config))

    def decoder_layer(self, index: int, f: SimpleNamespace, kernels: KernelSet) -> nn.Module:
        sparse = index in f.sparse_layers
        mlp = SparseMoeBlock(self.config.hidden_size, f, kernels) if sparse else None
        return DecoderLayer(self.config, f, kernels, mlp=mlp)

    def activation_bytes(self, num_tokens: int, num_sampled: int) -> int:
        """As the dense decoder's, with the MLP's share the larger of a dense layer's (if any) and
        the routed one's: per token the router's float32 logits, probabilities and top-k, and per
        token-expert pair the gate/up output and the down output in the model's dtype, two float32
        rows of the down output (the torch path's accumulation) and the grouping's indices."""
        cfg, f = self.config, self.family
        elem = next(self.parameters()).element_size()
        hidden = cfg.hidden_size
        routed = 12 * f.num_experts + f.top_k * (
            elem * (2 * f.moe_intermediate_size + hidden) + 8 * hidden + 32)
        dense = elem * 6 * cfg.intermediate_size if len(f.sparse_layers) < cfg.num_hidden_layers else 0
        per_token = elem * 8 * hidden + max(routed, dense)
        logits = num_sampled * cfg.vocab_size * 4 * 4
        return int((per_token * num_tokens + logits) * 1.1) + (256 << 20)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Place checkpoint tensors (HF names): each expert's projections through its layer's
        FusedMoE weight_loader, the rest as the dense decoder does. An expert counts as loaded
        (`name[e:e+1]`) once every part of it is."""
        params = dict(self.named_parameters())
        parts = self.family.expert_parts
        seen: dict[tuple[str, int], set[int | None]] = {}
        loaded: set[str] = set()

        def others() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                ours = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's name for the block
                match = _EXPERT_TENSOR.fullmatch(ours)
                if match is None or match["proj"] not in parts:
                    yield ours, tensor
                    continue
                param_name, part = parts[match["proj"]]
                target, expert = f"{match['prefix']}.{param_name}", int(match["expert"])
                if target not in params:
                    raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__} "
                                   f"(is this layer dense in config.json's mlp_only_layers?)")
                try:
                    self.get_submodule(match["prefix"]).weight_loader(params[target], tensor,
                                                                      (expert, part))
                except ValueError as exc:
                    raise ValueError(f"checkpoint tensor {name!r} {exc}") from exc
                done = seen.setdefault((target, expert), set())
                done.add(part)
                if len(done) == (1 if part is None else 2):
                    loaded.add(f"{target}[{expert}:{expert + 1}]")

        loaded |= loading.load_checkpoint_weights(self, others(), FUSED_NAMES, self._skips)
        return loaded

    def expected_weight_count(self) -> int:
        """How many load_weights entries a complete checkpoint of per-expert tensors (as HF
        checkpoints store them) fills: each expert of a stacked parameter counts apiece."""
        stacked = sum(2 * (m.num_experts - 1) for m in self.modules() if isinstance(m, FusedMoE))
        return loading.expected_weight_count(self, FUSED_NAMES) + stacked
