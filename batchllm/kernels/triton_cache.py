"""Triton write of a step's K/V into the paged cache (same contract as reference.write_kv)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchllm.kernels.reference import FP8_MAX

_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    CACHE_BLOCK: tl.constexpr, FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:  # padding token
        return
    blk = slot // CACHE_BLOCK
    within = slot % CACHE_BLOCK
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_HEADS) & (d < HEAD_DIM)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
    if FP8:  # saturate: float8 e4m3 has no infinity
        k = tl.minimum(tl.maximum(k.to(tl.float32), -_FP8_MAX), _FP8_MAX)
        v = tl.minimum(tl.maximum(v.to(tl.float32), -_FP8_MAX), _FP8_MAX)
    tl.store(k_cache_ptr + blk * stride_kcb + within * stride_kcs + h * stride_kch + d * stride_kcd,
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + blk * stride_vcb + within * stride_vcs + h * stride_vch + d * stride_vcd,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store each token's K and V at its slot of the paged cache (in place); negative slots are skipped."""
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), CACHE_BLOCK=k_cache.shape[1],
        FP8=k_cache.dtype == torch.float8_e4m3fn)
