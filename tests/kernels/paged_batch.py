"""Random paged-attention batches for kernel tests: scattered block tables, poisoned spare slots."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from batchllm.kernels import reference


@dataclass(slots=True)
class PagedBatch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    scale: float
    max_query_len: int
    max_seq_len: int

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens,
                self.query_start_loc, self.scale, self.max_query_len, self.max_seq_len)


def cache_like_engine(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                      fill: float, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A [blocks, block_size, kv_heads, head_dim] cache stored head-major, as the engine's
    KVCache stores it, so the kernels are tested on the strides they meet in a run."""
    storage = torch.full((num_blocks, num_kv_heads, block_size, head_dim), fill, dtype=dtype, device=device)
    return storage.transpose(1, 2)


def make_batch(requests: list[tuple[int, int]], *, num_heads: int, num_kv_heads: int, head_dim: int,
               block_size: int, dtype: torch.dtype, device: torch.device, seed: int) -> PagedBatch:
    """requests: (context length incl. this step, query length) per request.

    The caches are stored head-major (cache_like_engine). Every request's blocks are drawn at random from a shuffled pool, so block tables are not
    contiguous; the unused tail of each last block and the spare blocks hold NaN, which poisons
    any output that reads past a context; unused block-table entries point at a NaN block.
    """
    g = torch.Generator().manual_seed(seed)
    need = [(ctx + block_size - 1) // block_size for ctx, _ in requests]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g)
    max_blocks = max(need) + 2
    spare = int(perm[-1])  # never assigned: stays NaN
    tables = torch.full((len(requests), max_blocks), spare, dtype=torch.int32)
    k_cache, v_cache = (cache_like_engine(num_blocks, block_size, num_kv_heads, head_dim, float("nan"), dtype)
                        for _ in range(2))
    used = 0
    for b, (ctx, _) in enumerate(requests):
        tables[b, :need[b]] = perm[used:used + need[b]].to(torch.int32)
        used += need[b]
        slots = (tables[b, torch.arange(ctx) // block_size].long() * block_size
                 + torch.arange(ctx) % block_size)
        k = torch.randn(ctx, num_kv_heads, head_dim, generator=g).to(dtype)
        v = torch.randn(ctx, num_kv_heads, head_dim, generator=g).to(dtype)
        reference.write_kv(k, v, k_cache, v_cache, slots)
    q_lens = [q for _, q in requests]
    total = sum(q_lens)
    q = torch.randn(total, num_heads, head_dim, generator=g).to(dtype)
    starts = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([ctx for ctx, _ in requests], dtype=torch.int32)
    return PagedBatch(q.to(device), k_cache.to(device), v_cache.to(device), tables.to(device),
                      seq_lens.to(device), starts.to(device), head_dim ** -0.5, max(q_lens),
                      max(ctx for ctx, _ in requests))
