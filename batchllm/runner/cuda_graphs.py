"""CUDA graphs for decode steps: one captured forward + logits per padded batch size.

A decode step (every request computes exactly one token and samples it) replays the graph of the
smallest captured size that holds the batch. Inputs are copied into static buffers; padding rows
write nowhere (slot -1) and read one cache slot, so they cost a little work and change nothing.
Mixed and prefill steps run eagerly.
"""
from __future__ import annotations

import numpy as np
import torch

from batchllm.layers.attention import AttentionMetadata


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_batch (inclusive)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch]
    sizes += list(range(16, max_batch + 1, 16))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    """Captured decode forwards (model + logits), replayed with fresh inputs each step."""

    def __init__(self, model: torch.nn.Module, layer_caches, device: torch.device, max_batch: int,
                 max_blocks_per_seq: int, max_model_len: int):
        self.model, self.layer_caches, self.device = model, layer_caches, device
        self.max_batch, self.max_model_len = max_batch, max_model_len
        i32, i64 = torch.int32, torch.int64
        self.input_ids = torch.zeros(max_batch, dtype=i64, device=device)
        self.positions = torch.zeros(max_batch, dtype=i64, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=i64, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=i32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=i32, device=device)
        self.block_tables = torch.zeros((max_batch, max_blocks_per_seq), dtype=i32, device=device)
        # pinned host staging: one copy per buffer per step
        self._host = {name: torch.empty_like(getattr(self, name), device="cpu").pin_memory()
                      for name in ("input_ids", "positions", "slot_mapping", "seq_lens", "block_tables")}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.sizes = capture_sizes(max_batch)

    def _meta(self, n: int) -> AttentionMetadata:
        return AttentionMetadata(self.slot_mapping[:n], self.query_start_loc[:n + 1], self.seq_lens[:n],
                                 self.block_tables[:n], max_query_len=1, max_seq_len=self.max_model_len)

    def _forward(self, n: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:n], self.positions[:n], self.layer_caches, self._meta(n))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for n in reversed(self.sizes):
            self._forward(n)  # warm-up: compiles kernels, settles the allocator
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[n] = self._forward(n)
            pool = graph.pool()
            self.graphs[n] = graph
        torch.cuda.synchronize(self.device)

    def size_for(self, num_reqs: int) -> int | None:
        for s in self.sizes:
            if s >= num_reqs:
                return s
        return None

    def run(self, input_ids: np.ndarray, positions: np.ndarray, slot_mapping: np.ndarray,
            seq_lens: np.ndarray, block_tables: np.ndarray) -> torch.Tensor:
        """Logits [num_reqs, vocab] of one decode step (a view into the graph's output)."""
        b = input_ids.shape[0]
        n = self.size_for(b)
        assert n is not None, (b, self.max_batch)
        h = self._host
        h["input_ids"][:b] = torch.from_numpy(input_ids)
        h["input_ids"][b:n] = 0
        h["positions"][:b] = torch.from_numpy(positions)
        h["positions"][b:n] = 0
        h["slot_mapping"][:b] = torch.from_numpy(slot_mapping)
        h["slot_mapping"][b:n] = -1
        h["seq_lens"][:b] = torch.from_numpy(seq_lens.astype(np.int32))
        h["seq_lens"][b:n] = 1
        width = block_tables.shape[1]
        h["block_tables"][:b, :width] = torch.from_numpy(block_tables.astype(np.int32))
        h["block_tables"][b:n, :1] = 0
        self.input_ids[:n].copy_(h["input_ids"][:n], non_blocking=True)
        self.positions[:n].copy_(h["positions"][:n], non_blocking=True)
        self.slot_mapping[:n].copy_(h["slot_mapping"][:n], non_blocking=True)
        self.seq_lens[:n].copy_(h["seq_lens"][:n], non_blocking=True)
        self.block_tables[:n, :width].copy_(h["block_tables"][:n, :width], non_blocking=True)
        self.graphs[n].replay()
        return self.logits[n][:b]
