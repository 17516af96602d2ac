"""CPU block pool for preemption by swap: which CPU blocks hold which swapped request's K/V.

Each swapped request owns its CPU blocks outright (ref count 1); a GPU block shared by several
requests is copied once per request that swaps out, which keeps the bookkeeping trivial.
"""
from __future__ import annotations

from collections import deque


class CpuBlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = max(0, num_blocks)
        self._free: deque[int] = deque(range(self.num_blocks))
        self.tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def swap_out(self, request_id: str, gpu_block_ids: list[int]) -> list[tuple[int, int]] | None:
        """(gpu, cpu) copies that move a request's blocks to CPU, or None if the pool is full."""
        assert request_id not in self.tables, f"{request_id} is already swapped out"
        if len(gpu_block_ids) > len(self._free):
            return None
        cpu = [self._free.popleft() for _ in gpu_block_ids]
        self.tables[request_id] = cpu
        return list(zip(gpu_block_ids, cpu))

    def num_blocks_of(self, request_id: str) -> int:
        return len(self.tables[request_id])

    def swap_in(self, request_id: str, gpu_block_ids: list[int]) -> list[tuple[int, int]]:
        """(cpu, gpu) copies that bring a request back; its CPU blocks are free afterwards."""
        cpu = self.tables.pop(request_id)
        assert len(cpu) == len(gpu_block_ids), "swap-in needs one GPU block per CPU block"
        self._free.extend(cpu)
        return list(zip(cpu, gpu_block_ids))

    def free(self, request_id: str) -> None:
        """Drop a swapped request's CPU blocks (it finished or was aborted while swapped)."""
        self._free.extend(self.tables.pop(request_id, ()))
