"""Triton per-token FP8 quantization: one program per row, the contract of fp8.quantize_rows.

The torch version takes five passes over the activations (float copy, abs, max, divide, cast);
this reads a row twice (the second time mostly from L2) and writes it once in float8.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchllm.layers.quantization.fp8 import FP8, FP8_MAX, MIN_AMAX

_FP8_MAX = tl.constexpr(FP8_MAX)
_MIN_AMAX = tl.constexpr(MIN_AMAX)


@triton.jit
def _per_token_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, amax_cap,
                            HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(x))
    amax = tl.max(acc, axis=0)
    if HAS_CAP:
        amax = tl.minimum(amax, amax_cap)
    scale = tl.maximum(amax, _MIN_AMAX) / _FP8_MAX
    tl.store(s_ptr + row, scale)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -_FP8_MAX), _FP8_MAX)
        tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)


def per_token_quant(x: torch.Tensor, amax_cap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8 e4m3 [M, K], scale float32 [M, 1]) of x [M, K] (last dim contiguous)."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"per_token_quant takes a [M, K] tensor with a contiguous last dim, "
                         f"got shape {tuple(x.shape)} strides {x.stride()}")
    m, k = x.shape
    q = torch.empty((m, k), dtype=FP8, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m > 0:
        block = min(2048, triton.next_power_of_2(k))
        _per_token_quant_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0),
                                      0.0 if amax_cap is None else float(amax_cap),
                                      HAS_CAP=amax_cap is not None, BLOCK=block,
                                      num_warps=4 if block <= 1024 else 8)
    return q, scale
