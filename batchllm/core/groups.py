"""The n samples of one prompt share its K/V: a leader prefills prompt[:-1], siblings fork from it.

    leader:   | prompt[:-1] computed once | last prompt token | its outputs ...
    sibling:  | shared blocks (ref += 1)  | last prompt token (own; copy-on-write if the
                                            shared last block is partly filled) | its outputs

The first fresh sample of a group admitted becomes its leader; while fresh siblings wait, the
leader's prefill stops at prompt[:-1]. Siblings arriving before the leader gets there are
deferred (later requests are admitted past them). If the leader is preempted or finishes, the
next fresh sibling becomes leader and prefills itself (helped by the prefix cache if it is on).
"""
from __future__ import annotations

from batchllm.core.request import Request


class SampleGroups:
    def __init__(self) -> None:
        self._fresh: set[str] = set()  # ids of never-scheduled samples of n > 1 groups
        self._num_fresh: dict[str, int] = {}  # group id -> how many of them
        self._leaders: dict[str, Request] = {}

    @staticmethod
    def _shares(req: Request) -> bool:
        return req.sampling_params.n > 1 and req.num_prompt_tokens > 1

    def on_add(self, req: Request) -> None:
        if self._shares(req) and not req.was_scheduled:
            self._fresh.add(req.request_id)
            self._num_fresh[req.group_id] = self._num_fresh.get(req.group_id, 0) + 1

    def admission(self, req: Request) -> str:
        """"fork" (share the leader's blocks), "defer" (leader not there yet) or "admit"."""
        if req.request_id not in self._fresh:
            return "admit"
        leader = self._leaders.get(req.group_id)
        if leader is None:
            return "admit"
        return "fork" if leader.num_computed_tokens >= req.num_prompt_tokens - 1 else "defer"

    def leader_of(self, req: Request) -> Request:
        return self._leaders[req.group_id]

    def cap_leader_tokens(self, req: Request, num_computed: int, n: int,
                          becoming_leader: bool = False) -> int:
        """Cap a leader's chunk at prompt[:-1] while fresh siblings still wait to fork."""
        gid = req.group_id
        is_leader = self._leaders.get(gid) is req
        if not is_leader:
            if not (becoming_leader and req.request_id in self._fresh
                    and gid not in self._leaders and self._num_fresh.get(gid, 0) > 1):
                return n
        limit = req.num_prompt_tokens - 1
        if num_computed < limit:
            return min(n, limit - num_computed)
        return n

    def on_admit(self, req: Request) -> None:
        """A fresh sample was just admitted (as leader or by forking)."""
        if req.request_id not in self._fresh:
            return
        gid = req.group_id
        self._drop_fresh(req)
        if self._num_fresh.get(gid, 0) > 0:
            self._leaders.setdefault(gid, req)
        else:
            self._leaders.pop(gid, None)

    def on_preempt(self, req: Request) -> None:
        if self._leaders.get(req.group_id) is req:
            del self._leaders[req.group_id]

    def on_finish(self, req: Request) -> None:
        self.on_preempt(req)
        if req.request_id in self._fresh:
            self._drop_fresh(req)
            if req.group_id not in self._num_fresh:
                self._leaders.pop(req.group_id, None)

    def _drop_fresh(self, req: Request) -> None:
        self._fresh.discard(req.request_id)
        left = self._num_fresh[req.group_id] - 1
        if left:
            self._num_fresh[req.group_id] = left
        else:
            del self._num_fresh[req.group_id]
