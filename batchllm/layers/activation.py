"""Gated MLP activations, act(x[..., :d]) * x[..., d:] through the model's kernel set: SiLU (SwiGLU) and tanh-GELU (GeGLU)."""
from __future__ import annotations

import torch
from torch import nn

from batchllm.kernels import KernelSet


class SiluAndMul(nn.Module):
    """[..., 2d] -> [..., d]. With tensor parallelism each rank's gate_up slice is [gate part |
    up part] of its own features, so the activation needs no communication."""

    def __init__(self, kernels: KernelSet):
        super().__init__()
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.silu_and_mul(x)


class GeluTanhAndMul(nn.Module):
    """[..., 2d] -> [..., d]: gelu_tanh(gate) * up (Gemma's GeGLU, HF's `gelu_pytorch_tanh`);
    tensor parallelism as SiluAndMul."""

    def __init__(self, kernels: KernelSet):
        super().__init__()
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.gelu_tanh_and_mul(x)
