"""Scheduler: each step fills a token budget with decodes first, then prefill chunks; preempts.

One code path: a scheduled request gets `num_planned_tokens - num_computed_tokens` tokens
(capped by the budget), whether that is a whole prompt, a chunk of one, the rest after a
prefix-cache hit, a re-prefill after preemption, or a single decode token. Queues, in the order
they are served:

    running (by priority) -> swapped (front first) -> waiting (front first, FIFO)

Swapped and waiting requests are only admitted in a step that preempted nobody. The samples of
an `n > 1` prompt share its K/V: see `groups.py`.

Planning advances `num_computed_tokens` at once and counts the tokens the plan samples as
placeholders (`Request.num_output_placeholders`); `update` fills them in. So `schedule()` may
be called again before the last plan's results are back (asynchronous execution): a request
whose last token is still a placeholder gets a chunk whose input is that token, taken on the
device from the plan before (`SchedulerOutput.prev_rows`). A multi-step decode round is the same
loop with a step count per chunk, planned when every running request decodes and no waiting
request could start. A constrained request (structured output) takes single steps on known tokens.
"""
from __future__ import annotations

import time
from collections import Counter, OrderedDict
from typing import Iterable

from batchllm.config import CacheConfig, SchedulerConfig
from batchllm.core.admission import Admission
from batchllm.core.groups import SampleGroups
from batchllm.core.kv_cache_manager import KVCacheManager, cdiv
from batchllm.core.outputs import NewRequestData, RunnerOutput, ScheduledChunk, SchedulerOutput
from batchllm.core.request import Request, RequestStatus, admission_error
from batchllm.core.stop import accept_tokens, steps_left
from batchllm.core.swap import CpuBlockPool

_FINISHED = {"stop": RequestStatus.FINISHED_STOPPED, "length": RequestStatus.FINISHED_LENGTH}


def _constrained(req: Request) -> bool:  # structured output: its mask needs every token known
    return req.sampling_params.structured_outputs is not None


