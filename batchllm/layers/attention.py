"""Paged attention layer: writes the step's K/V into the cache, then attends over each request's blocks (or the last W keys: a sliding window)."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn


@dataclass(slots=True)
class AttentionMetadata:
    """Where the step's flattened tokens live in the paged cache (see kernels/reference.py for layouts)."""

    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32, context length including this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    # decode-only batches: [1] int32, how many leading keys every request reads from the same
    # blocks (block_tables[:, :P] all equal row 0); None = no shared prefix to exploit
    shared_prefix_len: torch.Tensor | None = None
    # decode-only batches: [B] int32, the requests longest context first (the kernels' launch order)
    seq_order: torch.Tensor | None = None


class PagedAttention(nn.Module):
    """Attention over the paged KV cache with a pluggable kernel set (torch reference or Triton).

    scale: the softmax scale (default head_dim ** -0.5). sliding_window: this layer attends each
    query to its last W keys only (a constant of the layer, so a captured CUDA graph holds it); such
    a layer reads every key of its window per request, never a batch's shared prefix once."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, kernels: SimpleNamespace,
                 scale: float | None = None, sliding_window: int | None = None):
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1 (or None), got {sliding_window}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.sliding_window = sliding_window
        self.kernels = kernels

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        self.kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if self.sliding_window is None:
            return self.kernels.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                                meta.query_start_loc, self.scale, meta.max_query_len,
                                                meta.max_seq_len, shared_prefix_len=meta.shared_prefix_len,
                                                seq_order=meta.seq_order)
        return self.kernels.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                            meta.query_start_loc, self.scale, meta.max_query_len,
                                            meta.max_seq_len, seq_order=meta.seq_order,
                                            sliding_window=self.sliding_window)
