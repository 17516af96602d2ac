"""CUDA graphs for decode steps: one captured forward + logits per padded batch size.

A decode step (every request computes exactly one token and samples it) replays the graph of the
smallest captured size that holds the batch. Inputs are copied into static buffers; padding rows
write nowhere (slot -1) and read one cache slot, so they cost a little work and change nothing.
Mixed and prefill steps run eagerly. With shared-prefix attention on, each size from
shared_prefix_min_reqs up has a second graph whose attention reads a prefix shared by the whole
batch once (its length sits in a static buffer, so one graph serves every prefix length).
"""
from __future__ import annotations

import torch

from batchllm.layers.attention import AttentionMetadata


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, every 16 up to 256, every 32 up to 512, then every 64, and max_batch itself:
    a batch is padded by at most 16 rows below 256 and at most 1/8 of its size above."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch]
    sizes += list(range(16, min(max_batch, 256) + 1, 16))
    sizes += list(range(288, min(max_batch, 512) + 1, 32))
    sizes += list(range(576, max_batch + 1, 64))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    """Captured decode forwards (model + logits), replayed with fresh inputs each step."""

    def __init__(self, model: torch.nn.Module, layer_caches, device: torch.device, max_batch: int,
                 max_blocks_per_seq: int, max_model_len: int, shared_prefix_min_reqs: int | None = None):
        self.model, self.layer_caches, self.device = model, layer_caches, device
        self.max_batch, self.max_model_len = max_batch, max_model_len
        i32, i64 = torch.int32, torch.int64
        self.input_ids = torch.zeros(max_batch, dtype=i64, device=device)
        self.positions = torch.zeros(max_batch, dtype=i64, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=i64, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=i32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=i32, device=device)
        self.block_tables = torch.zeros((max_batch, max_blocks_per_seq), dtype=i32, device=device)
        self.shared_prefix_len = torch.zeros(1, dtype=i32, device=device)
        self._identity = torch.arange(max_batch, dtype=i32, device=device)
        self.seq_order = self._identity.clone()
        self.shared_prefix_min_reqs = shared_prefix_min_reqs
        vocab = model.config.vocab_size
        dtype = next(model.parameters()).dtype
        self.logits_buffer = torch.empty((max_batch, vocab), dtype=dtype, device=device)
        # (size, reads a shared prefix) -> graph, logits view
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, bool], torch.Tensor] = {}
        self.sizes = capture_sizes(max_batch)

    def _meta(self, n: int, shared: bool) -> AttentionMetadata:
        return AttentionMetadata(self.slot_mapping[:n], self.query_start_loc[:n + 1], self.seq_lens[:n],
                                 self.block_tables[:n], max_query_len=1, max_seq_len=self.max_model_len,
                                 shared_prefix_len=self.shared_prefix_len if shared else None,
                                 seq_order=self.seq_order[:n])

    def _forward(self, n: int, shared: bool) -> torch.Tensor:
        """Logits of the first n rows, written into the one static buffer all sizes share (a
        graph's temporaries are freed into the shared pool; only this buffer outlives them)."""
        hidden = self.model(self.input_ids[:n], self.positions[:n], self.layer_caches, self._meta(n, shared))
        return self.model.compute_logits(hidden, out=self.logits_buffer[:n])

    def _variants(self, n: int) -> list[bool]:
        m = self.shared_prefix_min_reqs
        return [False, True] if m is not None and n >= m else [False]

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for n in reversed(self.sizes):
            for shared in self._variants(n):
                self._forward(n, shared)  # warm-up: compiles kernels, settles the allocator
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[n, shared] = self._forward(n, shared)
                pool = graph.pool()
                self.graphs[n, shared] = graph
        torch.cuda.synchronize(self.device)

    def size_for(self, num_reqs: int) -> int | None:
        for s in self.sizes:
            if s >= num_reqs:
                return s
        return None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            seq_lens: torch.Tensor, block_tables: torch.Tensor, shared_prefix_len: int = 0,
            seq_order: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [b, vocab] of one decode step of b requests (a view into the graph's output).

        Inputs are device tensors of b rows; they are copied into the static buffers on the
        device (no host sync), and rows b..n-1 of the padded size are neutralized.
        shared_prefix_len > 0: every request reads its first shared_prefix_len keys from the same
        blocks (see kernels.triton_attention.shared_prefix_attention); b must be at least
        shared_prefix_min_reqs. seq_order: [b] int32, the order the attention kernels start the
        requests in (see AttentionMetadata); None = as given."""
        b = input_ids.shape[0]
        n = self.size_for(b)
        assert n is not None, (b, self.max_batch)
        width = block_tables.shape[1]
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.slot_mapping[:b].copy_(slot_mapping)
        self.seq_lens[:b].copy_(seq_lens)
        self.block_tables[:b, :width].copy_(block_tables)
        self.seq_order[:b].copy_(self._identity[:b] if seq_order is None else seq_order)
        if n > b:
            self.seq_order[b:n].copy_(self._identity[b:n])
            self.input_ids[b:n].zero_()
            self.positions[b:n].zero_()
            self.slot_mapping[b:n].fill_(-1)
            self.seq_lens[b:n].fill_(1)
            self.block_tables[b:n, 0].zero_()
        shared = shared_prefix_len > 0
        if shared:
            self.shared_prefix_len.fill_(shared_prefix_len)
        self.graphs[n, shared].replay()
        return self.logits[n, shared][:b]
