"""batchllm.runner.sampler: greedy, random sampling and its filters, penalties, min_tokens, seeds, NaN rows."""
from __future__ import annotations

import math

import pytest
import torch

from batchllm.runner.sampler import Sampler
from batchllm.sampling_params import SamplingParams

V = 8
EOS = 7


def _sampler(**requests: dict) -> Sampler:
    s = Sampler("cpu", V)
    for req_id, kw in requests.items():
        prompt = kw.pop("prompt", [0])
        seed = kw.get("seed")
        s.add_request(req_id, prompt, SamplingParams(**kw), seed, EOS)
    return s


def _row(*values: float) -> torch.Tensor:
    return torch.tensor([list(values) + [-5.0] * (V - len(values))])


def test_greedy_takes_argmax_and_reports_its_logprob():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    s = _sampler(a=dict(temperature=0), b=dict(temperature=0), c=dict(temperature=0))
    out = s.sample(logits, ["a", "b", "c"])
    assert out.token_ids == logits.argmax(-1).tolist()
    expected = [math.log(torch.softmax(logits[i], 0)[t].item()) for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(expected, abs=1e-5)
    assert out.top_logprobs is None and out.errors == {}


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_random_sampling_follows_softmax_of_logits_over_temperature(temperature):
    n = 4000
    base = torch.tensor([1.0, 0.5, 0.0, -1.0] + [-30.0] * (V - 4))
    s = Sampler("cpu", V)
    ids = [f"r{i}" for i in range(n)]
    for r in ids:
        s.add_request(r, [0], SamplingParams(temperature=temperature), None, EOS)
    torch.manual_seed(1)
    tokens = torch.tensor(s.sample(base.expand(n, V).clone(), ids).token_ids)
    freq = torch.bincount(tokens, minlength=V).float() / n
    expected = torch.softmax(base / temperature, 0)
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


@pytest.mark.parametrize("kw, allowed", [
    (dict(top_k=2), {0, 1}),
    (dict(top_p=0.6), {0, 1}),  # probs 0.5, 0.3, …: 0.5 alone does not reach 0.6
    (dict(min_p=0.5), {0, 1}),  # keep p >= 0.5 * 0.5
    (dict(top_k=0, top_p=1.0), set(range(4))),
])
def test_filters_keep_only_the_allowed_tokens(kw, allowed):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [1e-12] * (V - 4))
    n = 600
    s = Sampler("cpu", V)
    ids = [f"r{i}" for i in range(n)]
    for r in ids:
        s.add_request(r, [0], SamplingParams(**kw), None, EOS)
    torch.manual_seed(2)
    seen = set(s.sample(probs.log().expand(n, V).clone(), ids).token_ids)
    assert seen == allowed


def test_seeded_request_draws_the_same_tokens_whatever_the_batch():
    logits = torch.zeros(1, V)  # uniform: every token equally likely, so only the noise decides
    alone = _sampler(x=dict(seed=7))
    crowd = _sampler(a=dict(), x=dict(seed=7), b=dict(seed=3))
    other_seed = _sampler(x=dict(seed=8))
    seq_alone, seq_crowd, seq_other = [], [], []
    for _ in range(12):
        seq_alone += alone.sample(logits, ["x"]).token_ids
        seq_crowd.append(crowd.sample(logits.expand(3, V).clone(), ["a", "x", "b"]).token_ids[1])
        seq_other += other_seed.sample(logits, ["x"]).token_ids
    assert seq_alone == seq_crowd
    assert seq_alone != seq_other


def test_nan_logits_fail_only_their_request():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(3))
    logits[0, 2] = float("nan")
    s = _sampler(bad=dict(temperature=0), good=dict(temperature=0))
    out = s.sample(logits, ["bad", "good"])
    assert set(out.errors) == {"bad"} and "NaN" in out.errors["bad"]
    assert out.token_ids[1] == logits[1].argmax().item()


def test_repetition_penalty_covers_prompt_tokens():
    s = _sampler(a=dict(temperature=0, repetition_penalty=2.0, prompt=[0]))
    assert s.sample(_row(2.0, 1.5), ["a"]).token_ids == [1]  # 2.0 / 2 = 1.0 < 1.5


