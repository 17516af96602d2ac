"""Memory sizing: how many KV-cache blocks fit beside the weights and a full step's activations."""
from __future__ import annotations

import torch


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    """K and V of one block across all layers."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def num_device_blocks(device: torch.device, block_bytes: int, gpu_memory_utilization: float,
                      cpu_kv_cache_bytes: int | None, activation_peak_bytes: int) -> int:
    """How many blocks fit: on CUDA, the card's share minus what is in use now (weights, other
    processes) minus the activations a full step needs (the model's own estimate,
    `model.activation_bytes`); on CPU, the configured budget (1 GiB)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * gpu_memory_utilization) - (total - free) - activation_peak_bytes
        return max(budget // block_bytes, 0)
    return max((cpu_kv_cache_bytes or (1 << 30)) // block_bytes, 0)
