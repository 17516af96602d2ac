"""Any decoder transformers can build, on batchllm's paged KV cache: transformers' own modeling code
(embeddings, rotary, norms, MLP, LM head) with every attention call served by batchllm's kernels.

How it plugs in (transformers 5.x): the model is built with `attn_implementation=ATTN_NAME`, a
function registered in transformers' `AttentionInterface`. The step's flattened tokens go in as one
sequence (batch 1, `position_ids` from the plan); the step's caches and attention metadata ride in
the forward's keyword arguments (STEP_KWARG), which transformers passes down to every attention
call. No mask is built: transformers skips mask creation for an attention function it has no mask
function for, and the paged kernels are causal (and windowed where a layer passes
`sliding_window`). Nothing outlives a call: the registered function is stateless.

At construction a probe forward of two tokens (weights not yet loaded) records each layer's head
shapes, so the KV cache is sized from what the attention really receives, and refuses models whose
attention the paged cache cannot serve (layers without attention, head shapes that differ by
layer, keys and values of different widths, soft-capped or sink attention, non-causal layers).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from batchllm.kernels import KernelSet
from batchllm.layers.attention import AttentionMetadata
from batchllm.models.registry import UnsupportedModelError, fallback_problem

ATTN_NAME = "batchllm_paged"
STEP_KWARG = "batchllm_step"
# keyword arguments of transformers' attention calls that change the result and that the paged
# kernels do not apply (Gemma 2's logit cap, gpt-oss's sinks, T5-style position bias)
_UNSERVED = ("softcap", "s_aux", "sinks", "position_bias", "block_indices")
# model types whose transformers code replays in CUDA graphs with the fallback's attention, seen on
# an H200 (tests/gpu/test_fallback_gpu.py); other models run their decode steps eagerly, since a
# host sync inside transformers' code (an expert loop, a data-dependent branch) breaks a capture
GRAPH_SAFE_MODEL_TYPES = frozenset({"llama", "phi3", "olmo2", "granite", "gemma2"})
# rotary kinds that pick their frequencies from the batch's largest position on the host
_DYNAMIC_ROPE = {"dynamic", "longrope"}


class FallbackAttentionError(UnsupportedModelError):
    """The model's attention asked for something the paged kernels cannot do; names the layer."""


@dataclass(slots=True)
class StepContext:
    """What one forward's attention calls need; made per call, never kept."""

    layer_of: dict[nn.Module, int]
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    meta: AttentionMetadata | None = None
    kernels: KernelSet | None = None
    probe: list[tuple[nn.Module, tuple, tuple, tuple]] | None = field(default=None)


def paged_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            scaling: float | None = None, dropout: float = 0.0,
                            sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [1, H, T, D], key / value [1, KV, T, D] of the
    step's tokens; writes K/V into this layer's paged cache and returns [1, T, H, D]."""
    ctx = kwargs.get(STEP_KWARG)
    name = type(module).__name__
    if not isinstance(ctx, StepContext):
        raise FallbackAttentionError(
            f"{name} called batchllm's attention without the step's KV cache: this model's "
            "layers do not pass their keyword arguments on to attention, so the transformers "
            "fallback cannot serve it")
    unserved = [k for k in _UNSERVED if kwargs.get(k) is not None]
    if unserved:
        raise FallbackAttentionError(
            f"{name} asks for {', '.join(f'{k}={kwargs[k]!r}' for k in unserved)}, which batchllm's "
            "paged attention kernels do not apply")
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise FallbackAttentionError(f"{name} is not causal (bidirectional attention, as an "
                                     "encoder's); batchllm generates with causal attention only")
    if ctx.probe is not None:
        ctx.probe.append((module, tuple(query.shape), tuple(key.shape), tuple(value.shape)))
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None
    k_cache, v_cache = ctx.kv_caches[ctx.layer_of[module]]
    meta, kernels = ctx.meta, ctx.kernels
    q = query[0].transpose(0, 1).contiguous()
    kernels.write_kv(key[0].transpose(0, 1).contiguous(), value[0].transpose(0, 1).contiguous(),
                     k_cache, v_cache, meta.slot_mapping)
    scale = float(scaling) if scaling is not None else q.shape[-1] ** -0.5
    if sliding_window is None:
        out = kernels.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                      meta.query_start_loc, scale, meta.max_query_len,
                                      meta.max_seq_len, shared_prefix_len=meta.shared_prefix_len,
                                      seq_order=meta.seq_order)
    else:  # a windowed layer never takes the shared-prefix path (as PagedAttention)
        out = kernels.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                      meta.query_start_loc, scale, meta.max_query_len,
                                      meta.max_seq_len, seq_order=meta.seq_order,
                                      sliding_window=int(sliding_window))
    return out[None], None


def register_attention() -> None:
    """Make ATTN_NAME a valid attn_implementation (idempotent; the function holds no state)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, paged_attention_forward)