def test_frequency_and_presence_penalties_count_the_samplers_own_outputs():
    s = _sampler(f=dict(temperature=0, frequency_penalty=0.3, prompt=[5]),
                 p=dict(temperature=0, presence_penalty=0.3, prompt=[5]))
    logits = _row(2.0, 1.5).expand(2, V).clone()
    seqs = [s.sample(logits, ["f", "p"]).token_ids for _ in range(4)]
    # frequency: 2.0 -> 1.7 -> 1.4 < 1.5, so 0, 0, then 1 (1.5 -> 1.2), then 0 (1.4 > 1.2)
    assert [t[0] for t in seqs] == [0, 0, 1, 0]
    # presence: 0 drops once to 1.7 and stays above 1.5
    assert [t[1] for t in seqs] == [0, 0, 0, 0]


def test_min_tokens_masks_eos_and_stop_tokens():
    s = _sampler(a=dict(temperature=0, min_tokens=2, stop_token_ids=[6]))
    logits = _row(0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 3.0, 4.0)  # eos (7) best, stop id 6 next
    tokens = [s.sample(logits, ["a"]).token_ids[0] for _ in range(3)]
    assert tokens == [1, 1, EOS]


def test_top_logprobs_for_rows_that_ask():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(4))
    s = _sampler(a=dict(temperature=0, logprobs=2), b=dict(temperature=0))
    out = s.sample(logits, ["a", "b"])
    ref = torch.log_softmax(logits[0], 0)
    top2 = ref.topk(2)
    assert list(out.top_logprobs[0]) == top2.indices.tolist()
    assert list(out.top_logprobs[0].values()) == pytest.approx(top2.values.tolist(), abs=1e-5)
    assert out.top_logprobs[1] == {}


def test_a_reused_penalty_slot_starts_clean():
    s = _sampler(a=dict(temperature=0, frequency_penalty=2.0, prompt=[5]))
    for _ in range(3):
        s.sample(_row(2.0, 1.5), ["a"])
    s.remove_request("a")
    s.add_request("b", [5], SamplingParams(temperature=0, frequency_penalty=2.0), None, EOS)
    assert s.sample(_row(2.0, 1.5), ["b"]).token_ids == [0]
    assert s.num_requests == 1


@pytest.mark.parametrize("kw", [
    dict(temperature=0),  # the greedy fast path, which reads bf16 logits as they are
    dict(temperature=0, logprobs=3),  # fast path plus top log-probs
    dict(temperature=1.0, top_p=0.9, seed=5),  # random sampling
    dict(temperature=0, repetition_penalty=1.5, prompt=[1, 2]),  # penalties
])
def test_bfloat16_logits_sample_like_the_same_values_in_float32(kw):
    logits = (torch.randn(3, V, generator=torch.Generator().manual_seed(6)) * 3).to(torch.bfloat16)
    logits[1, 2] = float("nan")
    logits[2, [1, 4]] = logits[2].max() + 1  # a tie: the first index wins
    ids = ["a", "b", "c"]
    half, full = (_sampler(**{r: dict(kw) for r in ids}) for _ in range(2))
    for _ in range(2):  # the second step sees the penalties of the first
        got, exp = half.sample(logits, ids), full.sample(logits.float(), ids)
        assert got.token_ids == exp.token_ids
        assert got.logprobs == pytest.approx(exp.logprobs, abs=1e-5, nan_ok=True)
        assert got.errors == exp.errors and set(got.errors) == {"b"}
        if kw.get("logprobs"):
            assert [list(t) for t in got.top_logprobs] == [list(t) for t in exp.top_logprobs]
            for g, e in zip(got.top_logprobs, exp.top_logprobs):
                assert list(g.values()) == pytest.approx(list(e.values()), abs=1e-5, nan_ok=True)
        else:
            assert got.top_logprobs is None and exp.top_logprobs is None
    if kw["temperature"] == 0 and "repetition_penalty" not in kw:
        assert got.token_ids[2] == 1
