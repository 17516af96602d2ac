"""Per-request block tables on the GPU pool: prefix hits, slot allocation, forks, copy-on-write.

A request's table covers its computed tokens plus the tokens scheduled this step:

    blocks: | full | full | full | part |          (block_size tokens each)
    tokens: |<---- num_computed ---->|<- new ->|

`allocate_slots` returns None when the pool has no room (the scheduler's cue to preempt) and
otherwise the copy-on-write copies the step needs. Blocks are hashed and entered in the prefix
cache only once their K/V is computed (`cache_computed_blocks`, when the step's results are
back).
"""
from __future__ import annotations

from batchllm.core.block_pool import BlockPool, KVBlock
from batchllm.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.tables: dict[str, list[KVBlock]] = {}
        self.ids: dict[str, list[int]] = {}  # block ids, kept beside `tables` (no per-step rebuild)
        self.num_hashed: dict[str, int] = {}  # leading blocks already offered to the prefix cache

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return self.ids.get(request_id, [])

    def num_blocks_of(self, request_id: str) -> int:
        return len(self.tables.get(request_id, ()))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Cached blocks of the longest known prefix (never the last token) and their token count."""
        if not self.enable_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        hashes = request.full_block_hashes(self.block_size)
        for i in range(min(max_blocks, len(hashes))):
            block = self.pool.get_cached_block(hashes[i])
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed: list[KVBlock] | None = None) -> list[tuple[int, int]] | None:
        """Room for `num_new_tokens` more tokens after the computed ones (plus `computed` hits).

        Returns the (src, dst) copy-on-write copies to apply first, or None if blocks ran out
        (nothing is changed then).
        """
        computed = computed or []
        rid = request.request_id
        table = self.tables.setdefault(rid, [])
        ids = self.ids.setdefault(rid, [])
        num_done = request.num_computed_tokens + len(computed) * self.block_size
        cow = (num_new_tokens > 0 and num_done % self.block_size != 0 and bool(table)
               and table[-1].ref_cnt > 1)
        num_new_blocks = max(0, cdiv(num_done + num_new_tokens, self.block_size)
                             - len(table) - len(computed))
        num_reclaimed = sum(1 for b in computed if b.ref_cnt == 0)
        if num_new_blocks + int(cow) > self.pool.num_free_blocks - num_reclaimed:
            if not table:
                self._drop(rid)
            return None
        copies: list[tuple[int, int]] = []
        if cow:
            shared = table[-1]
            (fresh,) = self.pool.get_new_blocks(1)
            self.pool.free_blocks([shared])
            table[-1] = fresh
            ids[-1] = fresh.block_id
            copies.append((shared.block_id, fresh.block_id))
        if computed:
            self.pool.touch(computed)
            table.extend(computed)
            ids.extend(b.block_id for b in computed)
        if num_new_blocks:
            new = self.pool.get_new_blocks(num_new_blocks)
            table.extend(new)
            ids.extend(b.block_id for b in new)
        return copies

    def fork(self, source: Request, child: Request, num_tokens: int) -> None:
        """Share the source's blocks covering its first `num_tokens` tokens with `child`."""
        shared = self.tables[source.request_id][:cdiv(num_tokens, self.block_size)]
        assert child.request_id not in self.tables, f"{child} already holds blocks"
        self.pool.touch(shared)
        self.tables[child.request_id] = list(shared)
        self.ids[child.request_id] = [b.block_id for b in shared]
        self.num_hashed[child.request_id] = min(self.num_hashed.get(source.request_id, 0),
                                                num_tokens // self.block_size)

    def adopt_blocks(self, request: Request, num_blocks: int) -> list[int] | None:
        """Fresh blocks for a request coming back from swap (its table must be empty)."""
        assert request.request_id not in self.tables, f"{request} already holds blocks"
        if num_blocks > self.pool.num_free_blocks:
            return None
        new = self.pool.get_new_blocks(num_blocks)
        self.tables[request.request_id] = new
        self.ids[request.request_id] = [b.block_id for b in new]
        return self.ids[request.request_id]

    def cache_computed_blocks(self, request: Request, num_tokens: int) -> None:
        """Enter the request's full blocks among its first `num_tokens` tokens (computed, and
        known: not placeholders) in the prefix cache."""
        if not self.enable_caching:
            return
        rid = request.request_id
        table = self.tables.get(rid)
        if not table:
            return
        n_full = min(num_tokens // self.block_size, len(table))
        start = self.num_hashed.get(rid, 0)
        if n_full <= start:
            return
        hashes = request.full_block_hashes(self.block_size, n_full * self.block_size)
        for i in range(start, n_full):
            self.pool.cache_full_block(table[i], hashes[i])
        self.num_hashed[rid] = n_full

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so its tail is evicted before its prefix."""
        table = self.tables.get(request.request_id)
        if table:
            self.pool.free_blocks(list(reversed(table)))
        self._drop(request.request_id)

    def _drop(self, rid: str) -> None:
        self.tables.pop(rid, None)
        self.ids.pop(rid, None)
        self.num_hashed.pop(rid, None)
