"""FP8 checkpoints as the HF hub stores them: which `quantization_config` formats load, and the
stream that hands their tensors to the layers.

    compressed-tensors, format float-quantized (llm-compressor's FP8 / FP8_DYNAMIC / FP8_BLOCK):
        <m>.weight float8_e4m3fn [N, K]; <m>.weight_scale float32 [N, 1] (strategy channel),
        one value (tensor) or [ceil(N/b0), ceil(K/b1)] (block); <m>.input_scale when static
    fbgemm_fp8 (Meta's Llama 3.1 FP8):  <m>.weight [N, K]; <m>.weight_scale [N, 1]
    fp8 (transformers' FineGrainedFP8, e.g. Qwen3-*-FP8): <m>.weight [N, K];
        <m>.weight_scale_inv [ceil(N/b0), ceil(K/b1)] with weight_block_size [b0, b1], or one
        value without it; <m>.activation_scale when static. Also AutoFP8's per-tensor
        <m>.weight_scale + <m>.input_scale under the same quant_method.

Every scale multiplies: W = weight * scale. Per-row and per-tensor scales go to the layers as
they are (the layers run those weights unchanged). Block-wise weights, and FP8 tensors of
modules batchllm keeps in bf16 (mixture-of-experts experts, routers), are dequantized here (in
float32, on the model's device), and the FP8 layers quantize them again per row. Static
activation scales and KV-cache scales are dropped: activations are quantized per token.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from batchllm.layers.weight_loading import materialize

SCALE_NAMES = ("weight_scale", "weight_scale_inv")
# per-tensor run-time scales a checkpoint may carry; batchllm quantizes activations per token
# and keeps its KV cache scale at 1, so these are not loaded
RUN_TIME_SCALES = frozenset({"input_scale", "input_scale_ub", "activation_scale", "output_scale",
                             "k_scale", "v_scale", "kv_scale", "q_scale", "input_zero_point"})
SUPPORTED = "compressed-tensors (float-quantized), fbgemm_fp8 and fp8"


class UnsupportedQuantization(ValueError):
    """The checkpoint's quantization_config is not an FP8 format batchllm loads; says which."""


@dataclass(frozen=True, slots=True)
class Fp8Checkpoint:
    """How an FP8 checkpoint stores its weights."""

    method: str  # quant_method in config.json
    block: tuple[int, int] | None = None  # block-wise weight scales [rows, cols]
    amax_cap: float | None = None  # FBGEMM's activation_scale_ub: per-token maxima capped here


def _as_dict(qc) -> dict:
    if isinstance(qc, dict):
        return qc
    return qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))


