"""Randomized workloads on a small cache: every step keeps the books straight, all finish."""
import random

import pytest

from batchllm.core.request import RequestStatus
from tests.core.driver import AsyncDriver, add_group, make, req, step
from tests.core.fake_runner import reference_output

V = 1000
STATS: list[dict] = []


def run_random(seed: int, mode: str, caching: bool, decode_steps: int = 1,
               async_rounds: bool = False) -> int:
    """Runs one random workload to the end, checking as it goes; returns its multi-step rounds
    (with async_rounds, the plans scheduled while the one before them was still running)."""
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    num_blocks = rng.randint(6, 24)
    s, runner = make(num_gpu_blocks=num_blocks, num_cpu_blocks=rng.choice([0, 4, 40, 40]),
                     block_size=bs, max_model_len=rng.choice([32, 64]), caching=caching,
                     preemption_mode=mode, swap_threshold_tokens=rng.choice([1, 12, 1000]),
                     max_num_batched_tokens=rng.choice([8, 24, 64]),
                     max_num_seqs=rng.choice([2, 4, 16]), num_decode_steps=decode_steps,
                     long_prefill_token_threshold=rng.choice([0, 0, 5]))
    prefixes = [[rng.randrange(V) for _ in range(rng.randint(1, 20))] for _ in range(3)]
    pending = []  # (arrival step, requests of one prompt)
    for i in range(rng.randint(10, 25)):
        prompt = rng.choice(prefixes)[:rng.randint(1, 20)] + [rng.randrange(V) for _ in
                                                              range(rng.randint(0, 12))]
        prompt = prompt or [1]
        n = rng.choice([1, 1, 1, 2, 3])
        kw = dict(max_tokens=rng.randint(1, 12), t=float(i), eos=rng.choice([None, 7]))
        if n == 1:
            group = [req(f"q{i}", prompt, seed=rng.choice([None, 3]), **kw)]
        else:
            group = ("g", f"g{i}", prompt, n, kw)
        pending.append((rng.randint(0, 30), group))
    pending.sort(key=lambda x: x[0])
    everything, aborted, done, first_step, arrival, finish_step = [], set(), {}, {}, {}, {}
    max_len = s.max_model_len
    copies = multi_rounds = 0
    driver = AsyncDriver() if async_rounds else None
    for t in range(3000):
        while pending and pending[0][0] <= t:
            _, g = pending.pop(0)
            if isinstance(g, tuple):
                _, gid, prompt, n, kw = g
                g = add_group(s, gid, prompt, n, kw["max_tokens"], kw["t"], eos=kw["eos"])
            else:
                s.add_request(g[0])
            everything += g
            arrival.update({r.request_id: t for r in g})
        if not pending and not s.has_unfinished_requests() and not (driver and driver.inflight):
            break
        if s.requests and rng.random() < 0.02:
            victim = rng.choice(sorted(s.requests))
            aborted.add(victim)
            s.finish_requests([victim], RequestStatus.FINISHED_ABORTED)
        plan, finished = driver.step(s, runner) if driver else step(s, runner)
        copies += len(plan.copy_blocks)
        multi_rounds += plan.num_steps > 1
        assert plan.num_scheduled_tokens <= s.config.max_num_batched_tokens
        assert len(plan.chunks) <= s.config.max_num_seqs
        for c in plan.chunks:
            first_step.setdefault(c.req_id, t)
        for r in finished:
            assert r.request_id not in done
            done[r.request_id] = r
        for r in finished:
            finish_step[r.request_id] = t
    else:
        raise AssertionError(f"seed {seed}: not finished: {list(s.requests)}")
    assert set(done) == {r.request_id for r in everything}
    # no starvation: a request's time in the system is bounded by the work ahead of it
    longest = max(finish_step[r] - arrival[r] for r in done)
    total = sum(r.num_tokens for r in everything)
    assert longest <= total, f"seed {seed}: a request took {longest} steps"
    STATS.append(dict(s.stats, copies=copies, forks=sum(r.sample_index > 0 and r.num_cached_tokens
                                                        > 0 for r in everything), longest=longest))
    for r in everything:
        if r.request_id in aborted:
            assert r.status == RequestStatus.FINISHED_ABORTED
        elif r.num_prompt_tokens > max_len:
            assert r.status == RequestStatus.FINISHED_ERROR and r.error
        else:
            p = r.sampling_params
            assert r.output_token_ids == reference_output(
                r.prompt_token_ids, r.seed, V, p.max_tokens, r.eos_token_id, p.min_tokens,
                max_len), f"seed {seed}: {r.request_id} differs from the unpressured output"
    assert s.kv.num_free_blocks == s.kv.pool.num_blocks and s.cpu.num_free_blocks == s.cpu.num_blocks
    return driver.num_ahead if driver else multi_rounds


@pytest.mark.parametrize("mode", ["recompute", "swap", "auto"])
@pytest.mark.parametrize("caching", [True, False])
def test_random_workloads(mode, caching):
    for seed in range(12):
        run_random(seed, mode, caching)


@pytest.mark.parametrize("mode", ["recompute", "swap", "auto"])
def test_random_workloads_with_multi_step_decode(mode):
    """The same books and outputs when decode rounds of 3 steps are planned where possible."""
    rounds = [run_random(seed, mode, caching=seed % 2 == 0, decode_steps=3) for seed in range(12)]
    assert sum(rounds) > 0


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("mode", ["recompute", "swap", "auto"])
def test_random_workloads_with_async_scheduling(mode, steps):
    """The same books and outputs when each plan (step or multi-step round) is planned and queued
    before the one before it is applied (aborts, EOS and waiting requests arrive meanwhile)."""
    before = len(STATS)
    chained = [run_random(seed, mode, caching=seed % 2 == 1, decode_steps=steps, async_rounds=True)
               for seed in range(12)]
    runs = STATS[before:]
    assert sum(r["num_chained_steps"] for r in runs) > 0
    if steps > 1:
        assert sum(r["num_chained_rounds"] for r in runs) > 0
    assert sum(chained) == sum(r["num_chained_steps"] + r["num_chained_rounds"] for r in runs)
