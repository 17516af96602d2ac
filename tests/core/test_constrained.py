"""Constrained requests (structured output) in the one planning path: single steps inside
multi-step rounds, never planned on a placeholder input, same tokens as unconstrained ones."""
import random

from batchllm.sampling_params import StructuredOutputsParams
from tests.core.driver import AsyncDriver, make, req, step
from tests.core.fake_runner import reference_output
from tests.core.invariants import check_invariants

V = 1000
REGEX = StructuredOutputsParams(regex="[0-9]+")


def _decoding(s, runner, specs: dict) -> dict:
    """Requests {id: (prompt, max_tokens, constrained)} added and stepped until all decode."""
    rs = {}
    for i, (rid, (prompt, n, constrained)) in enumerate(specs.items()):
        kw = {"structured_outputs": REGEX} if constrained else {}
        rs[rid] = req(rid, prompt, max_tokens=n, t=float(i), **kw)
        s.add_request(rs[rid])
    while any(r.num_output_tokens == 0 for r in rs.values()):
        step(s, runner)
    return rs


def test_a_constrained_request_takes_one_step_inside_a_round():
    s, runner = make(num_decode_steps=4, block_size=4, caching=False)
    rs = _decoding(s, runner, {"a": ([1] * 6, 20, False), "c": ([3] * 5, 20, True)})
    plan = s.schedule()
    assert plan.num_steps == 4
    assert {c.req_id: c.num_steps for c in plan.chunks} == {"a": 4, "c": 1}
    s.update(plan, runner.execute(plan))
    check_invariants(s)
    assert rs["a"].num_output_tokens == 5 and rs["c"].num_output_tokens == 2
    assert rs["c"].output_token_ids == reference_output([3] * 5, None, V, 2)


def test_a_constrained_request_is_not_planned_ahead_of_its_last_token():
    s, runner = make(num_decode_steps=4, block_size=4, caching=False)
    rs = _decoding(s, runner, {"a": ([1] * 6, 30, False), "c": ([3] * 5, 30, True)})
    first = s.schedule()
    nxt = s.schedule()  # planned while `first` runs: c's last token is still a placeholder
    assert [c.req_id for c in nxt.chunks] == ["a"] and nxt.num_steps == 4
    out = runner.launch(first)
    s.update(first, runner.collect(out))
    third = s.schedule()  # c's token is back: c runs again, from a known token
    chunk = next(c for c in third.chunks if c.req_id == "c")
    assert chunk.token_ids == [rs["c"].output_token_ids[-1]] and chunk.num_steps == 1
    assert rs["c"].num_output_placeholders == 1


def test_mixed_workloads_with_async_rounds_and_preemption_give_the_reference_tokens():
    for seed in range(12):
        rng = random.Random(seed)
        s, runner = make(num_gpu_blocks=rng.randint(8, 20), block_size=4, caching=rng.random() < 0.5,
                         num_decode_steps=rng.choice([1, 4]), max_num_seqs=rng.choice([2, 8]),
                         max_num_batched_tokens=rng.choice([8, 32]),
                         preemption_mode=rng.choice(["recompute", "swap"]),
                         num_cpu_blocks=40)
        rs = {}
        for i in range(rng.randint(4, 10)):
            prompt = [rng.randrange(V) for _ in range(rng.randint(1, 12))]
            kw = {"structured_outputs": REGEX} if rng.random() < 0.5 else {}
            rs[f"r{i}"] = req(f"r{i}", prompt, max_tokens=rng.randint(1, 12), t=float(i), **kw)
            s.add_request(rs[f"r{i}"])
        driver = AsyncDriver() if rng.random() < 0.7 else None
        for _ in range(2000):
            if not s.has_unfinished_requests() and (driver is None or driver.inflight is None):
                break
            plan, _ = driver.step(s, runner) if driver else step(s, runner)
            for c in plan.chunks:
                if rs[c.req_id].sampling_params.structured_outputs is not None:
                    assert c.num_steps == 1 and -1 not in c.token_ids, (seed, c)
        for r in rs.values():
            want = reference_output(r.prompt_token_ids, None, V, r.sampling_params.max_tokens)
            assert r.output_token_ids == want, (seed, r)
