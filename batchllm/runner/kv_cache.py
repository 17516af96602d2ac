"""KV cache storage: sized from measured free memory, paged GPU blocks plus a CPU pool for swapping."""
from __future__ import annotations

import torch


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    """K and V of one block across all layers."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class KVCache:
    """Paged K/V blocks on the device, and a CPU pool of the same layout for swap.

    Every layer's K (and V) is addressed as [blocks, block_size, kv_heads, head_dim] (the layout
    of kernels/reference.py), but its bytes sit as [blocks, kv_heads, block_size, head_dim]: the
    keys one KV head reads from a block are one contiguous run. The kernels follow strides, so
    only the memory order differs; decode attention reads it up to 15% faster on an H100
    (benchmarks/decode_layout.py: a float8 cache at head dim 64; 0-5% at head dim 128 or bf16).

    Storage: [layers, 2, blocks, kv_heads, block_size, head_dim]. Swap and copy-on-write move
    whole blocks across every layer in one indexed copy.
    """

    def __init__(self, num_layers: int, num_blocks: int, num_cpu_blocks: int, block_size: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim)
        self.device = device
        self.gpu = torch.zeros(shape, dtype=dtype, device=device)
        cpu_shape = (num_layers, 2, max(num_cpu_blocks, 0), num_kv_heads, block_size, head_dim)
        pin = device.type == "cuda" and num_cpu_blocks > 0
        self.cpu = torch.empty(cpu_shape, dtype=dtype, device="cpu", pin_memory=pin)
        self.num_blocks, self.num_cpu_blocks = num_blocks, max(num_cpu_blocks, 0)
        # block moves copy bytes (indexing has no float8 kernels on every device)
        self._gpu_bytes, self._cpu_bytes = self.gpu.view(torch.uint8), self.cpu.view(torch.uint8)

    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(K, V) of each layer as [blocks, block_size, kv_heads, head_dim] views."""
        return [(self.gpu[i, 0].transpose(1, 2), self.gpu[i, 1].transpose(1, 2)) for i in range(self.gpu.shape[0])]

    def _index(self, ids: list[int], device: torch.device) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=device)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (gpu block, cpu block) pairs device → host."""
        if not pairs:
            return
        src = self._index([p[0] for p in pairs], self.device)
        dst = self._index([p[1] for p in pairs], torch.device("cpu"))
        self._cpu_bytes[:, :, dst] = self._gpu_bytes[:, :, src].to("cpu")

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (cpu block, gpu block) pairs host → device."""
        if not pairs:
            return
        src = self._index([p[0] for p in pairs], torch.device("cpu"))
        dst = self._index([p[1] for p in pairs], self.device)
        self._gpu_bytes[:, :, dst] = self._cpu_bytes[:, :, src].to(self.device, non_blocking=True)

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: (src, dst) device blocks."""
        if not pairs:
            return
        src = self._index([p[0] for p in pairs], self.device)
        dst = self._index([p[1] for p in pairs], self.device)
        self._gpu_bytes[:, :, dst] = self._gpu_bytes[:, :, src]


def num_device_blocks(device: torch.device, block_bytes: int, gpu_memory_utilization: float,
                      cpu_kv_cache_bytes: int | None, activation_peak_bytes: int) -> int:
    """How many blocks fit: on CUDA, the card's share minus what is in use now (weights, other
    processes) minus the activations a full step needs; on CPU, the configured budget (1 GiB)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * gpu_memory_utilization) - (total - free) - activation_peak_bytes
        return max(budget // block_bytes, 0)
    return max((cpu_kv_cache_bytes or (1 << 30)) // block_bytes, 0)
