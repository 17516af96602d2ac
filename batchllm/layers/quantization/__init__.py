"""Weight quantization of the decoder's linear layers (FP8 W8A8): which layers, from which
checkpoint, and the steps loading takes around `model.load_weights`.

    plan = plan_fp8(model, setting, hf_config, tensor_names, fused)   # None: nothing to quantize
    plan.create(from_existing=False)        # FP8 parameters on the chosen layers (empty)
    model.load_weights(plan.stream(weights, device))
    plan.finish(device)                     # every scale filled; GEMM path for this device

Which layers: with `quantization: fp8` on an unquantized checkpoint, every column/row-parallel
projection (attention q/k/v/o, MLP gate/up/down) except mixture-of-experts routers; the
embeddings, the LM head and the experts stay in the model's dtype. With an FP8 checkpoint, the
projections whose checkpoint tensors carry a weight scale (a part of a fused projection left
unquantized by the checkpoint is quantized as it loads; a projection wholly left unquantized
stays so).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from batchllm.layers.linear import LinearBase
from batchllm.layers.quantization.formats import (Fp8Checkpoint, UnsupportedQuantization,
                                                  checkpoint_format, fp8_checkpoint_stream,
                                                  scaled_modules)
from batchllm.layers.quantization.fp8 import Fp8LinearMethod, select_gemm

__all__ = ["Fp8Plan", "UnsupportedQuantization", "plan_fp8", "fp8_layers"]

# what a checkpoint module name may start with before the decoder's own names
_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")


def layer_key(name: str) -> str:
    """A module name without its model prefix (ours, a causal LM's or a multimodal model's)."""
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def checkpoint_parts(name: str, fused: dict[str, tuple[str, object]]) -> list[str]:
    """Checkpoint module names that fill our module `name` (itself, and the parts fused into it)."""
    prefix, _, leaf = name.rpartition(".")
    return [name] + [f"{prefix}.{part}" if prefix else part
                     for part, (dest, _) in fused.items() if dest == leaf]


def _is_router(name: str) -> bool:
    return name.endswith(".gate")  # a mixture-of-experts router (mlp.gate), kept in full precision


def fp8_layers(model: nn.Module) -> dict[str, LinearBase]:
    """The model's linear layers that hold FP8 weights, by name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, LinearBase) and isinstance(m.quant_method, Fp8LinearMethod)}


@dataclass(slots=True)
class Fp8Plan:
    """Which layers of one model become FP8 and how its checkpoint's tensors reach them."""

    checkpoint: Fp8Checkpoint | None  # None: an unquantized checkpoint, quantized as it loads
    layers: dict[str, LinearBase]
    raw_parts: frozenset[str]  # layer_key of checkpoint modules whose FP8 tensors load as they are
    scaled: set[str]  # checkpoint modules with a weight scale

    def create(self, from_existing: bool) -> None:
        """Give every chosen layer FP8 parameters (quantized from its weight, or empty)."""
        cap = self.checkpoint.amax_cap if self.checkpoint is not None else None
        for layer in self.layers.values():
            layer.set_quant_method(Fp8LinearMethod(cap), from_existing)

    def stream(self, weights: Iterable[tuple[str, torch.Tensor]],
               device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors as the layers take them (formats.fp8_checkpoint_stream)."""
        if self.checkpoint is None:
            return iter(weights)
        return fp8_checkpoint_stream(weights, self.checkpoint, self.scaled,
                                     lambda module: layer_key(module) in self.raw_parts, device)

    def finish(self, device: torch.device) -> None:
        """Check that every FP8 row has its scale (ValueError naming the layers that lack one)
        and pick the GEMM path for `device` (one check on the host, before any step)."""
        names = list(self.layers)
        if names:
            unscaled = torch.stack([self.layers[n].weight_scale.isnan().any() for n in names])
            missing = [n for n, bad in zip(names, unscaled.tolist()) if bad]
            if missing:
                raise ValueError(f"{len(missing)} FP8 layers have rows without a weight scale "
                                 f"(FP8 weights with no weight_scale in the checkpoint): "
                                 f"{', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
        gemm, token_quant = select_gemm(device)
        for layer in self.layers.values():
            method = layer.quant_method
            k, n = layer.weight.shape[1], layer.weight.shape[0]
            method.gemm = gemm if k % 16 == 0 and n % 16 == 0 else "reference"
            method.token_quant = token_quant


def plan_fp8(model: nn.Module, setting: str | None, hf_config,
             tensor_names: Iterable[str] | None,
             fused: dict[str, tuple[str, object]]) -> Fp8Plan | None:
    """The FP8 plan for `model` (None: it stays unquantized).

    `setting`: the engine's `quantization` (None or "fp8"); `tensor_names`: the checkpoint's
    tensor names (None for dummy weights: every projection is quantized); `fused`: checkpoint
    module name -> (our fused module, part), as the model's loader maps them. Raises
    UnsupportedQuantization for a quantized checkpoint that is not FP8, or a model with no
    linear layers of batchllm's to quantize."""
    fmt = checkpoint_format(hf_config)
    if fmt is None and setting != "fp8":
        return None
    candidates = {name: m for name, m in model.named_modules()
                  if isinstance(m, LinearBase) and not _is_router(name)}
    if not candidates:
        why = "an FP8 checkpoint" if fmt is not None else "quantization=fp8"
        raise UnsupportedQuantization(
            f"{why} needs batchllm's own linear layers, and {type(model).__name__} has none (a "
            f"model run through transformers' modeling code cannot be quantized); use an "
            f"architecture batchllm implements, or an unquantized checkpoint without quantization")
    if fmt is None or tensor_names is None:
        return Fp8Plan(fmt, candidates, frozenset(), set())
    scaled = scaled_modules(tensor_names)
    scaled_keys = {layer_key(m) for m in scaled}
    chosen = {name: m for name, m in candidates.items()
              if any(layer_key(p) in scaled_keys for p in checkpoint_parts(name, fused))}
    raw = frozenset(layer_key(p) for name in chosen for p in checkpoint_parts(name, fused))
    return Fp8Plan(fmt, chosen, raw, scaled)
