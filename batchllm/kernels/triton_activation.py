"""Triton SiLU-and-multiply and GELU(tanh)-and-multiply for gated MLPs (same contracts as the references)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, y_ptr, stride_x, stride_y, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + N + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # rounded like F.silu's output
    tl.store(y_ptr + row * stride_y + offs, silu * up, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = cat(gate, up) along the last dim."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim {x.shape[-1]} must be even (cat of gate and up)")
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, n)
    if x2.shape[0] > 0:
        block = min(1024, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, y2, x2.stride(0), y2.stride(0), n, BLOCK=block)
    return y


@triton.jit
def _gelu_tanh_and_mul_kernel(x_ptr, y_ptr, stride_x, stride_y, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + N + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    u = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2 / pi) * (g + 0.044715 g^3)
    tanh = 1.0 - 2.0 / (tl.exp(tl.minimum(2.0 * u, 60.0)) + 1.0)  # = tanh(u); +-1 in its tails
    gelu = (0.5 * g * (1.0 + tanh)).to(gate.dtype)  # rounded like F.gelu's output
    tl.store(y_ptr + row * stride_y + offs, gelu * up, mask=mask)


def _gated(kernel, x: torch.Tensor, name: str) -> torch.Tensor:
    """Launch a gated activation kernel over the rows of x = cat(gate, up)."""
    if x.shape[-1] % 2:
        raise ValueError(f"{name}: last dim {x.shape[-1]} must be even (cat of gate and up)")
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, n)
    if x2.shape[0] > 0:
        block = min(1024, triton.next_power_of_2(n))
        kernel[(x2.shape[0], triton.cdiv(n, block))](x2, y2, x2.stride(0), y2.stride(0), n, BLOCK=block)
    return y


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up for x = cat(gate, up) along the last dim (GeGLU)."""
    return _gated(_gelu_tanh_and_mul_kernel, x, "gelu_tanh_and_mul")
