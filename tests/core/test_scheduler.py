from batchllm.core.request import RequestStatus
from tests.core.invariants import check_invariants
from tests.core.driver import add_group, drain, make, req, step
from tests.core.fake_runner import reference_output

V = 1000


def test_chunked_prefill_token_accounting():
    s, runner = make(max_num_batched_tokens=8)
    r = req("a", list(range(20)), max_tokens=3)
    s.add_request(r)
    sizes, computed_before, samples = [], [], []
    while s.has_unfinished_requests():
        plan, _ = step(s, runner)
        (c,) = plan.chunks
        sizes.append(len(c.token_ids))
        computed_before.append(c.num_computed_tokens)
        samples.append(c.sample)
    assert sizes == [8, 8, 4, 1, 1]
    assert computed_before == [0, 8, 16, 20, 21]
    assert samples == [False, False, True, True, True]
    assert r.output_token_ids == reference_output(list(range(20)), None, V, 3)
    assert r.status == RequestStatus.FINISHED_LENGTH and r.finish_reason == "length"
    assert r.metrics.first_scheduled_time <= r.metrics.first_token_time <= r.metrics.finished_time


def test_decodes_first_then_prefill_chunks_within_caps_every_step():
    s, runner = make(max_num_batched_tokens=10, max_num_seqs=3, caching=False)
    prompts = {f"r{i}": [i] * (3 + 5 * i) for i in range(6)}
    for i, (rid, p) in enumerate(prompts.items()):
        s.add_request(req(rid, p, max_tokens=4, t=float(i)))
    done = {}
    while s.has_unfinished_requests():
        running_before = {r.request_id for r in s.running if r.num_computed_tokens
                          and r.num_computed_tokens == r.num_tokens - 1}
        plan, finished = step(s, runner)
        assert plan.num_scheduled_tokens <= 10 and len(plan.chunks) <= 3
        decodes = [c.req_id for c in plan.chunks if c.req_id in running_before]
        assert [c.req_id for c in plan.chunks[:len(decodes)]] == decodes, "decodes go first"
        done.update({r.request_id: r for r in finished})
    for rid, p in prompts.items():
        assert done[rid].output_token_ids == reference_output(p, None, V, 4)


def test_stop_conditions():
    s, runner = make()
    p = [1, 2, 3]
    ref = reference_output(p, None, V, 6)
    eos_req = req("eos", p, max_tokens=6, eos=ref[2])
    min_req = req("min", p, max_tokens=6, eos=ref[0], min_tokens=2)
    stop_req = req("stop", p, max_tokens=6, stop_token_ids=[ref[1]])
    ignore = req("ignore", p, max_tokens=6, eos=ref[0], ignore_eos=True)
    for r in (eos_req, min_req, stop_req, ignore):
        s.add_request(r)
    drain(s, runner)
    assert eos_req.output_token_ids == ref[:3] and eos_req.finish_reason == "stop"
    assert eos_req.stop_reason is None
    assert stop_req.output_token_ids == ref[:2] and stop_req.stop_reason == ref[1]
    assert ignore.output_token_ids == ref and ignore.finish_reason == "length"
    # min_tokens=2 suppresses the eos at position 0; it may stop at the next eos only
    expected = next((ref[:i + 1] for i in range(1, 6) if ref[i] == ref[0]), ref)
    assert min_req.output_token_ids == expected


def test_max_model_len_finishes_with_length():
    s, runner = make(max_model_len=10)
    r = req("a", list(range(7)), max_tokens=None)
    s.add_request(r)
    drain(s, runner)
    assert r.num_tokens == 10 and r.finish_reason == "length"


def test_too_long_requests_error_and_others_go_on():
    s, runner = make(num_gpu_blocks=4, block_size=4, max_model_len=100)
    too_long_model = req("long", list(range(101)))
    too_long_cache = req("cache", list(range(17)))  # 4 blocks * 4 = 16 tokens of cache
    empty = req("empty", [])
    ok = req("ok", list(range(5)), max_tokens=20)
    for r in (too_long_model, too_long_cache, empty, ok):
        s.add_request(r)
    done = drain(s, runner)
    assert set(done) == {"long", "cache", "empty", "ok"}
    for r in (too_long_model, too_long_cache, empty):
        assert r.status == RequestStatus.FINISHED_ERROR and r.finish_reason == "error"
    assert "max_model_len=100" in too_long_model.error and "101" in too_long_model.error
    assert "KV cache" in too_long_cache.error and "empty" in empty.error
    # the cache caps the usable length: 16 tokens, 5 prompt + 11 outputs
    assert ok.output_token_ids == reference_output(list(range(5)), None, V, 20, max_len=16)


