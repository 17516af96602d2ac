"""The sampler's vLLM settings on random logits: logit_bias, allowed_token_ids, bad words (device
history, multi-step rounds), log-probs before them, ranks of sampled tokens, rows that ask nothing."""
from __future__ import annotations

import pytest
import torch

from batchllm.runner.sampler import Sampler
from batchllm.sampling_params import SamplingParams

V = 16
EOS = 15


def sampler(**requests: SamplingParams) -> Sampler:
    s = Sampler("cpu", V)
    for req_id, params in requests.items():
        s.add_request(req_id, [1, 2], params, params.seed, EOS)
    return s


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_logit_bias_and_allowed_tokens_edit_only_their_rows_and_keep_raw_logprobs():
    x = logits(3)
    bias = {int(x[0].argmin()): 50.0}
    allowed = [3, 9]
    s = sampler(a=SamplingParams(temperature=0, logit_bias=bias),
                b=SamplingParams(temperature=0, allowed_token_ids=allowed),
                c=SamplingParams(temperature=0))
    out = s.sample(x.clone(), ["a", "b", "c"])
    assert out.token_ids[0] == int(x[0].argmin())  # the least likely token, lifted by 50
    assert out.token_ids[1] == allowed[int(x[1, allowed].argmax())]
    assert out.token_ids[2] == int(x[2].argmax())  # untouched row
    # log-probs are the model's (vLLM's raw logprobs), before the bias and the mask
    raw = torch.log_softmax(x, dim=-1)
    assert out.logprobs == pytest.approx([raw[i, t].item() for i, t in enumerate(out.token_ids)],
                                         abs=1e-5)


def test_bad_words_ban_the_last_token_after_their_prefix_only():
    """Word [4, 7, 9]: 9 is banned right after 4, 7 among the outputs; word [5]: always."""
    words = [[4, 7, 9], [5]]
    params = SamplingParams(temperature=0).with_overrides(bad_words=["w"],
                                                          _bad_words_token_ids=words)
    s = sampler(r=params)

    def step(favourite: int) -> int:
        row = torch.zeros(1, V)
        row[0, favourite] = 10.0
        row[0, 12] = 5.0  # the runner-up
        return s.sample(row, ["r"]).token_ids[0]

    assert [step(9), step(5), step(4), step(7), step(9), step(9)] == [9, 12, 4, 7, 12, 9]


def test_inactive_round_steps_do_not_enter_the_bad_word_history():
    words = [[4, 9]]
    params = SamplingParams(temperature=0).with_overrides(bad_words=["w"],
                                                          _bad_words_token_ids=words)
    s = sampler(r=params, other=SamplingParams(temperature=0))
    four = torch.zeros(2, V)
    four[:, 4] = 10.0
    nine = torch.zeros(2, V)
    nine[:, 9] = 10.0
    s.sample_on_device(nine.clone(), ["r", "other"])
    # a later sub-step of a round in which r is done: its 4 does not count
    s.sample_on_device(four.clone(), ["r", "other"], active=[False, True])
    assert s.sample(nine.clone(), ["r", "other"]).token_ids == [9, 9]
    s.sample_on_device(four.clone(), ["r", "other"])
    assert s.sample(nine.clone(), ["r", "other"]).token_ids[0] != 9


def test_out_of_vocabulary_ids_are_named():
    s = Sampler("cpu", V)
    with pytest.raises(ValueError, match="logit_bias: token id 99"):
        s.add_request("a", [1], SamplingParams(logit_bias={99: 1.0}), None, EOS)
    with pytest.raises(ValueError, match="allowed_token_ids: token id 16"):
        s.add_request("b", [1], SamplingParams(allowed_token_ids=[1, 16]), None, EOS)
    assert s.num_requests == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.0, 2.0])
def test_rank_counts_the_tokens_at_least_as_likely(dtype, temperature):
    n = 64
    x = logits(n, seed=3).to(dtype)
    x[:, 0] = x[:, 1]  # a tie: both tokens get the worse rank
    ids = [f"r{i}" for i in range(n)]
    s = Sampler("cpu", V)
    for i, r in enumerate(ids):
        s.add_request(r, [1], SamplingParams(temperature=temperature, seed=i, logprobs=2), i, EOS)
    out = s.sample(x.clone(), ids)
    raw = torch.log_softmax(x.float(), dim=-1)
    want = [int((raw[i] >= raw[i, t]).sum()) for i, t in enumerate(out.token_ids)]
    assert out.ranks == want
    if temperature:
        assert max(out.ranks) > 3  # sampled tokens are not all the top ones


def test_rows_that_ask_for_nothing_skip_ranks_and_constraints():
    s = sampler(a=SamplingParams(temperature=0), b=SamplingParams(temperature=0.5, seed=1))
    d = s.sample_on_device(logits(2), ["a", "b"])
    assert d.ranks is None and d.top is None
    s.add_request("c", [1], SamplingParams(temperature=0, logprobs=0), None, EOS)
    assert s.sample_on_device(logits(3), ["a", "b", "c"]).ranks is not None
    s.remove_request("c")
    assert s.sample_on_device(logits(2), ["a", "b"]).ranks is None
