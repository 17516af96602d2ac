"""Plan → host arrays: one step's flattened token batch, and the positions of a decode round."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchllm.core.outputs import ScheduledChunk


def longest_first(context_lens: np.ndarray) -> np.ndarray:
    """The decode batch's rows by context length, longest first (int32): the order in which the
    attention kernels start the requests, so the short ones fill in behind the long ones."""
    return np.argsort(-context_lens, kind="stable").astype(np.int32)


@dataclass(slots=True)
class HostBatch:
    """One step's flattened batch as host arrays (built once, vectorized over tokens)."""

    input_ids: np.ndarray  # [T] int64 (-1 where a token comes from the plan before, on the device)
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start: np.ndarray  # [B + 1] int64
    seq_lens: np.ndarray  # [B] int64
    block_tables: np.ndarray  # [B, max_blocks] int64
    logits_indices: np.ndarray  # rows of the sampled tokens
    sample_req_ids: list[str]
    max_query_len: int

    @property
    def is_decode(self) -> bool:
        """Every request computes one token and samples it: the shape CUDA graphs serve."""
        return self.max_query_len == 1 and len(self.sample_req_ids) == len(self.seq_lens)


def build_host_batch(chunks: list[ScheduledChunk], block_size: int) -> HostBatch:
    num_reqs = len(chunks)
    q_lens = np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=num_reqs)
    computed = np.fromiter((c.num_computed_tokens for c in chunks), dtype=np.int64, count=num_reqs)
    query_start = np.zeros(num_reqs + 1, dtype=np.int64)
    np.cumsum(q_lens, out=query_start[1:])
    total = int(query_start[-1])
    input_ids = np.fromiter((t for c in chunks for t in c.token_ids), dtype=np.int64, count=total)
    max_blocks = max(len(c.block_table) for c in chunks)
    block_tables = np.zeros((num_reqs, max_blocks), dtype=np.int64)
    for i, c in enumerate(chunks):
        block_tables[i, :len(c.block_table)] = c.block_table
    req_of_token = np.repeat(np.arange(num_reqs), q_lens)
    positions = computed[req_of_token] + (np.arange(total) - query_start[:-1][req_of_token])
    slot_mapping = block_tables[req_of_token, positions // block_size] * block_size + positions % block_size
    sampled = [i for i, c in enumerate(chunks) if c.sample]
    return HostBatch(input_ids, positions, slot_mapping, query_start, computed + q_lens, block_tables,
                     query_start[1:][sampled] - 1, [chunks[i].req_id for i in sampled],
                     int(q_lens.max()))


@dataclass(slots=True)
class RoundBatch:
    """A multi-step decode round's host arrays, [steps, reqs] where two-dimensional.

        sub-step s of request i:  position p_i + min(s, k_i - 1),  slot -1 once s >= k_i
    (request i runs k_i = chunk.num_steps sub-steps; after that it writes nowhere and its
    samples are ignored)."""

    host: HostBatch  # the round's first step
    active: np.ndarray  # [steps, reqs] bool
    positions: np.ndarray  # [steps, reqs] int64
    slots: np.ndarray  # [steps, reqs] int64
    last_step: np.ndarray  # [reqs] int64: k_i - 1, the sub-step of each request's last token


def build_round_batch(chunks: list[ScheduledChunk], num_steps: int, block_size: int) -> RoundBatch:
    hb = build_host_batch(chunks, block_size)
    num_reqs = len(chunks)
    k = np.fromiter((c.num_steps for c in chunks), dtype=np.int64, count=num_reqs)
    s = np.arange(num_steps)[:, None]
    active = s < k[None, :]
    pos = hb.positions[None, :] + np.minimum(s, k[None, :] - 1)
    rows = np.broadcast_to(np.arange(num_reqs)[None, :], pos.shape)
    slots = np.where(active, hb.block_tables[rows, pos // block_size] * block_size + pos % block_size, -1)
    return RoundBatch(hb, active, np.ascontiguousarray(pos), np.ascontiguousarray(slots), k - 1)
