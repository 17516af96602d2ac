"""The engine's grammar state: one matcher per constrained request, advanced by the accepted tokens.

    add_request ─► matcher (a copy of the constraint's compiled prototype)
    plan launched ─► bitmask(plan): each constrained sampled row's allowed tokens (CPU, threads)
    update(plan) ─► advance(req_ids): the tokens the scheduler kept; a grammar that is complete
                    ends its request ("stop"); a token the grammar refuses is an error
    finish ─► valid(req_id, kept): whether the kept tokens complete the grammar

The scheduler plans a constrained request only when its last token is known (never a
placeholder) and for one step at a time, so its matcher has always consumed every token before
the mask for its next one is built.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from batchllm.core.outputs import SchedulerOutput
from batchllm.core.request import Request
from batchllm.sampling_params import StructuredOutputsParams
from batchllm.structured.bitmask import GrammarBitmask
from batchllm.structured.grammar import GrammarCache


@dataclass(slots=True)
class _Entry:
    request: Request
    matcher: Any  # llguidance.LLMatcher
    num_consumed: int = 0


class StructuredOutputs:
    """Matchers of the constrained requests in an engine, by request (sample) id."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.grammars = GrammarCache(hf_tokenizer, vocab_size, eos_token_ids)
        self._words = (vocab_size + 31) // 32
        self._entries: dict[str, _Entry] = {}

    @property
    def active(self) -> bool:
        """Whether any constrained request is tracked (else no plan needs a mask)."""
        return bool(self._entries)

    def add(self, requests: list[Request], params: StructuredOutputsParams) -> None:
        """Give each sample of a request its matcher; raises StructuredOutputError naming the
        problem (invalid schema, regex or grammar; no grammar library)."""
        matchers = [self.grammars.matcher(params) for _ in requests]
        for req, m in zip(requests, matchers):
            self._entries[req.request_id] = _Entry(req, m)

    def bitmask(self, plan: SchedulerOutput) -> GrammarBitmask | None:
        """The allowed tokens of the plan's constrained sampled rows; None when it has none."""
        ids: list[str] = []
        pairs: list[tuple[Any, int]] = []
        for c in plan.chunks:
            if c.sample:
                e = self._entries.get(c.req_id)
                if e is not None:
                    self._catch_up(e)
                    pairs.append((e.matcher, len(ids)))
                    ids.append(c.req_id)
        if not ids:
            return None
        mask = np.empty((len(ids), self._words), dtype=np.int32)
        self.grammars.executor.unsafe_compute_mask_ptr(pairs, mask.ctypes.data, self._words * 4,
                                                       len(ids))
        return GrammarBitmask(ids, mask)

    def advance(self, req_ids: list[str]) -> tuple[list[Request], list[Request]]:
        """Feed the tokens the scheduler kept to the matchers of `req_ids` (those constrained):
        (unfinished requests whose grammar is now complete, requests whose token the grammar
        refused, with `error` set)."""
        complete, refused = [], []
        for rid in req_ids:
            e = self._entries.get(rid)
            if e is None:
                continue
            if not self._catch_up(e):
                e.request.error = (f"structured output: a sampled token does not fit the grammar "
                                   f"({e.matcher.get_error() or 'no token was allowed'})")
                refused.append(e.request)
            elif e.matcher.is_stopped() and not e.request.is_finished:
                complete.append(e.request)
        return complete, refused

    def valid(self, req_id: str, num_kept: int | None = None) -> bool | None:
        """Whether the request's first `num_kept` output tokens (all: None) complete its grammar;
        None for an unconstrained request."""
        e = self._entries.get(req_id)
        if e is None:
            return None
        if not self._catch_up(e):
            return False
        back = e.num_consumed - num_kept if num_kept is not None else 0
        if back > 0 and not e.matcher.rollback(back):
            return False
        e.num_consumed -= max(back, 0)
        return e.matcher.is_accepting() and not e.matcher.is_error()

    def release(self, req_id: str) -> None:
        self._entries.pop(req_id, None)

    @staticmethod
    def _catch_up(e: _Entry) -> bool:
        tokens = e.request.output_token_ids[e.num_consumed:]
        if not tokens:
            return not e.matcher.is_error()
        e.num_consumed += len(tokens)
        return e.matcher.consume_tokens(tokens)
