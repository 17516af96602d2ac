"""Admission and preemption: the part of the Scheduler that moves requests between its queues.

Swapped requests come back first (their blocks are copied in from the CPU pool), then waiting
ones in FIFO order: a prefix-cache hit skips the cached blocks; a fresh sample of an `n > 1`
prompt forks its group leader's blocks (`groups.py`); a request whose next uncached prefix block
is being computed by a plan in flight waits a step and then finds it cached; a sample forks
only from a leader whose prompt a plan before this one computes (a plan copies blocks before it
runs, so copy-on-write must not read blocks the same plan writes). A preempted request
whose last sampled tokens are still placeholders waits until `update` has filled them in.
"""
from __future__ import annotations

import bisect
from collections import OrderedDict

from batchllm.core.kv_cache_manager import cdiv
from batchllm.core.outputs import SchedulerOutput
from batchllm.core.request import Request, RequestStatus


def _priority(r: Request) -> tuple[float, int]:
    return r.priority


class Admission:
    """Mixed into Scheduler; uses its queues, block managers and `_add_chunk`."""

    def _schedule_swapped(self, plan: SchedulerOutput, budget: int) -> int:
        while self.swapped and budget > 0 and len(self.running) < self.config.max_num_seqs:
            rid, req = next(iter(self.swapped.items()))
            if req.num_output_placeholders:
                break  # its last tokens are not back yet
            n = self._num_new_tokens(req, budget)
            num_swapped = self.cpu.num_blocks_of(rid)
            need = max(num_swapped, cdiv(req.num_computed_tokens + n, self.block_size))
            if need > self.kv.num_free_blocks:
                break
            del self.swapped[rid]
            gpu_ids = self.kv.adopt_blocks(req, num_swapped)
            assert gpu_ids is not None
            plan.swap_in.extend(self.cpu.swap_in(rid, list(gpu_ids)))
            copies = self.kv.allocate_slots(req, n)
            assert copies == [], "a swapped-in request shares no blocks"
            self._start_running(req)
            self._add_chunk(plan, req, n)
            budget -= n
        return budget

    def _schedule_waiting(self, plan: SchedulerOutput, budget: int) -> None:
        deferred: list[Request] = []
        while (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
               and len(deferred) < self.config.max_num_seqs):  # bounded scan per step
            rid, req = self.waiting.popitem(last=False)
            action = self.groups.admission(req)
            if action == "fork" and self._writes_prompt(plan, self.groups.leader_of(req)):
                action = "defer"  # the leader's shared prompt is computed in this very plan
            if action == "defer" or req.num_output_placeholders:
                deferred.append(req)
                continue
            if action == "fork":
                ok = self._fork(plan, req)
            else:
                ok = self._admit(plan, req, budget)
                if ok is None:  # its prefix is being computed right now
                    deferred.append(req)
                    continue
            if not ok:
                self._push_front(self.waiting, req)
                break
            budget -= len(plan.chunks[-1].token_ids)
        for req in reversed(deferred):
            self._push_front(self.waiting, req)

    @staticmethod
    def _writes_prompt(plan: SchedulerOutput, leader: Request) -> bool:
        """Whether the plan computes some of the leader's prompt[:-1] (what samples share)."""
        shared = leader.num_prompt_tokens - 1
        return any(c.req_id == leader.request_id and c.num_computed_tokens < shared
                   for c in plan.chunks)

    def _admit(self, plan: SchedulerOutput, req: Request, budget: int) -> bool | None:
        """Admit a waiting request (True), or say there is no room (False), or that its next
        uncached prefix block is being computed in a plan not yet applied (None: try later)."""
        hits, num_hit = self.kv.get_computed_blocks(req)
        hashes = req.full_block_hashes(self.block_size, req.num_tokens) if self.kv.enable_caching else []
        first_new = num_hit // self.block_size
        if hashes and first_new < (req.num_tokens - 1) // self.block_size and (
                hashes[first_new] in plan.computing_hashes or hashes[first_new] in self._computing):
            return None
        n = min(req.num_tokens - num_hit, self._chunk_cap(budget))
        n = self.groups.cap_leader_tokens(req, num_hit, n, becoming_leader=True)
        copies = self.kv.allocate_slots(req, n, hits)
        if copies is None:
            return False
        assert copies == []
        self.prefix_cache_queries += req.num_tokens
        self.prefix_cache_hits += num_hit
        req.num_computed_tokens = num_hit
        if not req.was_scheduled:
            req.num_cached_tokens = num_hit
        self.groups.on_admit(req)
        self._start_running(req)
        self._add_chunk(plan, req, n)
        plan.computing_hashes.update(hashes[first_new:(num_hit + n) // self.block_size])
        return True

    def _fork(self, plan: SchedulerOutput, req: Request) -> bool:
        """Admit a fresh sample by sharing its group leader's blocks for prompt[:-1]."""
        leader = self.groups.leader_of(req)
        shared = req.num_prompt_tokens - 1
        self.kv.fork(leader, req, shared)
        req.num_computed_tokens = shared
        copies = self.kv.allocate_slots(req, req.num_tokens - shared)
        if copies is None:
            self.kv.free(req)
            req.num_computed_tokens = 0
            return False
        plan.copy_blocks.extend(copies)
        req.num_cached_tokens = shared
        self.groups.on_admit(req)
        self._start_running(req)
        self._add_chunk(plan, req, req.num_tokens - shared)
        return True

    def _start_running(self, req: Request) -> None:
        req.status = RequestStatus.RUNNING
        bisect.insort(self.running, req, key=_priority)

    def _preempt(self, victim: Request, plan: SchedulerOutput) -> None:
        """Swap the victim out (swap / long requests in auto) or free it to recompute later."""
        rid = victim.request_id
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.groups.on_preempt(victim)
        plan.preempted_req_ids.append(rid)
        mode = self.config.preemption_mode
        if mode == "swap" or (mode == "auto" and
                              victim.num_computed_tokens >= self.config.swap_threshold_tokens):
            copies = self.cpu.swap_out(rid, self.kv.block_ids(rid))
            if copies is not None:
                plan.swap_out.extend(copies)
                self.kv.free(victim)
                victim.status = RequestStatus.SWAPPED
                self._push_front(self.swapped, victim)
                self.num_swapped_out += 1
                return
        self.kv.free(victim)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.WAITING
        self._push_front(self.waiting, victim)

    @staticmethod
    def _push_front(queue: OrderedDict[str, Request], req: Request) -> None:
        queue[req.request_id] = req
        queue.move_to_end(req.request_id, last=False)
