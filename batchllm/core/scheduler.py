"""Scheduler: each step fills a token budget with decodes first, then prefill chunks; preempts.

One code path: a scheduled request gets `num_tokens - num_computed_tokens` tokens (capped by
the budget), whether that is a whole prompt, a chunk of one, the rest after a prefix-cache hit,
a re-prefill after preemption, or a single decode token. Queues, in the order they are served:

    running (by priority) -> swapped (front first) -> waiting (front first, FIFO)

Swapped and waiting requests are only admitted in a step that preempted nobody. The samples of
an `n > 1` prompt share its K/V: see `groups.py`.
"""
from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from typing import Iterable, NamedTuple

from batchllm.config import CacheConfig, SchedulerConfig
from batchllm.core.groups import SampleGroups
from batchllm.core.kv_cache_manager import KVCacheManager, cdiv
from batchllm.core.outputs import NewRequestData, RunnerOutput, ScheduledChunk, SchedulerOutput
from batchllm.core.request import Request, RequestStatus, admission_error
from batchllm.core.swap import CpuBlockPool


def _priority(r: Request) -> tuple[float, int]:
    return r.priority


class _After(NamedTuple):
    """A request as the plan still running leaves it (Scheduler.schedule_after)."""

    computed: int  # tokens whose K/V is in the cache
    num_tokens: int  # prompt + outputs, the last sampled one included
    num_outputs: int
    row: int | None  # its last sampled token's row in that plan; None: it samples none there


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 num_gpu_blocks: int, num_cpu_blocks: int, max_model_len: int) -> None:
        self.config = scheduler_config
        self.block_size = cache_config.block_size
        self.kv = KVCacheManager(num_gpu_blocks, self.block_size, cache_config.enable_prefix_caching)
        self.cpu = CpuBlockPool(num_cpu_blocks)
        # A request can always run alone: no request may outgrow the whole cache.
        self.max_model_len = min(max_model_len, num_gpu_blocks * self.block_size)
        self._model_max_len = max_model_len
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.running: list[Request] = []  # sorted by priority; the last is preempted first
        self.waiting: OrderedDict[str, Request] = OrderedDict()
        self.swapped: OrderedDict[str, Request] = OrderedDict()
        self.groups = SampleGroups()
        self._running_dirty = False
        self._finished: list[Request] = []  # returned by the next update()
        self._finished_ids: list[str] = []  # told to the runner by the next plan
        self._seq = 0
        self.num_preemptions = self.num_swapped_out = 0
        self.num_multi_step_rounds = 0
        self.num_chained_rounds = 0  # multi-step rounds planned by schedule_after
        self.num_chained_steps = 0  # ordinary steps planned by schedule_after
        self._pending_copies: list[tuple[int, int]] = []  # copy-on-write of a plan not made
        self.prefix_cache_queries = self.prefix_cache_hits = 0

    # ------------------------------------------------------------------ requests in / out
    def add_request(self, request: Request) -> None:
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in the scheduler; ids must be unique")
        self._seq += 1
        request.priority = (request.metrics.arrival_time, self._seq)
        self.requests[rid] = request
        problem = admission_error(request, self._model_max_len, self.max_model_len)
        if problem is not None:
            request.error = problem
            self._finish(request, RequestStatus.FINISHED_ERROR)
            return
        request.status = RequestStatus.WAITING
        self.waiting[rid] = request
        self.groups.on_add(request)

    def finish_requests(self, request_ids: Iterable[str] | str, status: RequestStatus,
                        stop_reason: int | str | None = None) -> None:
        """Finish requests now (stop strings, aborts) and free their blocks; unknown ids are ignored."""
        assert status.is_finished, f"{status} is not a finished status"
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            req = self.requests.get(rid)
            if req is not None:
                req.stop_reason = stop_reason
                self._finish(req, status)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        rid = req.request_id
        if req.status == RequestStatus.RUNNING:
            self._running_dirty = True
        self.waiting.pop(rid, None)
        self.swapped.pop(rid, None)
        self.kv.free(req)
        self.cpu.free(rid)
        self.groups.on_finish(req)
        req.status = status
        req.metrics.finished_time = time.time()
        if req.was_scheduled:
            self._finished_ids.append(rid)
        self._finished.append(req)
        del self.requests[rid]

    def has_unfinished_requests(self) -> bool:
        """True while requests remain, or finished ones still wait to be returned by update()."""
        return bool(self.requests) or bool(self._finished)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    @property
    def stats(self) -> dict:
        return {"num_preemptions": self.num_preemptions, "num_swapped_out": self.num_swapped_out,
                "num_multi_step_rounds": self.num_multi_step_rounds,
                "num_chained_rounds": self.num_chained_rounds,
                "num_chained_steps": self.num_chained_steps,
                "prefix_cache_queries": self.prefix_cache_queries,
                "prefix_cache_hits": self.prefix_cache_hits, "kv_cache_usage": self.kv.pool.usage,
                "num_running": len(self.running) - sum(r.is_finished for r in self.running),
                "num_waiting": len(self.waiting), "num_swapped": len(self.swapped)}

    # ------------------------------------------------------------------ planning
    def schedule(self) -> SchedulerOutput:
        self._drop_finished_running()
        plan = SchedulerOutput(finished_req_ids=self._finished_ids, copy_blocks=self._pending_copies)
        self._finished_ids, self._pending_copies = [], []
        if self._schedule_multi_step(plan):
            return plan
        budget = self.config.max_num_batched_tokens
        budget, preempted = self._schedule_running(plan, budget)
        if not preempted:
            budget = self._schedule_swapped(plan, budget)
            if not self.swapped:
                self._schedule_waiting(plan, budget)
        return plan

    def _drop_finished_running(self) -> None:
        if self._running_dirty:
            self.running = [r for r in self.running if not r.is_finished]
            self._running_dirty = False

    def _schedule_running(self, plan: SchedulerOutput, budget: int) -> tuple[int, bool]:
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._num_new_tokens(req, budget)
            if n == 0:
                i += 1
                continue
            copies = self.kv.allocate_slots(req, n)
            while copies is None:
                victim = self.running.pop()
                self._preempt(victim, plan)
                preempted = True
                if victim is req:
                    return budget, preempted
                copies = self.kv.allocate_slots(req, n)
            plan.copy_blocks.extend(copies)
            self._add_chunk(plan, req, n)
            budget -= n
            i += 1
        return budget, preempted

    def _schedule_multi_step(self, plan: SchedulerOutput) -> bool:
        """Plan several decode steps at once when nothing else could run: every running request
        is decoding, nothing is swapped out, and the first waiting request would not fit now.
        Each request gets up to `num_decode_steps` tokens, fewer where max_tokens or the model
        length ends it sooner. Returns False (plan untouched but for copy-on-write copies already
        made) when it does not apply or blocks run short; the ordinary path then takes over."""
        steps = self.config.num_decode_steps or 1
        running = self.running
        if (steps <= 1 or not running or self.swapped
                or len(running) > self.config.max_num_batched_tokens):
            return False
        for req in running:
            if self._num_new_tokens(req, 2) != 1 or req.num_tokens - req.num_computed_tokens != 1:
                return False
        if self._could_admit(len(running)):
            return False  # take an ordinary step
        return self._add_round(plan, [(req, _After(req.num_computed_tokens, req.num_tokens,
                                                   req.num_output_tokens, None)) for req in running])

    def _add_round(self, plan: SchedulerOutput, rows: list[tuple[Request, "_After"]]) -> bool:
        """A multi-step decode round of rows, each request at its state `_After` with one token
        left to compute (fed by the plan before where `row` is set): up to num_decode_steps
        tokens each, fewer where max_tokens or the model length ends it sooner. Returns False
        when blocks run short (copy-on-write copies already made stay in plan.copy_blocks)."""
        counts = []
        for req, a in rows:
            k = max(self._round_steps(req, a.num_tokens, a.num_outputs), 1)
            copies = self.kv.allocate_slots(req, a.computed - req.num_computed_tokens + k)
            if copies is None:
                return False  # blocks already added are used by the request's next steps
            plan.copy_blocks.extend(copies)
            counts.append(k)
        for (req, a), k in zip(rows, counts):
            rid = req.request_id
            tokens = [-1] if a.row is not None else req.all_token_ids[a.computed:a.computed + 1]
            plan.chunks.append(ScheduledChunk(rid, tokens, a.computed, list(self.kv.block_ids(rid)), True, k))
            if plan.prev_rows is not None:
                plan.prev_rows.append(a.row)
        plan.num_steps = max(counts)
        self.num_multi_step_rounds += 1
        return True

    def _round_steps(self, req: Request, num_tokens: int, num_outputs: int) -> int:
        """Decode steps for a request of num_tokens tokens and num_outputs outputs in one round:
        num_decode_steps, fewer where max_tokens or the model length ends it sooner (< 1: done)."""
        k = min(self.config.num_decode_steps or 1, self.max_model_len - num_tokens + 1)
        if req.sampling_params.max_tokens is not None:
            k = min(k, req.sampling_params.max_tokens - num_outputs)
        return k

    def _could_admit(self, num_running: int) -> bool:
        """Whether the first waiting request would fit beside num_running decoding requests (each
        needing a block more): then a multi-step round would keep it waiting for nothing."""
        if not self.waiting or num_running >= self.config.max_num_seqs:
            return False
        first = next(iter(self.waiting.values()))
        return self.kv.num_free_blocks >= cdiv(first.num_tokens, self.block_size) + num_running

    def schedule_after(self, prev: SchedulerOutput) -> SchedulerOutput | None:
        """Plan the next step while `prev` (launched, not yet given to `update`) still runs on the
        device, before its sampled tokens are known: a multi-step decode round when every running
        request decodes and no waiting request could start, else an ordinary step.

        A request's state is taken as `prev` leaves it; the one token `prev` samples last for it
        is its input here, fed on the device (`plan.prev_rows`: its row among prev's sampled
        rows; -1 for chunks whose tokens are known). A request that `prev` ends by length is left
        out; one that stops in `prev` for another reason (EOS, stop token, stop string, abort) is
        finished by `update(prev)`, and its row here is computed and ignored. Returns None when
        something else must come first (a swapped request, a preemption for room, nothing to
        do): the caller then waits for `prev`, applies it and calls `schedule()`.

            request state now (prev not applied):  computed c, tokens t, outputs o
            prev computes q tokens of it, samples s:  computed c + q + s - 1 (s > 0) or c + q,
                                                      tokens t + s, outputs o + s
        """
        if self.swapped or not prev.chunks:
            return None
        self._drop_finished_running()
        ahead, ended = self._state_after(prev)
        plan = SchedulerOutput(copy_blocks=self._pending_copies, prev_rows=[])
        self._pending_copies = []
        ok = self._chain_round(plan, ahead, ended) or self._chain_step(plan, ahead, ended, prev)
        if not ok:  # copy-on-write copies already made go with the next plan
            self._pending_copies = plan.copy_blocks
            return None
        plan.finished_req_ids, self._finished_ids = self._finished_ids, []
        if plan.num_steps > 1:
            self.num_chained_rounds += 1
        else:
            self.num_chained_steps += 1
        return plan

    def _state_after(self, prev: SchedulerOutput) -> tuple[dict[str, "_After"], set[str]]:
        """The running requests of `prev` as it leaves them, and the ids of those it ends by length."""
        out: dict[str, _After] = {}
        ended: set[str] = set()
        row = -1
        for c in prev.chunks:
            row += c.sample
            req = self.requests.get(c.req_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue
            assert req.num_computed_tokens == c.num_computed_tokens, (req, c.num_computed_tokens)
            added = c.num_steps if c.sample else 0
            num_tokens, num_outputs = req.num_tokens + added, req.num_output_tokens + added
            if added and (self._round_steps(req, num_tokens, num_outputs) < 1
                          or num_tokens >= self.max_model_len):
                ended.add(c.req_id)
                continue
            computed = c.num_computed_tokens + len(c.token_ids) + c.num_steps - 1
            out[c.req_id] = _After(computed, num_tokens, num_outputs, row if c.sample else None)
        return out, ended

    def _chain_round(self, plan: SchedulerOutput, ahead: dict[str, "_After"], ended: set[str]) -> bool:
        """A multi-step decode round after prev, if every running request decodes, fed by prev."""
        steps = self.config.num_decode_steps or 1
        if steps <= 1:
            return False
        rows = []
        for req in self.running:
            if req.is_finished or req.request_id in ended:
                continue
            state = ahead.get(req.request_id)
            if state is None or state.row is None:
                return False  # a request not in prev, or one still prefilling
            rows.append((req, state))
        if not rows or len(rows) > self.config.max_num_batched_tokens or self._could_admit(len(rows)):
            return False
        return self._add_round(plan, rows)

    def _chain_step(self, plan: SchedulerOutput, ahead: dict[str, "_After"], ended: set[str],
                    prev: SchedulerOutput) -> bool:
        """An ordinary step after prev: running requests in priority order (decodes fed by prev,
        prefill chunks), then waiting ones, within the token budget; no preemption."""
        budget = self.config.max_num_batched_tokens
        for req in self.running:
            if budget <= 0:
                break
            if req.is_finished or req.request_id in ended:
                continue
            state = ahead.get(req.request_id) or _After(req.num_computed_tokens, req.num_tokens,
                                                        req.num_output_tokens, None)
            computed, num_tokens, _, row = state
            n = min(num_tokens - computed, budget)
            n = self.groups.cap_leader_tokens(req, computed, n)
            if n <= 0:
                continue
            copies = self.kv.allocate_slots(req, computed - req.num_computed_tokens + n)
            if copies is None:
                return False  # room needs a preemption: leave that to schedule()
            plan.copy_blocks.extend(copies)
            rid = req.request_id
            if row is not None:  # its one new token is the one prev samples last
                assert n == 1 and computed + 1 == num_tokens
                tokens = [-1]
            else:
                tokens = req.all_token_ids[computed:computed + n]
            plan.chunks.append(ScheduledChunk(rid, tokens, computed, list(self.kv.block_ids(rid)),
                                              computed + n == num_tokens))
            plan.prev_rows.append(-1 if row is None else row)
            budget -= n
        if not self.swapped:
            plan.computing_hashes = set(prev.computing_hashes)
            self._schedule_waiting(plan, budget)
            plan.prev_rows += [-1] * (len(plan.chunks) - len(plan.prev_rows))
        return bool(plan.chunks)

    def _schedule_swapped(self, plan: SchedulerOutput, budget: int) -> int:
        while self.swapped and budget > 0 and len(self.running) < self.config.max_num_seqs:
            rid, req = next(iter(self.swapped.items()))
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
        # hashes of the full blocks that requests admitted in this step compute now: a request
        # whose next uncached block is among them waits one step and then finds it in the cache
        computing = plan.computing_hashes
        while (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
               and len(deferred) < self.config.max_num_seqs):  # bounded scan per step
            rid, req = self.waiting.popitem(last=False)
            action = self.groups.admission(req)
            if action == "defer":
                deferred.append(req)
                continue
            if action == "fork":
                ok = self._fork(plan, req)
            else:
                ok = self._admit(plan, req, budget, computing)
                if ok is None:  # its prefix is being computed right now
                    deferred.append(req)
                    continue
            if not ok:
                self._push_front(self.waiting, req)
                break
            budget -= len(plan.chunks[-1].token_ids)
        for req in reversed(deferred):
            self._push_front(self.waiting, req)

    def _admit(self, plan: SchedulerOutput, req: Request, budget: int,
               computing: set[int]) -> bool | None:
        """Admit a waiting request (True), or say there is no room (False), or that its next
        uncached prefix block is being computed in this very step (None: try next step)."""
        hits, num_hit = self.kv.get_computed_blocks(req)
        hashes = req.full_block_hashes(self.block_size, req.num_tokens) if self.kv.enable_caching else []
        first_new = num_hit // self.block_size
        if computing and first_new < (req.num_tokens - 1) // self.block_size \
                and hashes[first_new] in computing:
            return None
        n = min(req.num_tokens - num_hit, budget)
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
        computing.update(hashes[first_new:(num_hit + n) // self.block_size])
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

    def _num_new_tokens(self, req: Request, budget: int) -> int:
        n = min(req.num_tokens - req.num_computed_tokens, budget)
        return self.groups.cap_leader_tokens(req, req.num_computed_tokens, n)

    def _start_running(self, req: Request) -> None:
        req.status = RequestStatus.RUNNING
        bisect.insort(self.running, req, key=_priority)

    def _add_chunk(self, plan: SchedulerOutput, req: Request, n: int) -> None:
        start = req.num_computed_tokens
        rid = req.request_id
        plan.chunks.append(ScheduledChunk(rid, req.all_token_ids[start:start + n], start,
                                          list(self.kv.block_ids(rid)), start + n == req.num_tokens))
        if not req.was_scheduled:
            req.was_scheduled = True
            req.metrics.first_scheduled_time = time.time()
            plan.new_requests.append(NewRequestData(rid, req.prompt_token_ids, req.sampling_params,
                                                    req.seed))

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

    # ------------------------------------------------------------------ results
    def update(self, plan: SchedulerOutput, output: RunnerOutput) -> list[Request]:
        """Apply a step's results: advance progress, append tokens, finish what stopped."""
        sampled = dict(zip(output.req_ids, output.sampled_token_ids))
        steps = dict(zip(output.req_ids, output.step_token_ids or []))
        now = time.time()
        for chunk in plan.chunks:
            req = self.requests.get(chunk.req_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue  # finished or aborted since the plan was made
            req.num_computed_tokens = chunk.num_computed_tokens + len(chunk.token_ids)
            self.kv.cache_computed_blocks(req)
            if chunk.req_id in output.errors:
                req.error = output.errors[chunk.req_id]
                self._finish(req, RequestStatus.FINISHED_ERROR)
                continue
            if not chunk.sample:
                continue
            if chunk.num_steps > 1 or plan.num_steps > 1:
                self._update_multi_step(req, chunk, steps.get(chunk.req_id), now)
                continue
            if chunk.req_id not in sampled:
                req.error = f"request {chunk.req_id!r}: the runner returned no sampled token"
                self._finish(req, RequestStatus.FINISHED_ERROR)
                continue
            req.append_output_token(int(sampled[chunk.req_id]))
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            status = req.check_stop(self.max_model_len)
            if status is not None:
                self._finish(req, status)
        for rid, message in output.errors.items():
            req = self.requests.get(rid)
            if req is not None:
                req.error = message
                self._finish(req, RequestStatus.FINISHED_ERROR)
        finished, self._finished = self._finished, []
        return finished

    def _tokens_until_stop(self, req: Request, tokens: list[int], k: int) -> int | None:
        """How many of a round's k tokens to append: up to and including the first that ends the
        request by length or by a stop token (EOS, stop_token_ids past min_tokens). None when the
        stop rules need the one-by-one path (stop tokens inside min_tokens)."""
        params = req.sampling_params
        n = k
        if params.max_tokens is not None:
            n = min(n, params.max_tokens - req.num_output_tokens)
        n = max(1, min(n, self.max_model_len - req.num_tokens))
        stops = params.stop_token_ids
        eos = None if params.ignore_eos else req.eos_token_id
        if not stops and eos is None:
            return n
        if req.num_output_tokens + 1 < params.min_tokens:
            return None
        for j in range(n):
            t = tokens[j]
            if t == eos or t in stops:
                return j + 1
        return n

    def _update_multi_step(self, req: Request, chunk: ScheduledChunk, tokens: list[int] | None,
                           now: float) -> None:
        """Append a multi-step chunk's tokens up to the first stop condition (as appending them
        one by one and checking after each would)."""
        if tokens is None or len(tokens) < chunk.num_steps:
            req.error = f"request {chunk.req_id!r}: the runner returned too few sampled tokens"
            self._finish(req, RequestStatus.FINISHED_ERROR)
            return
        base = chunk.num_computed_tokens
        n = self._tokens_until_stop(req, tokens, chunk.num_steps)
        if n is not None:  # fast path: at most the last appended token can stop the request
            self._append_checked(req, tokens[:n], base + n, now)
            return
        for j in range(chunk.num_steps):
            if self._append_checked(req, tokens[j:j + 1], base + j + 1, now):
                return

    def _append_checked(self, req: Request, tokens: list[int], num_computed: int, now: float) -> bool:
        """Append output tokens whose inputs are now computed; finish the request if the last
        one stops it (True then)."""
        req.num_computed_tokens = num_computed
        self.kv.cache_computed_blocks(req)
        req.extend_output_tokens([int(t) for t in tokens])
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        status = req.check_stop(self.max_model_len)
        if status is not None:
            self._finish(req, status)
        return status is not None