class Scheduler(Admission):
    """Plans steps over the KV cache; admission and preemption are in core/admission.py."""

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
        self._rows: dict[str, int] = {}  # the last plan's sampled rows, by request
        self._num_inflight = 0  # plans scheduled whose results update() has not taken yet
        # hashes of full blocks that plans in flight compute: a request needing one of them
        # next waits until it is cached rather than computing it again
        self._computing: Counter[int] = Counter()
        self.num_preemptions = self.num_swapped_out = self.num_multi_step_rounds = 0
        self.num_chained_rounds = self.num_chained_steps = 0  # planned while one was in flight
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
        names = ("num_preemptions", "num_swapped_out", "num_multi_step_rounds", "num_chained_rounds",
                 "num_chained_steps", "prefix_cache_queries", "prefix_cache_hits")
        return {**{n: getattr(self, n) for n in names}, "kv_cache_usage": self.kv.pool.usage,
                "num_running": len(self.running) - sum(r.is_finished for r in self.running),
                "num_waiting": len(self.waiting), "num_swapped": len(self.swapped)}

    # ------------------------------------------------------------------ planning
    def schedule(self) -> SchedulerOutput:
        """The next step's plan. May be called again before update() of the last plan."""
        if self._running_dirty:
            self.running = [r for r in self.running if not r.is_finished]
            self._running_dirty = False
        plan = SchedulerOutput(finished_req_ids=self._finished_ids, prev_rows=[])
        self._finished_ids = []
        steps = self._round_steps()
        budget, preempted = self._schedule_running(plan, self.config.max_num_batched_tokens, steps)
        if not preempted and plan.num_steps == 1:
            budget = self._schedule_swapped(plan, budget)
            if not self.swapped:
                self._schedule_waiting(plan, budget)
        self._rows = {}
        for c in plan.chunks:
            if c.sample:
                self._rows[c.req_id] = len(self._rows)
        if all(r < 0 for r in plan.prev_rows):
            plan.prev_rows = None
        if plan.chunks:
            if self._num_inflight:
                if plan.num_steps > 1:
                    self.num_chained_rounds += 1
                else:
                    self.num_chained_steps += 1
            self.num_multi_step_rounds += plan.num_steps > 1
            self._num_inflight += 1
            self._computing.update(plan.computing_hashes)
        return plan

    def _round_steps(self) -> int:
        """Decode steps per request for this plan: num_decode_steps when every running request
        decodes, nothing is swapped out and the first waiting request would not fit now (a
        round would keep it waiting for nothing); else 1."""
        steps = self.config.num_decode_steps or 1
        running = self.running
        if (steps <= 1 or not running or self.swapped
                or len(running) > self.config.max_num_batched_tokens):
            return 1
        decoding = 0
        for req in running:
            if self._steps_left(req) < 1 or (req.num_output_placeholders and _constrained(req)):
                continue  # its plans in flight end it by length, or it waits for its last token
            if self._num_new_tokens(req, 2) != 1 or req.num_planned_tokens - req.num_computed_tokens != 1:
                return 1
            decoding += 1
        return 1 if decoding == 0 or self._could_admit(decoding) else steps

    def _could_admit(self, num_running: int) -> bool:
        """Whether the first waiting request would fit beside num_running decoding requests
        (each needing a block more)."""
        if not self.waiting or num_running >= self.config.max_num_seqs:
            return False
        first = next(iter(self.waiting.values()))
        return self.kv.num_free_blocks >= cdiv(first.num_tokens, self.block_size) + num_running

    def _steps_left(self, req: Request) -> int:
        left = steps_left(req.sampling_params, req.num_planned_outputs, req.num_planned_tokens,
                          self.max_model_len)
        # a request with no output yet samples one token even when its prompt fills the model
        return left if req.num_planned_outputs else max(left, 1)

    def _schedule_running(self, plan: SchedulerOutput, budget: int, steps: int) -> tuple[int, bool]:
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._num_new_tokens(req, budget)
            if n == 0:
                i += 1
                continue
            k = 1 if _constrained(req) else max(1, min(steps, self._steps_left(req)))
            copies = self.kv.allocate_slots(req, n + k - 1)
            if copies is None and k > 1:  # no room for a round: this and the rest take one step
                steps = k = 1
                copies = self.kv.allocate_slots(req, n)
            while copies is None:
                victim = self.running.pop()
                self._preempt(victim, plan)
                preempted = True
                if victim is req:
                    return budget, preempted
                copies = self.kv.allocate_slots(req, n)
            plan.copy_blocks.extend(copies)
            self._add_chunk(plan, req, n, k)
            budget -= n
            i += 1
        return budget, preempted

    def _num_new_tokens(self, req: Request, budget: int) -> int:
        if self._steps_left(req) < 1 or (req.num_output_placeholders and _constrained(req)):
            return 0
        n = min(req.num_planned_tokens - req.num_computed_tokens, self._chunk_cap(budget))
        return self.groups.cap_leader_tokens(req, req.num_computed_tokens, n)

    def _chunk_cap(self, budget: int) -> int:
        """At most this many tokens of one request in a step (long_prefill_token_threshold)."""
        cap = self.config.long_prefill_token_threshold
        return min(budget, cap) if cap else budget

    def _add_chunk(self, plan: SchedulerOutput, req: Request, n: int, num_steps: int = 1) -> None:
        """Plan n tokens of req from its first uncomputed one (num_steps decode steps when > 1)
        and advance it as if the plan had run: its samples become placeholders."""
        start = req.num_computed_tokens
        rid = req.request_id
        known = req.num_tokens
        tokens = req.all_token_ids[start:min(start + n, known)]
        row = -1
        if start + n > known:  # the last input is the last token the plan in flight samples
            assert start + n == req.num_planned_tokens and start + n - 1 >= known, req
            tokens.append(-1)
            row = self._rows[rid]
        sample = start + n == req.num_planned_tokens
        plan.chunks.append(ScheduledChunk(rid, tokens, start, list(self.kv.block_ids(rid)),
                                          sample, num_steps))
        plan.prev_rows.append(row)
        plan.num_steps = max(plan.num_steps, num_steps)
        req.num_computed_tokens = start + n + num_steps - 1
        if sample:
            req.num_output_placeholders += num_steps
        if not req.was_scheduled:
            req.was_scheduled = True
            req.metrics.first_scheduled_time = time.time()
            plan.new_requests.append(NewRequestData(rid, req.prompt_token_ids, req.sampling_params,
                                                    req.seed))

    # ------------------------------------------------------------------ results
    def update(self, plan: SchedulerOutput, output: RunnerOutput) -> list[Request]:
        """Apply a plan's results: fill its placeholders with the sampled tokens (up to the
        first stop), cache the blocks it computed, finish what stopped or failed."""
        if plan.chunks:
            self._num_inflight -= 1
            self._computing.subtract(plan.computing_hashes)
            self._computing = +self._computing
        row_of = {rid: i for i, rid in enumerate(output.req_ids)}
        now = time.time()
        for chunk in plan.chunks:
            req = self.requests.get(chunk.req_id)
            if req is None:
                continue  # finished or aborted since the plan was made
            if chunk.sample:
                req.num_output_placeholders -= chunk.num_steps
            end = chunk.num_computed_tokens + len(chunk.token_ids) + chunk.num_steps - 1
            if chunk.req_id in output.errors:
                req.error = output.errors[chunk.req_id]
                self._finish(req, RequestStatus.FINISHED_ERROR)
                continue
            if not chunk.sample:
                if req.status == RequestStatus.RUNNING:
                    self.kv.cache_computed_blocks(req, end)
                continue
            i = row_of.get(chunk.req_id)
            tokens = output.token_ids[i][:chunk.num_steps] if i is not None else []
            if len(tokens) < chunk.num_steps:
                req.error = f"request {chunk.req_id!r}: the runner returned too few sampled tokens"
                self._finish(req, RequestStatus.FINISHED_ERROR)
                continue
            got = accept_tokens(req.sampling_params, req.eos_token_id, req.num_output_tokens,
                                req.num_tokens, tokens, self.max_model_len)
            req.extend_output_tokens([int(t) for t in tokens[:got.num_tokens]])
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            if req.status == RequestStatus.RUNNING:
                self.kv.cache_computed_blocks(req, min(end, req.num_tokens))
            if got.finish is not None:
                req.stop_reason = got.stop_token
                self._finish(req, _FINISHED[got.finish])
        for rid, message in output.errors.items():
            req = self.requests.get(rid)
            if req is not None:
                req.error = message
                self._finish(req, RequestStatus.FINISHED_ERROR)
        finished, self._finished = self._finished, []
        return finished
