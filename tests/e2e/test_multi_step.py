"""Multi-step decode (several decode steps per scheduling round) gives exactly the single-step outputs.

Every test runs twice: with rounds applied one at a time, and with async scheduling (the next
round planned and queued, fed by the previous round's last tokens, before the previous round's
results are applied). Single-step engines (steps=1) are the reference in both.
"""
from __future__ import annotations

import pytest

from batchllm import LLM, SamplingParams
from tests.e2e.test_generate import VOCAB, hf_greedy, make_prompts

ASYNC = {"on": False}


@pytest.fixture(autouse=True, params=[False, True], ids=["sync", "async"])
def async_rounds(request):
    ASYNC["on"] = request.param
    yield request.param
    ASYNC["on"] = False


def llm_for(model_dir, steps: int, **kw) -> LLM:
    return LLM(str(model_dir), dtype="float32", device="cpu", num_decode_steps=steps,
               async_scheduling=ASYNC["on"] and steps > 1, **kw)


def rounds_ok(llm: LLM) -> bool:
    """Multi-step rounds ran, and with async scheduling some were chained onto a running one."""
    stats = llm.stats()
    chained = stats["num_chained_rounds"] > 0 if ASYNC["on"] else stats["num_chained_rounds"] == 0
    return stats["num_multi_step_rounds"] > 0 and chained


def test_greedy_matches_hf_with_uneven_lengths(tiny_model_dir):
    prompts = make_prompts(VOCAB, [5, 17, 33, 8], seed=21)
    lengths = [3, 12, 7, 1]  # not multiples of the 4 steps: requests end mid-round
    want = [hf_greedy(tiny_model_dir, [p], n)[0] for p, n in zip(prompts, lengths)]
    llm = llm_for(tiny_model_dir, 4)
    outs = llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
                                  for n in lengths])
    assert [o.outputs[0].token_ids for o in outs] == want
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert rounds_ok(llm)


def test_model_length_limit_ends_mid_round(tiny_model_dir):
    prompt = make_prompts(VOCAB, [30], seed=22)[0]
    sp = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    one = llm_for(tiny_model_dir, 1, max_model_len=37).generate([prompt], sp)[0].outputs[0]
    many = llm_for(tiny_model_dir, 4, max_model_len=37).generate([prompt], sp)[0].outputs[0]
    assert len(one.token_ids) == 7 and many.token_ids == one.token_ids
    assert many.finish_reason == one.finish_reason == "length"


def test_sampling_logprobs_and_penalties_equal_single_step(tiny_model_dir):
    prompts = make_prompts(VOCAB, [6, 14, 9], seed=23)
    params = [SamplingParams(temperature=0.9, top_k=20, seed=3, max_tokens=11, ignore_eos=True,
                             logprobs=2),
              SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5,
                             max_tokens=9, ignore_eos=True, logprobs=0),
              SamplingParams(temperature=0.7, min_p=0.05, seed=8, max_tokens=13, min_tokens=5)]
    a = llm_for(tiny_model_dir, 1).generate(prompts, params)
    five = llm_for(tiny_model_dir, 5)
    b = five.generate(prompts, params)
    assert rounds_ok(five)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert x.outputs[0].token_logprobs == pytest.approx(y.outputs[0].token_logprobs, abs=1e-5)
        assert x.outputs[0].finish_reason == y.outputs[0].finish_reason


def test_stop_string_inside_a_round_cuts_tokens_and_text(tiny_model_dir):
    prompt = make_prompts(VOCAB, [6], seed=6)[0]
    full = llm_for(tiny_model_dir, 1).generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    stop = full.text[3:5]
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop], logprobs=0)
    one = llm_for(tiny_model_dir, 1).generate([prompt], sp)[0].outputs[0]
    eight = llm_for(tiny_model_dir, 8)
    many = eight.generate([prompt], sp)[0].outputs[0]
    assert rounds_ok(eight)
    assert many.text == one.text == full.text[:full.text.index(stop)]
    assert many.token_ids == one.token_ids and len(many.logprobs) == len(many.token_ids)
    assert many.finish_reason == "stop" and many.stop_reason == stop


def test_multi_step_under_cache_pressure_and_waiting_requests(tiny_model_dir):
    prompts = make_prompts(VOCAB, [5, 17, 33, 8, 40, 16, 3, 21], seed=24)
    sp = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    base = [o.outputs[0].token_ids for o in llm_for(tiny_model_dir, 1).generate(prompts, sp)]
    for mode in ("recompute", "swap"):
        llm = llm_for(tiny_model_dir, 4, block_size=4, num_gpu_blocks_override=24, max_num_seqs=3,
                      preemption_mode=mode, swap_space=0.01, max_num_batched_tokens=32)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, sp)] == base
        assert rounds_ok(llm) and llm.stats()["num_preemptions"] > 0


def test_parallel_samples_and_stop_token_mid_round(tiny_model_dir):
    prompt = make_prompts(VOCAB, [10], seed=25)[0]
    greedy = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    single = llm_for(tiny_model_dir, 1).generate([prompt], greedy)[0].outputs[0].token_ids
    four = llm_for(tiny_model_dir, 4, block_size=4)
    out = four.generate([prompt], SamplingParams(n=3, temperature=0.0, max_tokens=9,
                                                 ignore_eos=True))[0]
    assert [c.token_ids for c in out.outputs] == [single] * 3
    # a stop token sampled in the middle of a round ends the output right there
    stop_at = single[5]
    cut = four.generate([prompt], SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True,
                                                 stop_token_ids=[stop_at]))[0].outputs[0]
    assert cut.token_ids == single[:single.index(stop_at) + 1]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop_at
    assert rounds_ok(four)
