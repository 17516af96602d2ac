"""Whole-state consistency checks for the scheduler, run after every step in tests."""
from __future__ import annotations

from collections import Counter

from batchllm.core.request import RequestStatus
from batchllm.core.scheduler import Scheduler


def check_invariants(s: Scheduler) -> None:
    pool = s.kv.pool
    holders = Counter(b.block_id for table in s.kv.tables.values() for b in table)
    for b in pool.blocks:
        assert b.ref_cnt == holders[b.block_id], f"{b}: held by {holders[b.block_id]} tables"
    free_ids = pool.free_queue.block_ids()
    assert len(free_ids) == len(set(free_ids)) == pool.num_free_blocks, "free queue corrupt"
    assert set(free_ids) == {b.block_id for b in pool.blocks if b.ref_cnt == 0}, "leaked block"
    for h, b in pool.cached.items():
        assert b.block_hash == h
    for rid, table in s.kv.tables.items():
        assert s.kv.ids[rid] == [b.block_id for b in table]
    cpu_held = [c for t in s.cpu.tables.values() for c in t]
    assert len(cpu_held) == len(set(cpu_held)), "CPU block held twice"
    assert sorted(cpu_held + list(s.cpu._free)) == list(range(s.cpu.num_blocks)), "CPU block leak"
    running = [r for r in s.running if not r.is_finished]
    assert running == sorted(running, key=lambda r: r.priority)
    assert len(running) <= s.config.max_num_seqs
    queued = [r.request_id for r in running] + list(s.waiting) + list(s.swapped)
    assert sorted(queued) == sorted(s.requests), "a request is lost or in two queues"
    for r in s.requests.values():
        assert r.num_output_placeholders >= 0, r
        assert r.num_computed_tokens < r.num_planned_tokens, f"{r}: computed past its last token"
    for r in running:
        assert r.status == RequestStatus.RUNNING and r.request_id not in s.cpu.tables
        assert s.kv.num_blocks_of(r.request_id) * s.block_size >= r.num_computed_tokens
    for r in s.waiting.values():
        assert r.status == RequestStatus.WAITING and r.num_computed_tokens == 0
        assert r.request_id not in s.kv.tables and r.request_id not in s.cpu.tables
    for r in s.swapped.values():
        assert r.status == RequestStatus.SWAPPED and r.request_id in s.cpu.tables
        assert r.request_id not in s.kv.tables
    assert set(s.kv.tables) <= {r.request_id for r in running}