def test_abort_frees_blocks_and_tells_the_runner():
    s, runner = make(num_gpu_blocks=8, caching=False)
    a, b = req("a", list(range(9)), max_tokens=50), req("b", [1, 2], max_tokens=50)
    s.add_request(a)
    s.add_request(b)
    step(s, runner)
    assert s.kv.num_free_blocks == 8 - 3 - 1
    s.finish_requests(["a", "nope"], RequestStatus.FINISHED_ABORTED)
    assert s.kv.num_free_blocks == 8 - 1 and a.finish_reason == "abort"
    plan, finished = step(s, runner)
    assert plan.finished_req_ids == ["a"] and finished == [a]
    assert [c.req_id for c in plan.chunks] == ["b"]
    s.finish_requests("b", RequestStatus.FINISHED_STOPPED, stop_reason="###")
    assert b.stop_reason == "###" and s.stats["kv_cache_usage"] == 0.0
    plan = s.schedule()
    assert plan.finished_req_ids == ["b"] and plan.is_empty
    assert s.update(plan, runner.execute(plan)) == [b] and not s.has_unfinished_requests()


def test_runner_error_finishes_only_that_request():
    s, runner = make()
    a, b = req("a", [1, 2, 3]), req("b", [4, 5, 6])
    s.add_request(a)
    s.add_request(b)
    plan = s.schedule()
    out = runner.execute(plan)
    out.errors["a"] = "NaN in logits"
    finished = s.update(plan, out)
    assert finished == [a] and a.error == "NaN in logits" and a.status == RequestStatus.FINISHED_ERROR
    drain(s, runner)
    assert b.output_token_ids == reference_output([4, 5, 6], None, V, 8)


def test_prefix_cache_hits_are_counted_and_reused():
    s, runner = make(num_gpu_blocks=16, block_size=4)
    shared = list(range(12))
    first = req("first", shared + [50], max_tokens=2)
    s.add_request(first)
    drain(s, runner)
    second = req("second", shared + [60, 61], max_tokens=2)
    s.add_request(second)
    plan, _ = step(s, runner)
    assert plan.chunks[0].num_computed_tokens == 12 and plan.chunks[0].token_ids == [60, 61]
    assert second.num_cached_tokens == 12 and s.stats["prefix_cache_hits"] == 12
    assert s.stats["prefix_cache_queries"] == 13 + 14
    drain(s, runner)
    assert second.output_token_ids == reference_output(shared + [60, 61], None, V, 2)


def _check_group_sharing(caching: bool) -> None:
    s, runner = make(num_gpu_blocks=32, block_size=4, caching=caching)
    prompt = list(range(10))  # blocks: [0..3] [4..7] [8, 9]
    group = add_group(s, "g", prompt, n=3, max_tokens=5)
    plan, _ = step(s, runner)
    assert [(c.req_id, c.num_computed_tokens, len(c.token_ids)) for c in plan.chunks] == \
        [("g-0", 0, 9)]  # the leader prefills prompt[:-1] only
    plan, _ = step(s, runner)
    leader_table = s.kv.block_ids("g-0")
    assert [(c.req_id, c.num_computed_tokens, c.token_ids) for c in plan.chunks] == \
        [("g-0", 9, [9]), ("g-1", 9, [9]), ("g-2", 9, [9])]
    # full prompt blocks are shared by all three; the partial one is copied before the write
    assert [s.kv.pool.blocks[b].ref_cnt for b in leader_table[:2]] == [3, 3]
    assert plan.copy_blocks == [(leader_table[2], s.kv.block_ids("g-1")[2]),
                                (leader_table[2], s.kv.block_ids("g-2")[2])]
    for r in group[1:]:
        assert s.kv.block_ids(r.request_id)[:2] == leader_table[:2]
    assert s.kv.num_free_blocks == 32 - 5
    assert [r.num_cached_tokens for r in group] == [0, 9, 9]
    drain(s, runner)
    for r in group:
        assert r.output_token_ids == reference_output(prompt, r.seed, V, 5)
    assert len({tuple(r.output_token_ids) for r in group}) == 3  # the check sees each sample


def test_n_samples_share_prompt_blocks_with_prefix_caching():
    _check_group_sharing(caching=True)


def test_n_samples_share_prompt_blocks_without_prefix_caching():
    _check_group_sharing(caching=False)


