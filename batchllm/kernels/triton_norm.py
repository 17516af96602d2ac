"""Triton RMSNorm and fused residual-add + RMSNorm (same contracts as the references)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, new_res_ptr, eps,
    stride_x, stride_r, stride_y, stride_nr,
    N: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr, W_OFFSET: tl.constexpr = 0.0,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if ADD:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = x + r  # in the input dtype, as `x + residual` is
        tl.store(new_res_ptr + row * stride_nr + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if W_OFFSET != 0.0:  # Gemma: the scale is 1 + weight
        w = w + W_OFFSET
    tl.store(y_ptr + row * stride_y + offs, (xf * inv * w).to(y_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, hidden] with a unit last stride (a copy only when it must be)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float, weight_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    x2 = _rows(x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, hidden)
    r2 = _rows(residual) if residual is not None else x2
    new_res = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    nr2 = new_res.view(-1, hidden) if new_res is not None else y2
    if x2.shape[0] > 0:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, y2, nr2, float(eps), x2.stride(0), r2.stride(0), y2.stride(0), nr2.stride(0),
            N=hidden, BLOCK=triton.next_power_of_2(hidden), ADD=residual is not None,
            W_OFFSET=float(weight_offset), num_warps=4 if hidden <= 4096 else 8)
    return y, new_res


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             weight_offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dim, computed in float32, returned in x's dtype; the scale is
    weight + weight_offset (1.0 for Gemma's norms)."""
    return _launch(x, None, weight, eps, weight_offset)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float, weight_offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass over the row."""
    if residual.dtype != x.dtype:
        raise TypeError(f"fused_add_rms_norm: residual dtype {residual.dtype} differs from x dtype {x.dtype}; "
                        "cast one of them first")
    y, new_res = _launch(x, residual, weight, eps, weight_offset)
    assert new_res is not None
    return y, new_res