def _rope_types(cfg) -> set[str]:
    """Every rotary kind a config names (transformers 5.x rope_parameters, also per layer type,
    or the older rope_scaling)."""
    found = set()
    for params in (getattr(cfg, "rope_parameters", None), getattr(cfg, "rope_scaling", None)):
        if not isinstance(params, dict):
            continue
        nested = [v for v in params.values() if isinstance(v, dict)]
        for p in nested or [params]:
            found.add(p.get("rope_type") or p.get("type") or "default")
    return found


class _GivenHidden(nn.Module):
    """Stands in for the decoder when only the LM head runs: returns the hidden states it is given."""

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        return BaseModelOutputWithPast(last_hidden_state=inputs_embeds)


class TransformersForCausalLM(nn.Module):
    """A transformers causal LM over batchllm's paged KV cache: forward() gives hidden states [T, H],
    compute_logits() the model's own head (scaling, soft-capping and all) on the rows asked for."""

    runs_transformers_code = True  # registry.build_model passes trust_remote_code

    def __init__(self, hf_config, dtype: torch.dtype, device: torch.device | str,
                 kernels: KernelSet | None = None, trust_remote_code: bool = False):
        super().__init__()
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        from batchllm.distributed.parallel_state import get_tp_size

        arch = ", ".join(getattr(hf_config, "architectures", None) or [hf_config.model_type])
        if get_tp_size() > 1:
            raise UnsupportedModelError(
                f"tensor_parallel_size={get_tp_size()}: {arch} runs through the transformers "
                "fallback, which does not split a model over ranks; use tensor_parallel_size: 1 "
                "(data_parallel_size runs several copies)")
        problem = fallback_problem(hf_config)
        if problem:
            raise UnsupportedModelError(f"{arch} cannot run through the transformers fallback: {problem}")
        if kernels is None:
            from batchllm.kernels import get_kernels

            kernels = get_kernels("torch")
        self.kernels = kernels
        register_attention()
        with torch.device(device), no_init_weights():  # weights come from the checkpoint
            hf = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=ATTN_NAME,
                                                  trust_remote_code=trust_remote_code)
        if getattr(hf.config, "tie_word_embeddings", False):
            hf.tie_weights()
        self.hf = hf.eval().requires_grad_(False)
        self.config = hf.config
        self.architecture = arch
        prefix = getattr(hf, "base_model_prefix", "")
        decoder = getattr(hf, prefix, None) if prefix else None
        if not isinstance(decoder, nn.Module):
            raise UnsupportedModelError(f"{arch} has no decoder module at {prefix!r} "
                                        "(its base_model_prefix); the fallback cannot run it")
        head = copy.copy(hf)  # the same head over a decoder that returns its input
        head._modules = {**hf._modules, prefix: _GivenHidden()}
        # views of self.hf, kept out of the module tree (no second walk over the same parameters)
        object.__setattr__(self, "decoder", decoder)
        object.__setattr__(self, "_head", head)
        self.layer_of, self.family = self._probe(torch.device(device))
        # read by engine/build.py: capture decode steps in CUDA graphs only where that is known safe
        self.supports_cuda_graphs = (self.config.model_type in GRAPH_SAFE_MODEL_TYPES
                                     and not _rope_types(self.config) & _DYNAMIC_ROPE)

    @torch.inference_mode()
    def _probe(self, device: torch.device) -> tuple[dict[nn.Module, int], SimpleNamespace]:
        """Each attention layer's cache index and the head shapes the KV cache is sized by."""
        ctx = StepContext(layer_of={}, probe=[])
        ids, pos = torch.zeros(1, 2, dtype=torch.long, device=device), torch.arange(2, device=device)
        self.decoder(input_ids=ids, position_ids=pos[None], use_cache=False, **{STEP_KWARG: ctx})
        arch, n = self.architecture, self.config.num_hidden_layers
        modules = list(dict.fromkeys(m for m, *_ in ctx.probe))
        if len(modules) != n or len(ctx.probe) != n:
            raise UnsupportedModelError(
                f"{arch}: {len(modules)} of its {n} layers run attention through transformers' "
                f"attention interface ({len(ctx.probe)} calls); layers that keep a state of their "
                "own (recurrent, linear or shared attention) cannot use the paged KV cache")
        shapes = {(q[1], k[1], k[3], v[3], q[3]) for _, q, k, v in ctx.probe}
        if len(shapes) != 1:
            raise UnsupportedModelError(f"{arch}: attention head shapes differ by layer "
                                        f"({sorted(shapes)}); the paged KV cache needs one shape")
        ((heads, kv_heads, k_dim, v_dim, q_dim),) = shapes
        if not k_dim == v_dim == q_dim:
            raise UnsupportedModelError(f"{arch}: queries, keys and values have head sizes "
                                        f"{q_dim}, {k_dim}, {v_dim}; the paged kernels need one")
        indices = [getattr(m, "layer_idx", None) for m in modules]
        if sorted(i for i in indices if isinstance(i, int)) != list(range(n)):
            indices = list(range(n))  # no usable layer_idx: the order the layers ran in
        family = SimpleNamespace(num_heads=heads, num_kv_heads=kv_heads, head_dim=k_dim)
        return dict(zip(modules, indices)), family

    def use_kernels(self, kernels: KernelSet) -> None:
        """The kernel set attention runs on (torch reference or Triton); the rest is transformers'."""
        self.kernels = kernels

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.hf.get_output_embeddings().weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        ctx = StepContext(self.layer_of, kv_caches, attn_metadata, self.kernels)
        out = self.decoder(input_ids=input_ids[None], position_ids=positions[None], use_cache=False,
                           **{STEP_KWARG: ctx})
        return out[0][0]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The model's own LM head on `hidden` [N, H] (its logit scaling or soft-capping included);
        `out`: write them there."""
        logits = self._head(inputs_embeds=hidden[None], use_cache=False).logits[0]
        if out is None:
            return logits
        return out.copy_(logits)

    def activation_bytes(self, num_tokens: int, num_sampled: int) -> int:
        """Device memory one full step needs beyond weights and cache, on the safe side: eager
        transformers code keeps more temporaries alive than the fused native layers (q/k/v and
        their transposed copies, rotary products, the MLP's three intermediate-sized tensors)."""
        cfg = self.config
        elem = next(self.parameters()).element_size()
        inter = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size
        f = self.family
        attn = 4 * (f.num_heads + 2 * f.num_kv_heads) * f.head_dim
        per_token = elem * (12 * cfg.hidden_size + 8 * inter + attn)
        logits = num_sampled * cfg.vocab_size * 4 * 6
        return int((per_token * num_tokens + logits) * 1.2) + (512 << 20)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (the transformers model's own state-dict names) into place;
        returns the names filled, as this module names them (`hf.` + the transformers name)."""
        params = dict(self.hf.named_parameters(remove_duplicate=False))
        canonical = {id(p): name for name, p in self.hf.named_parameters()}
        buffers = dict(self.hf.named_buffers())
        prefix = self.hf.base_model_prefix + "."
        loaded: set[str] = set()
        for name, tensor in weights:
            target = name if name in params or name in buffers else prefix + name
            dest = params.get(target)
            if dest is None:
                if target in buffers or "rotary_emb." in name:
                    continue  # computed at construction (rotary tables, masks of old checkpoints)
                raise KeyError(
                    f"checkpoint tensor {name!r} has no place in transformers' "
                    f"{type(self.hf).__name__} (the fallback loads tensors under the model's own "
                    "names; checkpoints whose tensors transformers renames or merges on load, "
                    "such as per-expert weights, are not supported)")
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model's {target} {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.add("hf." + canonical[id(dest)])
        return loaded
