"""RMSNorm over the last dimension (Llama's and Gemma's 1 + weight), alone or fused with the residual add, through the model's kernel set."""
from __future__ import annotations

import torch
from torch import nn

from batchllm.kernels import KernelSet
from batchllm.layers.weight_loading import FilledRows, replicated_weight_loader


class RMSNorm(nn.Module):
    """x -> rms_norm(x) * weight; with a residual: (rms_norm(x + residual) * weight, x + residual).

    The scale is whole on every tensor-parallel rank. `kernels` is swapped by the model's
    `use_kernels` (torch reference or Triton)."""

    def __init__(self, size: int, eps: float, kernels: KernelSet):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps, self.kernels = eps, kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self.kernels.rms_norm(x, self.weight, self.eps)
        return self.kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: object = None) -> FilledRows:
        return replicated_weight_loader(param, loaded, shard_id)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the scale is 1 + weight (checkpoints store weight - 1; zeros are the
    identity scale), added in float32 as HF's Gemma3RMSNorm does."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self.kernels.rms_norm(x, self.weight, self.eps, weight_offset=1.0)
        return self.kernels.fused_add_rms_norm(x, residual, self.weight, self.eps, weight_offset=1.0)
