"""vLLM's sampling settings through LLM.generate on a tiny random model, against a direct HF
transformers computation: logit_bias, allowed_token_ids, bad_words, truncate_prompt_tokens and
prompt_logprobs (chunked prefill, prefix cache, n > 1, async scheduling, multi-step rounds)."""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.core.outputs import Logprob
from tests.e2e.test_generate import VOCAB, make_prompts


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def hf_greedy(hf, prompt: list[int], steps: int,
              edit: Callable[[torch.Tensor, list[int]], torch.Tensor]) -> list[int]:
    """Greedy decoding with HF's logits, each step's logits edited by edit(logits, outputs)."""
    ids, out = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].clone()
        t = int(edit(logits, out).argmax())
        out.append(t)
        ids.append(t)
    return out


def greedy(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 10, "ignore_eos": True, **kw})


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), dtype="float32", device="cpu")


def test_logit_bias_shifts_greedy_choices_as_hf_with_the_bias_added(llm, hf):
    prompts = make_prompts(VOCAB, [6, 11], seed=40)
    bias = {50: 3.0, 51: 2.5, 120: -100.0}
    plain = llm.generate(prompts, greedy())
    out = llm.generate(prompts, greedy(logit_bias={str(k): v for k, v in bias.items()}))

    def add(logits, _):
        for t, b in bias.items():
            logits[t] += b
        return logits

    for p, o, base in zip(prompts, out, plain):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 10, add)
        assert o.outputs[0].token_ids != base.outputs[0].token_ids  # the bias changed something
    # a bias above 100 is clamped to 100, as vLLM does
    assert SamplingParams(logit_bias={3: 250}).logit_bias == {3: 100.0}


def test_allowed_token_ids_restrict_greedy_and_sampled_tokens(llm, hf):
    prompt = make_prompts(VOCAB, [9], seed=41)[0]
    allowed = [30, 77, 150, 201]
    got = llm.generate([prompt], greedy(allowed_token_ids=allowed))[0].outputs[0].token_ids

    def only(logits, _):
        keep = torch.full_like(logits, float("-inf"))
        keep[allowed] = logits[allowed]
        return keep

    assert got == hf_greedy(hf, prompt, 10, only)
    # sampled rows beside unrestricted ones: only the allowed tokens, the others unaffected
    sp = SamplingParams(temperature=1.5, seed=5, max_tokens=30, ignore_eos=True,
                        allowed_token_ids=allowed)
    free = SamplingParams(temperature=1.5, seed=6, max_tokens=30, ignore_eos=True)
    a, b = llm.generate([prompt, prompt], [sp, free])
    assert set(a.outputs[0].token_ids) <= set(allowed) and len(set(a.outputs[0].token_ids)) > 1
    assert b.outputs[0].token_ids == llm.generate([prompt], free)[0].outputs[0].token_ids


@pytest.mark.parametrize("steps, async_", [(1, False), (4, True)])
def test_bad_words_ban_the_last_token_after_their_prefix(tiny_model_dir, hf, steps, async_):
    """"cat" tokenizes to c+at and (after a space) Ġc+at: `at` is banned right after c or Ġc,
    nowhere else; the bias makes the model want to write c, at and Ġc all the time. The same in
    multi-step rounds under async scheduling (the history of output tokens stays on the device)."""
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", num_decode_steps=steps,
              async_scheduling=async_)
    tok = llm.get_tokenizer()
    words = tok.bad_words_token_ids(["cat"])
    assert sorted(words) == sorted([tok.encode("cat", add_special_tokens=False),
                                    tok.encode(" cat", add_special_tokens=False)])
    (c, at), (space_c, _) = words
    bias = {c: 6.0, at: 9.0, space_c: 5.0}
    prompts = make_prompts(VOCAB, [7, 12], seed=42)

    def reference(logits, out):
        for t, b in bias.items():
            logits[t] += b
        for w in words:
            if out[-(len(w) - 1):] == w[:-1]:
                logits[w[-1]] = float("-inf")
        return logits

    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logit_bias=bias,
                        bad_words=["cat"])
    outs = llm.generate(prompts, sp)
    for p, o in zip(prompts, outs):
        got = o.outputs[0].token_ids
        assert got == hf_greedy(hf, p, 16, reference)
        pairs = list(zip(got, got[1:]))
        assert (c, at) not in pairs and (space_c, at) not in pairs
        assert at in got  # banned only after its prefix, not everywhere
    # a one-token bad word is never sampled
    single = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                                  logit_bias=bias, bad_words=["at"]))
    assert all(at not in o.outputs[0].token_ids for o in single)


