"""Builds schedulers and requests for tests and drives them with the fake runner."""
from __future__ import annotations

from batchllm.config import CacheConfig, SchedulerConfig
from batchllm.core.request import Request
from batchllm.core.scheduler import Scheduler
from batchllm.sampling_params import SamplingParams
from tests.core.fake_runner import FakeRunner
from tests.core.invariants import check_invariants


def make(num_gpu_blocks: int = 64, num_cpu_blocks: int = 0, block_size: int = 4,
         max_model_len: int = 1024, caching: bool = True, **sched: object
         ) -> tuple[Scheduler, FakeRunner]:
    sched.setdefault("max_num_batched_tokens", 8192)  # the engine resolves the device default
    s = Scheduler(SchedulerConfig(**sched), CacheConfig(block_size=block_size,
                                                        enable_prefix_caching=caching),
                  num_gpu_blocks, num_cpu_blocks, max_model_len)
    return s, FakeRunner(num_gpu_blocks, num_cpu_blocks, block_size, vocab=1000)


def req(rid: str, prompt: list[int], max_tokens: int = 8, t: float = 0.0, n: int = 1,
        index: int = 0, group: str | None = None, seed: int | None = None,
        eos: int | None = None, **params: object) -> Request:
    sp = SamplingParams(n=n, max_tokens=max_tokens, temperature=0.0, **params)
    return Request(rid, prompt, sp, arrival_time=t, eos_token_id=eos, group_id=group,
                   sample_index=index, seed=seed)


def add_group(s: Scheduler, gid: str, prompt: list[int], n: int, max_tokens: int = 8,
              t: float = 0.0, **kw: object) -> list[Request]:
    out = [req(f"{gid}-{i}", prompt, max_tokens, t, n=n, index=i, group=gid, seed=i, **kw)
           for i in range(n)]
    for r in out:
        s.add_request(r)
    return out


def step(s: Scheduler, runner: FakeRunner, check: bool = True):
    plan = s.schedule()
    out = runner.execute(plan)
    finished = s.update(plan, out)
    if check:
        check_invariants(s)
    return plan, finished


class AsyncDriver:
    """Steps a scheduler the way LLMEngine does with async scheduling: a plan is launched, the
    plan after it scheduled (before the first one's results are applied) and launched on top of
    it, and only then is the first one applied."""

    def __init__(self) -> None:
        self.inflight = None
        self.num_ahead = 0  # plans with work scheduled before the plan before them was applied

    def step(self, s: Scheduler, runner: FakeRunner, check: bool = True):
        if self.inflight is None:
            plan = s.schedule()
            handle = runner.launch(plan)
        else:
            (plan, handle), self.inflight = self.inflight, None
        if plan.chunks:
            nxt = s.schedule()
            self.num_ahead += bool(nxt.chunks)
            self.inflight = (nxt, runner.launch(nxt, handle))
        finished = s.update(plan, runner.collect(handle))
        if check:
            check_invariants(s)
        return plan, finished


def drain(s: Scheduler, runner: FakeRunner, max_steps: int = 10_000, check: bool = True) -> dict:
    """Step until nothing is left; returns {request_id: finished Request}."""
    done = {}
    for _ in range(max_steps):
        if not s.has_unfinished_requests():
            return done
        _, finished = step(s, runner, check)
        for r in finished:
            assert r.request_id not in done, f"{r.request_id} finished twice"
            done[r.request_id] = r
    raise AssertionError(f"requests still unfinished after {max_steps} steps: {list(s.requests)}")
