"""An in-test engine that honours the streaming API (add_request / step / abort / stats).

Outputs are a deterministic function of the prompt ids and the request's own sampling settings,
so a test can tell which settings reached which row, and requests finish out of order.
"""
from __future__ import annotations

import time
from typing import Any

from batchllm.core.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from batchllm.sampling_params import SamplingParams


class FakeTokenizer:
    def encode(self, text: str) -> list[int]:
        return [1] + [3 + ord(c) % 250 for c in text]

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            system_prompt: str | None = None) -> list[int]:
        if system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return self.encode(text + ("<assistant>" if add_generation_prompt else ""))


def expected_text(ids: list[int], p: SamplingParams, index: int = 0) -> str:
    return f"{sum(ids)}/{len(ids)}|t={p.temperature}|p={p.top_p}|s={p.seed}|m={p.max_tokens}|i={index}"


class FakeEngine:
    vocab_size = 300

    def __init__(self, max_model_len: int = 64, per_step: int = 3, fail_at_step: int | None = None,
                 on_step: Any = None) -> None:
        self.tokenizer = FakeTokenizer()
        self.max_model_len = max_model_len
        self.per_step = per_step
        self.fail_at_step = fail_at_step
        self.on_step = on_step
        self.waiting: dict[str, tuple[list[int], SamplingParams, float]] = {}
        self.steps = 0
        self.max_unfinished = 0
        self.seen_ids: list[str] = []
        self.prefix_queries = 0

    def add_request(self, request_id: str, prompt: list[int], sampling_params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        if request_id in self.waiting:
            raise ValueError(f"duplicate request id {request_id}")
        self.seen_ids.append(request_id)
        self.waiting[request_id] = (list(prompt), sampling_params, arrival_time or time.time())
        self.max_unfinished = max(self.max_unfinished, len(self.waiting))

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting)

    def abort_request(self, request_id: str) -> None:
        self.waiting.pop(request_id, None)

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self)
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            raise RuntimeError("fake engine crash")
        # Finish the newest requests first: outputs come back out of input order.
        done = list(self.waiting)[-self.per_step:][::-1]
        outs = []
        for rid in done:
            ids, p, t0 = self.waiting.pop(rid)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            metrics = RequestMetrics(arrival_time=t0, first_scheduled_time=t0 + 0.001,
                                     first_token_time=t0 + 0.002, finished_time=t0 + 0.003)
            if bad:
                outs.append(RequestOutput(rid, None, ids, [CompletionOutput(0, "", [],
                                          finish_reason="error")], finished=True,
                                          error=f"token id {bad[0]} is outside the vocabulary",
                                          metrics=metrics))
                continue
            comps = []
            for i in range(p.n):
                toks = [(sum(ids) + k + i) % self.vocab_size for k in range(p.max_tokens or 4)]
                comps.append(CompletionOutput(
                    i, expected_text(ids, p, i), toks,
                    logprobs=[_fake_logprobs(t, p.logprobs) for t in toks]
                    if p.logprobs is not None else None,
                    finish_reason="length"))
            outs.append(RequestOutput(rid, None, ids, comps, num_cached_tokens=len(ids) // 2,
                                      finished=True, metrics=metrics))
        return outs

    def stats(self) -> dict[str, Any]:
        return {"num_preemptions": 0, "prefix_cache_queries": 10, "prefix_cache_hits": 5,
                "kv_cache_usage": 0.25, "num_running": len(self.waiting), "num_waiting": 0}


def _fake_logprobs(token: int, k: int) -> dict[int, Logprob]:
    """vLLM's shape: the sampled token (log p -0.5, the most likely) and, when k > 0, token 7."""
    step = {token: Logprob(-0.5, 1, f"<{token}>")}
    if k and token != 7:
        step[7] = Logprob(-1.5, 2, "<7>")
    return step
