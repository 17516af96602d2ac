"""An in-test engine that generates tokens step by step like the real one: up to `max_running`
requests decode one token a step and finish after their max_tokens; its stats count generated
tokens as they are produced (num_generated_tokens), running requests, KV use, preemptions and
prefix-cache hits. `step_s` makes each step take that long (a clock the tests can reason about)."""
from __future__ import annotations

import time
from typing import Any

from batchllm.core.outputs import CompletionOutput, RequestMetrics, RequestOutput
from batchllm.sampling_params import SamplingParams
from tests.jobs.fake_engine import FakeTokenizer


class StreamEngine:
    vocab_size = 300

    def __init__(self, max_running: int = 4, step_s: float = 0.0, max_model_len: int = 256,
                 on_step: Any = None) -> None:
        self.tokenizer = FakeTokenizer()
        self.max_model_len = max_model_len
        self.max_running, self.step_s, self.on_step = max_running, step_s, on_step
        self.queue: dict[str, tuple[list[int], SamplingParams, float]] = {}
        self.made: dict[str, int] = {}  # running request -> tokens generated so far
        self.generated = self.preemptions = self.hits = self.queries = self.steps = 0

    def add_request(self, request_id: str, prompt: list[int], sampling_params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        self.queue[request_id] = (list(prompt), sampling_params, arrival_time or time.time())

    def has_unfinished_requests(self) -> bool:
        return bool(self.queue)

    def get_num_unfinished_requests(self) -> int:
        return len(self.queue)

    def abort_request(self, request_id: str) -> None:
        self.queue.pop(request_id, None)
        self.made.pop(request_id, None)

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self)
        if self.step_s:
            time.sleep(self.step_s)
        for rid, (ids, _, _) in self.queue.items():
            if len(self.made) >= self.max_running:
                break
            if rid not in self.made:
                self.made[rid] = 0
                self.queries += len(ids)
                self.hits += len(ids) // 2
        outs = []
        for rid in list(self.made):
            self.made[rid] += 1
            self.generated += 1
            ids, p, t0 = self.queue[rid]
            if self.made[rid] >= (p.max_tokens or 4):
                toks = [(sum(ids) + k) % self.vocab_size for k in range(self.made.pop(rid))]
                del self.queue[rid]
                outs.append(RequestOutput(
                    rid, None, ids, [CompletionOutput(0, f"out-{rid}", toks, finish_reason="length")],
                    num_cached_tokens=len(ids) // 2, finished=True,
                    metrics=RequestMetrics(arrival_time=t0, first_scheduled_time=t0,
                                           first_token_time=t0, finished_time=time.time())))
        if self.steps % 7 == 0:
            self.preemptions += 1
        return outs

    def stats(self) -> dict[str, Any]:
        return {"num_generated_tokens": self.generated, "num_running": len(self.made),
                "num_waiting": len(self.queue) - len(self.made),
                "kv_cache_usage": len(self.made) / self.max_running,
                "num_preemptions": self.preemptions, "prefix_cache_hits": self.hits,
                "prefix_cache_queries": self.queries}
