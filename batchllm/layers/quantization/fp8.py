"""FP8 (e4m3) W8A8 linears: per-row weight scales, per-token activation scales, one GEMM per call.

    W ≈ weight[n, k] * weight_scale[n]          (float8 e4m3 values, float32 scale per output row)
    x ≈ xq[m, k] * x_scale[m]                   (quantized per token as the layer runs)
    y = (xq @ weight^T) * x_scale[m] * weight_scale[n] + bias

On Hopper (and Ada) the product is one `torch._scaled_mm` with row-wise scales (float32 scale_a
[M, 1] and scale_b [1, N], the weight passed transposed, i.e. column-major); elsewhere the same
formula in float32 (`reference_linear`), so the CPU suite tests the arithmetic the GPU runs.
Nothing here reads a value back to the host: both paths run inside captured CUDA graphs.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from batchllm.layers.weight_loading import check_shape, copy_into

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8 e4m3 (fn) value
MIN_AMAX = 1e-12  # a row of zeros gets this instead of 0, so its scale is never 0 (no NaN)
_CHUNK_ROWS = 4096  # weights are quantized this many rows at a time (bounded float32 copies)

TokenQuant = Callable[[torch.Tensor, "float | None"], tuple[torch.Tensor, torch.Tensor]]


def quantize_rows(x: torch.Tensor, amax_cap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8 e4m3 [M, K], scale float32 [M, 1]) with x[m] ≈ q[m] * scale[m]: each row's
    largest |value| (capped at `amax_cap`, past which values saturate) maps to 448."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    if amax_cap is not None:
        amax = amax.clamp(max=amax_cap)
    scale = amax.clamp(min=MIN_AMAX) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight [N, K], float32 scale [N]) of a [N, K] weight, one scale per output row."""
    q = torch.empty(w.shape, dtype=FP8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], _CHUNK_ROWS):
        part_q, part_s = quantize_rows(w[start:start + _CHUNK_ROWS])
        q[start:start + part_q.shape[0]] = part_q
        scale[start:start + part_q.shape[0]] = part_s.squeeze(-1)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [N, K] of a float8 weight and its [N] scales."""
    return q.float() * scale.float().unsqueeze(-1)


def reference_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None, amax_cap: float | None = None) -> torch.Tensor:
    """The W8A8 product in float32 (x [M, K] -> y [M, N] in x's dtype): what scaled_mm_linear
    computes, for devices without float8 matrix units."""
    xq, x_scale = quantize_rows(x, amax_cap)
    y = F.linear(xq.float(), weight.float()) * x_scale * weight_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def scaled_mm_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None, amax_cap: float | None = None,
                     token_quant: TokenQuant = quantize_rows) -> torch.Tensor:
    """The W8A8 product through torch._scaled_mm (row-wise scales); x [M, K] -> y [M, N] in x's
    dtype (computed in bf16 unless x is fp16). K and N must be multiples of 16."""
    xq, x_scale = token_quant(x if x.stride(-1) == 1 else x.contiguous(), amax_cap)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    fused = bias if bias is not None and bias.dtype == out_dtype else None
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1),
                         bias=fused, out_dtype=out_dtype)
    if bias is not None and fused is None:
        y = y + bias.to(out_dtype)
    return y if y.dtype == x.dtype else y.to(x.dtype)


class Fp8LinearMethod:
    """How one linear layer holds and applies FP8 weights (its `quant_method`).

    The layer's `weight` becomes [out, in] float8 e4m3 and it gains `weight_scale` [out] float32,
    both sliced by the layer's own weight_loader like any row of the weight and bias. A checkpoint
    part arriving in float8 is copied as it is (its scale comes as `weight_scale`); one arriving
    in a wider float dtype is quantized row by row as it is copied, which is also how a bf16
    checkpoint becomes FP8. Scales start as NaN, so a part loaded without one is found
    (`unscaled_rows`)."""

    def __init__(self, amax_cap: float | None = None):
        self.amax_cap = amax_cap  # FBGEMM checkpoints' activation_scale_ub
        self.gemm = "reference"  # "scaled_mm" once select_gemm found it runs on this device
        self.token_quant: TokenQuant = quantize_rows

    def create_weights(self, layer: nn.Module, from_existing: bool) -> None:
        """Replace the layer's weight by FP8 parameters: quantized from the weight it holds
        (`from_existing`, e.g. dummy weights), or empty for a checkpoint to fill."""
        w = layer.weight
        if from_existing:
            q, scale = quantize_weight(w.data)
        else:
            q = torch.empty(w.shape, dtype=FP8, device=w.device)
            scale = torch.full((w.shape[0],), float("nan"), dtype=torch.float32, device=w.device)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)

    def load_weight_rows(self, layer: nn.Module, dst_start: int, src: torch.Tensor) -> None:
        """Fill rows [dst_start, dst_start + len(src)) of the weight from a checkpoint slice."""
        dst = layer.weight.data.narrow(0, dst_start, src.shape[0])
        if src.dtype == FP8:
            copy_into(dst, src)
        elif src.dtype.is_floating_point and src.element_size() > 1:
            check_shape(src, tuple(dst.shape))
            q, scale = quantize_weight(src.to(dst.device))
            dst.copy_(q)
            layer.weight_scale.data.narrow(0, dst_start, src.shape[0]).copy_(scale)
        else:
            raise ValueError(f"has dtype {src.dtype}; an FP8 layer takes float8_e4m3fn values "
                             f"(with their weight_scale) or floating-point weights to quantize")

    def scale_tensor(self, layer: nn.Module, tensor: torch.Tensor, part_rows: int) -> torch.Tensor:
        """A checkpoint's weight_scale as the layer's loader takes it: float32 [rows of the
        part]; a per-tensor scale (one value) is repeated over the part's rows."""
        scale = tensor.to(torch.float32).reshape(-1)
        return scale.expand(part_rows) if scale.numel() == 1 else scale

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.gemm == "scaled_mm":
            y = scaled_mm_linear(x2, layer.weight, layer.weight_scale, bias, self.amax_cap,
                                 self.token_quant)
        else:
            y = reference_linear(x2, layer.weight, layer.weight_scale, bias, self.amax_cap)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def select_gemm(device: torch.device) -> tuple[str, TokenQuant]:
    """("scaled_mm" | "reference", per-token quantizer) for FP8 layers on `device`: scaled_mm
    where torch runs it (CUDA compute capability 8.9 or higher), checked once on a small product
    against the reference; the Triton per-token quantizer on CUDA when it compiles and agrees."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return "reference", quantize_rows
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(24, 64, device=device, generator=gen, dtype=torch.bfloat16)
    w, ws = quantize_weight(torch.randn(48, 64, device=device, generator=gen))
    want = reference_linear(x, w, ws, None).float()
    token_quant: TokenQuant = quantize_rows
    try:
        from batchllm.layers.quantization.triton_fp8 import per_token_quant

        q, s = per_token_quant(x, None)
        q_ref, s_ref = quantize_rows(x)
        if torch.allclose(s, s_ref, rtol=1e-6, atol=0) and torch.allclose(  # within 1 ulp of e4m3
                q.float(), q_ref.float(), rtol=0.126, atol=2.0 ** -9):
            token_quant = per_token_quant
        else:
            logger.warning("FP8: the Triton per-token quantizer disagrees with torch here; using torch")
    except Exception as exc:  # no triton, or it cannot compile for this device
        logger.warning("FP8: Triton per-token quantizer unavailable (%s); using torch", exc)
    try:
        got = scaled_mm_linear(x, w, ws, None, None, token_quant).float()
        torch.cuda.synchronize(device)
    except RuntimeError as exc:
        logger.warning("FP8: torch._scaled_mm does not run here (%s); FP8 layers dequantize", exc)
        return "reference", quantize_rows
    if not torch.allclose(got, want, rtol=0.02, atol=0.02 * want.abs().max().item()):
        logger.warning("FP8: torch._scaled_mm disagrees with the reference here; FP8 layers dequantize")
        return "reference", quantize_rows
    return "scaled_mm", token_quant
