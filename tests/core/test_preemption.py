import pytest

from batchllm.core.request import RequestStatus
from tests.core.driver import make, req, step
from tests.core.fake_runner import reference_output

V = 1000


def run_pressured(mode: str, num_cpu_blocks: int = 16, caching: bool = True, threshold: int = 2048):
    """Three 6-token prompts that each grow to 14 tokens (4 blocks) in a 9-block cache."""
    s, runner = make(num_gpu_blocks=9, num_cpu_blocks=num_cpu_blocks, block_size=4,
                     caching=caching, preemption_mode=mode, swap_threshold_tokens=threshold)
    reqs = [req(f"r{i}", [10 * i + j for j in range(6)], max_tokens=8, t=float(i))
            for i in range(3)]
    for r in reqs:
        s.add_request(r)
    events = []  # (victim id, computed tokens when preempted, status after)
    while s.has_unfinished_requests():
        before = sorted((r for r in s.running), key=lambda r: r.priority)
        computed = {r.request_id: r.num_computed_tokens for r in before}
        plan, _ = step(s, runner)
        if plan.preempted_req_ids:
            k = len(plan.preempted_req_ids)
            # victims are the latest arrivals among the running, latest first
            assert plan.preempted_req_ids == [r.request_id for r in reversed(before[-k:])]
        for rid in plan.preempted_req_ids:
            events.append((rid, computed[rid], s.requests[rid].status))
    for r in reqs:
        assert r.output_token_ids == reference_output(r.prompt_token_ids, None, V, 8)
        assert r.finish_reason == "length"
    return s, events


@pytest.mark.parametrize("caching", [True, False])
def test_recompute_preempts_latest_and_resumes_with_same_tokens(caching):
    s, events = run_pressured("recompute", caching=caching)
    assert events and events[0][0] == "r2"
    assert all(st == RequestStatus.WAITING for _, _, st in events)
    assert s.stats["num_preemptions"] == len(events) and s.stats["num_swapped_out"] == 0
    if caching:  # the re-prefill found the victim's freed prompt blocks still cached
        assert s.stats["prefix_cache_hits"] > 0


def test_swap_moves_blocks_out_and_back():
    s, events = run_pressured("swap")
    assert events and events[0][0] == "r2"
    assert all(st == RequestStatus.SWAPPED for _, _, st in events)
    assert s.stats["num_swapped_out"] == len(events)
    assert s.cpu.num_free_blocks == 16


def test_swap_falls_back_to_recompute_when_cpu_pool_is_full():
    s, events = run_pressured("swap", num_cpu_blocks=1)
    assert events and all(st == RequestStatus.WAITING for _, _, st in events)
    assert s.stats["num_swapped_out"] == 0


@pytest.mark.parametrize("threshold", [1, 7, 1000])
def test_auto_swaps_long_and_recomputes_short(threshold):
    _, events = run_pressured("auto", threshold=threshold)
    assert events
    for _, computed, status in events:
        assert status == (RequestStatus.SWAPPED if computed >= threshold else RequestStatus.WAITING)


def test_swapped_request_keeps_its_kv_content_across_block_reuse():
    # One long request is swapped out while the others reuse its GPU blocks; the fake runner
    # reads the context back through the new block table, so wrong swap-in data would show.
    s, runner = make(num_gpu_blocks=6, num_cpu_blocks=8, block_size=4, caching=False,
                     preemption_mode="swap", max_num_batched_tokens=64)
    a = req("a", list(range(9)), max_tokens=6, t=0.0)
    b = req("b", list(range(100, 109)), max_tokens=6, t=1.0)
    s.add_request(a)
    s.add_request(b)
    saw_swap_in = False
    while s.has_unfinished_requests():
        plan, _ = step(s, runner)
        saw_swap_in |= bool(plan.swap_in)
    assert saw_swap_in and b.num_preemptions > 0
    assert a.output_token_ids == reference_output(a.prompt_token_ids, None, V, 6)
    assert b.output_token_ids == reference_output(b.prompt_token_ids, None, V, 6)