def _block(value, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        raise UnsupportedQuantization(f"{where}={value!r} is not a pair of positive integers")
    return int(value[0]), int(value[1])


def _compressed_tensors(qc: dict) -> Fp8Checkpoint:
    groups = qc.get("config_groups") or {}
    if not groups:
        raise UnsupportedQuantization("quantization_config (compressed-tensors) has no config_groups")
    block = None
    for name, group in groups.items():
        weights = (group or {}).get("weights") or {}
        fmt = group.get("format") or qc.get("format")
        where = f"quantization_config.config_groups.{name}"
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise UnsupportedQuantization(
                f"{where}.weights is {weights.get('type')!r} with {weights.get('num_bits')!r} bits; "
                f"batchllm loads FP8 weights only (type float, num_bits 8)")
        if fmt not in (None, "float-quantized"):
            raise UnsupportedQuantization(f"{where} stores weights as {fmt!r}; batchllm loads "
                                          f"compressed-tensors checkpoints in format float-quantized")
        if weights.get("symmetric") is False:
            raise UnsupportedQuantization(f"{where}.weights is asymmetric (zero points); batchllm "
                                          f"loads symmetric FP8 weights only")
        strategy = weights.get("strategy")
        if strategy not in ("channel", "tensor", "block"):
            raise UnsupportedQuantization(f"{where}.weights.strategy={strategy!r}; batchllm loads "
                                          f"channel, tensor and block FP8 scales")
        if strategy == "block":
            block = _block(weights.get("block_structure"), f"{where}.weights.block_structure")
    return Fp8Checkpoint("compressed-tensors", block)


def checkpoint_format(hf_config) -> Fp8Checkpoint | None:
    """The FP8 format of a checkpoint's config.json, or None when it is not quantized; raises
    UnsupportedQuantization (naming the key) for quantized checkpoints batchllm cannot load."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    qc = _as_dict(qc)
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method == "fbgemm_fp8":
        cap = qc.get("activation_scale_ub", 1200.0)
        return Fp8Checkpoint(method, None, float(cap) if cap is not None else None)
    if method == "fp8":
        if qc.get("fmt", "e4m3") != "e4m3":
            raise UnsupportedQuantization(f"quantization_config.fmt={qc.get('fmt')!r}; batchllm "
                                          f"loads float8 e4m3 weights only")
        if qc.get("scale_fmt", "float") != "float":
            raise UnsupportedQuantization(f"quantization_config.scale_fmt={qc.get('scale_fmt')!r}; "
                                          f"batchllm loads float32 scales only")
        return Fp8Checkpoint(method, _block(qc.get("weight_block_size"),
                                            "quantization_config.weight_block_size"))
    raise UnsupportedQuantization(
        f"quantization_config.quant_method={method!r} is not supported: batchllm loads FP8 "
        f"checkpoints ({SUPPORTED}) and unquantized ones (quantization: fp8 quantizes those "
        f"as they load)")


def scaled_modules(tensor_names: Iterable[str]) -> set[str]:
    """Checkpoint module names that carry a weight scale (their weights are FP8)."""
    return {name.rpartition(".")[0] for name in tensor_names
            if name.rpartition(".")[2] in SCALE_NAMES}


def dequantize(weight, scale, block: tuple[int, int] | None, device: torch.device) -> torch.Tensor:
    """float32 W = weight * scale for a per-tensor, per-row or block-wise scale."""
    w = materialize(weight).to(device).float()
    s = materialize(scale).to(device).float()
    rows, cols = w.shape[-2:]
    if s.numel() == 1:
        return w * s.reshape(())
    if s.numel() == rows and s.shape[-1] in (1, rows):
        return w * s.reshape(rows, 1)
    if block is not None and tuple(s.shape) == (-(-rows // block[0]), -(-cols // block[1])):
        full = s.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
        return w * full
    raise ValueError(f"has a scale of shape {tuple(s.shape)}, which fits neither one value, one per "
                     f"row of its [{rows}, {cols}] weight nor blocks of {block}")


def fp8_checkpoint_stream(weights: Iterable[tuple[str, torch.Tensor]], fmt: Fp8Checkpoint,
                          scaled: set[str], kept: Callable[[str], bool],
                          device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's (name, tensor) stream as the model's loaders take it.

    `scaled`: modules with a weight scale; `kept(module)`: whether an FP8 layer takes that
    module's FP8 tensors as they are. Their scales go on as `<module>.weight_scale`; the
    weights of every other scaled module are held until their scale arrives (or the scale
    until its weight) and go on dequantized. Raises ValueError naming a weight left without
    its scale, or a scale without its weight."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        module, _, leaf = name.rpartition(".")
        if leaf in RUN_TIME_SCALES or (leaf == "weight_zero_point" and module in scaled):
            continue
        if module not in scaled or leaf not in ("weight",) + SCALE_NAMES:
            yield name, tensor
            continue
        role = "weight" if leaf == "weight" else "scale"
        if fmt.block is None and kept(module):
            yield (name if role == "weight" else f"{module}.weight_scale"), tensor
            continue
        held = pending.setdefault(module, {})
        held[role] = tensor
        if len(held) == 2:
            del pending[module]
            try:
                yield f"{module}.weight", dequantize(held["weight"], held["scale"], fmt.block, device)
            except ValueError as exc:
                raise ValueError(f"checkpoint tensor {module}.weight {exc}") from exc
    for module, held in pending.items():
        has, lacks = ("an FP8 weight", "weight scale") if "weight" in held else ("a weight scale", "weight")
        raise ValueError(f"checkpoint module {module!r} has {has} but no {lacks}")
