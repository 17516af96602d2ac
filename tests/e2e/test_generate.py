"""End to end through LLM.generate on tiny random models: greedy parity with HF, preemption, prefix cache."""
from __future__ import annotations

import pytest
import torch

from batchllm import LLM, SamplingParams


def hf_greedy(model_dir, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                            min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        outs.append(y[0, len(ids):].tolist())
    return outs


def make_prompts(vocab: int, lengths: list[int], seed: int = 0, shared: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(10, vocab, (shared,), generator=g).tolist()
    return [prefix + torch.randint(10, vocab, (n,), generator=g).tolist() for n in lengths]


VOCAB = 250  # below the tiny tokenizer's vocabulary (274)
# min_tokens masks EOS as HF generate(min_new_tokens=...) does
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    prompts = make_prompts(VOCAB, [5, 17, 33, 8, 40, 16], shared=0)
    return prompts, hf_greedy(tiny_model_dir, prompts, GREEDY.max_tokens)


def test_greedy_matches_hf_generate(tiny_model_dir, reference):
    prompts, expected = reference
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", max_num_batched_tokens=64)
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


@pytest.mark.parametrize("mode", ["recompute", "swap", "auto"])
def test_preemption_keeps_greedy_outputs(tiny_model_dir, reference, mode):
    prompts, expected = reference
    # 10 blocks of 4 tokens cannot hold six requests of up to 52 tokens: preemption is forced.
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", block_size=4,
              num_gpu_blocks_override=16, preemption_mode=mode, swap_space=0.01,
              max_num_batched_tokens=32, enable_prefix_caching=False)
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.stats()["num_preemptions"] > 0


def test_prefix_cache_hits_keep_outputs(tiny_model_dir):
    prompts = make_prompts(VOCAB, [3, 9, 5, 12], seed=1, shared=40)
    expected = hf_greedy(tiny_model_dir, prompts, GREEDY.max_tokens)
    for caching in (True, False):
        llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", block_size=8,
                  enable_prefix_caching=caching, max_num_seqs=1)
        outs = llm.generate(prompts, GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == expected
        hits = llm.stats()["prefix_cache_hits"]
        if caching:
            # the 40 shared tokens are 5 full blocks of 8; three later prompts reuse them
            assert hits >= 3 * 40
            assert all(o.num_cached_tokens >= 40 for o in outs[1:])
        else:
            assert hits == 0


def test_seeded_sampling_independent_of_batch(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu")
    prompts = make_prompts(VOCAB, [7, 11, 13], seed=2)
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate([prompts[0]], sp)[0].outputs[0].token_ids
    crowd = llm.generate(prompts, [sp, SamplingParams(temperature=0.8, max_tokens=10),
                                   SamplingParams(temperature=1.2, seed=5, max_tokens=10)])
    assert crowd[0].outputs[0].token_ids == alone


def test_n_samples_share_prompt_and_differ(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", block_size=4)
    prompt = make_prompts(VOCAB, [10], seed=3)[0]  # 10 tokens: the last block is partly filled
    out = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8,
                                                ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    # greedy n=3: every sample equals the single greedy answer
    g = llm.generate([prompt], SamplingParams(n=3, temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    single = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    assert all(c.token_ids == single.outputs[0].token_ids for c in g.outputs)


def test_logprobs_equal_hf_log_softmax(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    prompt = make_prompts(VOCAB, [9], seed=4)[0]
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu")
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True,
                                                logprobs=3))[0].outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits[0].float(), dim=-1)
    n = len(prompt)
    want = [logp[n - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.token_logprobs == pytest.approx(want, abs=1e-4)
    assert out.cumulative_logprob == pytest.approx(sum(want), abs=1e-3)
    tok = llm.get_tokenizer()
    for i, (t, step) in enumerate(zip(out.token_ids, out.logprobs)):
        best = torch.topk(logp[n - 1 + i], 3)
        assert list(step)[0] == t  # vLLM's order: the sampled token, then the top 3 by rank
        assert set(step) == {t, *best.indices.tolist()}
        for r, (tid, lp) in enumerate(zip(best.indices.tolist(), best.values.tolist()), start=1):
            assert step[tid].rank == r and step[tid].logprob == pytest.approx(lp, abs=1e-4)
        # greedy: the sampled token is the most likely; its rank counts every token at least as likely
        assert step[t].rank == int((logp[n - 1 + i] >= logp[n - 1 + i, t]).sum()) == 1
        assert all(x.decoded_token == tok.decode([tid], skip_special_tokens=False)
                   for tid, x in step.items())


def test_sampled_token_rank_among_all_tokens(tiny_model_dir):
    """A sampled (temperature 2) token is often not the most likely: its rank is how many tokens
    are at least as likely, as HF's log-softmax orders them (not its place in the top k)."""
    from transformers import AutoModelForCausalLM

    prompt = make_prompts(VOCAB, [7], seed=12)[0]
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu")
    out = llm.generate([prompt], SamplingParams(temperature=2.0, seed=3, max_tokens=12,
                                                ignore_eos=True, logprobs=1))[0].outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([prompt + out.token_ids])).logits[0], dim=-1)
    n = len(prompt)
    ranks = [out.logprobs[i][t].rank for i, t in enumerate(out.token_ids)]
    want = [int((logp[n - 1 + i] >= logp[n - 1 + i, t]).sum()) for i, t in enumerate(out.token_ids)]
    assert ranks == want and max(ranks) > 2  # some sampled token was far from the top


def test_row_errors_do_not_stop_the_engine(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", max_model_len=64)
    good = make_prompts(VOCAB, [5], seed=5)[0]
    outs = llm.generate([good, [], [1, 2, 99999], list(range(10, 80)), good], GREEDY)
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) == 12
    assert "empty" in outs[1].error
    assert "99999" in outs[2].error
    assert outs[3].error is not None and outs[3].outputs[0].finish_reason == "error"
    assert outs[4].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_stop_strings_are_cut_from_text(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu")
    prompt = make_prompts(VOCAB, [6], seed=6)[0]
    full = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0]
    text = full.outputs[0].text
    assert len(text) > 4
    stop = text[2:4]
    cut = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                                stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[:text.index(stop)]