def test_group_with_block_aligned_prompt_needs_no_copy():
    s, runner = make(num_gpu_blocks=32, block_size=4, caching=False)
    group = add_group(s, "g", list(range(9)), n=2, max_tokens=3)  # prompt[:-1] fills 2 blocks
    step(s, runner)
    plan, _ = step(s, runner)
    assert plan.copy_blocks == [] and len(plan.chunks) == 2
    drain(s, runner)
    for r in group:
        assert r.output_token_ids == reference_output(list(range(9)), r.seed, V, 3)


def test_rejected_request_is_returned_by_the_next_update():
    s, runner = make(max_model_len=8)
    bad = req("bad", list(range(9)))
    s.add_request(bad)
    assert s.has_unfinished_requests() and s.get_num_unfinished_requests() == 0
    plan, finished = step(s, runner)
    assert plan.is_empty and finished == [bad] and not s.has_unfinished_requests()
    assert bad.metrics.finished_time is not None and bad.metrics.first_scheduled_time is None


def test_stats_report_usage_and_queues():
    s, runner = make(num_gpu_blocks=10, block_size=4, max_num_seqs=1)
    s.add_request(req("a", list(range(8)), max_tokens=4))
    s.add_request(req("b", list(range(8)), max_tokens=4))
    step(s, runner)
    st = s.stats
    assert (st["num_running"], st["num_waiting"]) == (1, 1)
    assert abs(st["kv_cache_usage"] - 0.2) < 1e-9  # 8 prompt tokens -> 2 of 10 blocks
    assert set(st) >= {"num_preemptions", "num_swapped_out", "prefix_cache_queries",
                       "prefix_cache_hits"}


def test_a_prefix_computed_in_this_step_is_waited_for_not_computed_twice():
    """Two prompts sharing 3 full blocks arrive together: the second waits one step and then
    takes the 3 blocks from the cache instead of computing them again alongside the first."""
    from tests.core.driver import drain, make, req, step

    s, runner = make(num_gpu_blocks=32, block_size=4, max_num_batched_tokens=64)
    shared = list(range(100, 112))
    a, b = req("a", shared + [1, 2], t=0.0), req("b", shared + [3], t=1.0)
    s.add_request(a)
    s.add_request(b)
    plan, _ = step(s, runner)
    assert [c.req_id for c in plan.chunks] == ["a"]
    plan, _ = step(s, runner)
    chunk_b = next(c for c in plan.chunks if c.req_id == "b")
    assert chunk_b.num_computed_tokens == 12 and chunk_b.token_ids == [3]
    assert b.num_cached_tokens == 12
    drain(s, runner)
    # without caching nothing waits
    s, runner = make(num_gpu_blocks=32, block_size=4, max_num_batched_tokens=64, caching=False)
    s.add_request(req("a", shared + [1, 2], t=0.0))
    s.add_request(req("b", shared + [3], t=1.0))
    plan, _ = step(s, runner)
    assert [c.req_id for c in plan.chunks] == ["a", "b"]


def _decoding(s, runner, prompts: dict, max_tokens: dict) -> dict:
    """Requests added and stepped until every one is decoding (first token sampled)."""
    rs = {rid: req(rid, p, max_tokens=max_tokens[rid], t=float(i))
          for i, (rid, p) in enumerate(prompts.items())}
    for r in rs.values():
        s.add_request(r)
    while any(r.num_output_tokens == 0 for r in rs.values()):
        step(s, runner)
    return rs


def test_a_round_planned_ahead_continues_where_the_running_one_ends():
    s, runner = make(num_decode_steps=4, block_size=4, caching=False)
    rs = _decoding(s, runner, {"a": [1] * 6, "b": [2] * 9, "c": [3] * 3}, {"a": 20, "b": 4, "c": 7})
    first = s.schedule()
    assert first.num_steps == 4 and first.prev_rows is None
    steps = {c.req_id: c.num_steps for c in first.chunks}
    assert steps == {"a": 4, "b": 3, "c": 4}  # b has 3 tokens left: it ends within this round
    nxt = s.schedule()  # before first's results are back
    # b is gone from the next round; a and c go on from where `first` leaves them, fed by the
    # last token `first` samples for them (rows of `first`), with blocks for both rounds
    rows = {c.req_id: first.chunks[row].req_id for c, row in zip(nxt.chunks, nxt.prev_rows)}
    assert rows == {"a": "a", "c": "c"}
    for c in nxt.chunks:
        prev = next(p for p in first.chunks if p.req_id == c.req_id)
        assert c.num_computed_tokens == prev.num_computed_tokens + prev.num_steps
        assert c.token_ids == [-1]
        assert len(c.block_table) * 4 >= c.num_computed_tokens + c.num_steps
    assert {c.req_id: c.num_steps for c in nxt.chunks} == {"a": 4, "c": 2}  # c: 7 tokens in all
    # no results yet: the sampled tokens are placeholders
    assert rs["a"].num_output_tokens == 1 and rs["a"].num_output_placeholders == 8
    assert s.stats["num_chained_rounds"] == 1
    out = runner.launch(first)
    s.update(first, runner.collect(out))
    s.update(nxt, runner.collect(runner.launch(nxt, out)))
    check_invariants(s)
    assert rs["a"].num_output_tokens == 9 and rs["a"].num_output_placeholders == 0
    assert rs["b"].output_token_ids == reference_output([2] * 9, None, V, 4)
    assert rs["c"].output_token_ids == reference_output([3] * 3, None, V, 7)
    assert rs["a"].output_token_ids == reference_output([1] * 6, None, V, 20)[:9]