def test_bad_settings_fail_only_their_request(llm):
    prompt = make_prompts(VOCAB, [5], seed=43)[0]
    outs = llm.generate([prompt] * 3, [greedy(logit_bias={99999: 1.0}),
                                       greedy(allowed_token_ids=[1, 5000]), greedy()])
    assert "logit_bias: token id 99999 is outside the vocabulary" in outs[0].error
    assert "allowed_token_ids: token id 5000" in outs[1].error
    assert outs[2].error is None and len(outs[2].outputs[0].token_ids) == 10


def test_truncate_prompt_tokens_keeps_the_last_k(llm):
    prompt = make_prompts(VOCAB, [30], seed=44)[0]
    cut = llm.generate([prompt], greedy(truncate_prompt_tokens=8))[0]
    tail = llm.generate([prompt[-8:]], greedy())[0]
    assert cut.prompt_token_ids == prompt[-8:]
    assert cut.outputs[0].token_ids == tail.outputs[0].token_ids
    whole = llm.generate([prompt], greedy(truncate_prompt_tokens=100))[0]
    assert whole.prompt_token_ids == prompt


def check_prompt_logprobs(hf, prompt: list[int], got: list, k: int) -> None:
    """vLLM's shape against HF: None first, then per token its Logprob and the top k by rank."""
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([prompt])).logits[0], dim=-1)
    assert len(got) == len(prompt) and got[0] is None
    for j in range(1, len(prompt)):
        row, step = logp[j - 1], got[j]
        t = prompt[j]
        assert list(step)[0] == t
        assert step[t].logprob == pytest.approx(row[t].item(), abs=1e-4)
        assert step[t].rank == int((row >= row[t]).sum())
        best = torch.topk(row, k)
        for r, (tid, lp) in enumerate(zip(best.indices.tolist(), best.values.tolist()), start=1):
            assert step[tid].rank == r and step[tid].logprob == pytest.approx(lp, abs=1e-4)
        assert set(step) == {t, *best.indices.tolist()}
        assert isinstance(step[t], Logprob) and step[t].decoded_token is not None


@pytest.mark.parametrize("async_", [False, True])
def test_prompt_logprobs_equal_hf_with_chunks_cache_and_samples(tiny_model_dir, hf, async_):
    """A 40-token prompt in 16-token chunks, after a request with the same prompt filled the
    prefix cache (its blocks are not reused: every position is scored), and with n = 2."""
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", block_size=4,
              max_num_batched_tokens=16, enable_prefix_caching=True, async_scheduling=async_)
    prompt, other = make_prompts(VOCAB, [40, 23], seed=45)
    llm.generate([prompt], greedy())  # caches the prompt's blocks
    outs = llm.generate([prompt, other], [greedy(prompt_logprobs=2),
                                          SamplingParams(n=2, temperature=1.0, seed=2, max_tokens=5,
                                                         prompt_logprobs=0)])
    check_prompt_logprobs(hf, prompt, outs[0].prompt_logprobs, 2)
    check_prompt_logprobs(hf, other, outs[1].prompt_logprobs, 0)
    assert len(outs[1].outputs) == 2
    # without the setting: none, and the cache is used again
    plain = llm.generate([prompt], greedy())[0]
    assert plain.prompt_logprobs is None and plain.num_cached_tokens > 0


def test_prompt_logprobs_survive_preemption(tiny_model_dir, hf):
    prompts = make_prompts(VOCAB, [30, 26, 33], seed=46)
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", block_size=4,
              num_gpu_blocks_override=20, preemption_mode="recompute", max_num_batched_tokens=32)
    outs = llm.generate(prompts, greedy(prompt_logprobs=1, max_tokens=24))
    assert llm.stats()["num_preemptions"] > 0
    for p, o in zip(prompts, outs):
        check_prompt_logprobs(hf, p, o.prompt_logprobs, 1)