def test_a_waiting_request_that_fits_starts_in_a_step_planned_ahead():
    s, runner = make(num_decode_steps=4, block_size=4, max_num_seqs=4)
    rs = _decoding(s, runner, {"a": [1] * 6}, {"a": 30})
    first = s.schedule()
    assert first.num_steps == 4
    s.add_request(req("late", [5] * 5, max_tokens=3, t=9.0))
    # a round would keep `late` waiting: the next plan is an ordinary step instead, with a's
    # next token fed by `first` and late's whole prompt
    nxt = s.schedule()
    assert nxt.num_steps == 1 and [c.req_id for c in nxt.chunks] == ["a", "late"]
    a, late = nxt.chunks
    assert a.token_ids == [-1] and a.num_computed_tokens == 6 + 4 and a.sample
    assert late.token_ids == [5] * 5 and late.num_computed_tokens == 0 and late.sample
    assert nxt.prev_rows == [0, -1]
    assert [n.req_id for n in nxt.new_requests] == ["late"]
    assert s.stats["num_chained_steps"] == 1 and s.stats["num_chained_rounds"] == 0
    assert rs["a"].num_output_tokens == 1  # nothing applied yet


def test_a_step_planned_ahead_after_a_prefill_step():
    """After a step of prefill chunks: a request whose prompt ends there decodes next, fed by
    its sample; one cut by the budget continues with its next chunk; a request that the step
    ends by length is left out."""
    s, runner = make(block_size=4, caching=False, max_num_batched_tokens=10)
    for i, (p, n) in enumerate([([1] * 4, 5), ([2] * 3, 1), ([3] * 9, 5)]):
        s.add_request(req("abc"[i], p, max_tokens=n, t=float(i)))
    first = s.schedule()
    assert [(c.req_id, len(c.token_ids), c.sample) for c in first.chunks] == \
        [("a", 4, True), ("b", 3, True), ("c", 3, False)]
    nxt = s.schedule()
    # b has max_tokens=1: its one token comes from `first`, so it is gone
    got = [(c.req_id, c.token_ids, c.num_computed_tokens, c.sample) for c in nxt.chunks]
    assert got == [("a", [-1], 4, True), ("c", [3] * 6, 3, True)]
    assert nxt.prev_rows == [0, -1]  # a's token: row 0 of first's sampled rows (a, b)
    out = runner.launch(first)
    assert s.update(first, runner.collect(out))[0].request_id == "b"
    check_invariants(s)
    s.update(nxt, runner.collect(runner.launch(nxt, out)))
    check_invariants(s)
    assert s.requests["a"].num_output_tokens == 2 and s.requests["c"].num_output_tokens == 1


def test_a_long_prompt_takes_its_share_per_step_and_others_start_beside_it():
    """long_prefill_token_threshold: one long prompt computes at most that many tokens a step,
    so shorter prompts start (and decode) in the same steps instead of waiting for it."""
    s, runner = make(max_num_batched_tokens=64, long_prefill_token_threshold=16, caching=False)
    long = req("long", list(range(200)), max_tokens=2)
    s.add_request(long)
    shorts = [req(f"s{i}", [i + 1] * 5, max_tokens=3, t=1.0) for i in range(3)]
    for r in shorts:
        s.add_request(r)
    plan, _ = step(s, runner)
    assert [(c.req_id, len(c.token_ids)) for c in plan.chunks] == \
        [("long", 16), ("s0", 5), ("s1", 5), ("s2", 5)]
    done = drain(s, runner)
    assert all(done[r.request_id].num_output_tokens == 3 for r in shorts)
    assert long.output_token_ids == reference_output(list(range(200)), None, V, 2)
