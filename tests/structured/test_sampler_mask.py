"""The sampler's grammar mask: constrained rows never take a disallowed token, whatever the
sampling path; unconstrained rows sample exactly as without a mask."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from batchllm.runner.sampler import Sampler
from batchllm.sampling_params import SamplingParams
from batchllm.structured import GrammarBitmask

V = 40  # two mask words: the second one partly used


def _mask(allowed_rows: dict[str, list[int]]) -> GrammarBitmask:
    bits = np.zeros((len(allowed_rows), (V + 31) // 32), dtype=np.uint32)
    for i, toks in enumerate(allowed_rows.values()):
        for t in toks:
            bits[i, t // 32] |= np.uint32(1 << (t % 32))
    return GrammarBitmask(list(allowed_rows), bits.view(np.int32))


def _sampler(params: dict[str, SamplingParams]) -> Sampler:
    s = Sampler("cpu", V)
    for rid, p in params.items():
        s.add_request(rid, [1, 2], p, p.seed, 0)
    return s


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=1.0, seed=3),
                                dict(temperature=0.0, repetition_penalty=1.3),
                                dict(temperature=0.7, top_p=0.9, top_k=5, seed=1, logprobs=2)])
def test_constrained_rows_take_only_allowed_tokens(kw):
    ids = ["a", "b", "c"]
    gen = torch.Generator().manual_seed(0)
    allowed = {"a": [3, 35], "c": [39]}  # b is unconstrained
    for trial in range(20):
        logits = torch.randn(3, V, generator=gen) * 4
        plain = _sampler({r: SamplingParams(**kw) for r in ids})
        masked = _sampler({r: SamplingParams(**kw) for r in ids})
        masked.set_grammar(_mask(allowed))
        want = plain.sample(logits.clone(), ids)
        got = masked.sample(logits.clone(), ids)
        assert got.token_ids[0] in allowed["a"] and got.token_ids[2] == 39
        assert got.token_ids[1] == want.token_ids[1]  # the unconstrained row is untouched
        assert got.errors == {}
        if kw.get("temperature") == 0.0 and "repetition_penalty" not in kw:
            assert got.token_ids[0] == max(allowed["a"], key=lambda t: logits[0, t].item())
            # log p over the allowed tokens (what the constrained row was sampled from)
            lse = torch.logsumexp(logits[0, allowed["a"]], 0)
            assert got.logprobs[0] == pytest.approx((logits[0, got.token_ids[0]] - lse).item(),
                                                    abs=1e-5)


def test_a_mask_follows_its_rows_when_a_batch_is_split_and_ends_with_the_next_plan():
    s = _sampler({r: SamplingParams(temperature=0.0) for r in "abcd"})
    s.set_grammar(_mask({"b": [5], "d": [6]}))
    logits = torch.zeros(2, V)
    logits[:, 9] = 10.0
    assert s.sample(logits.clone(), ["a", "b"]).token_ids == [9, 5]
    assert s.sample(logits.clone(), ["c", "d"]).token_ids == [9, 6]
    s.set_grammar(None)
    assert s.sample(logits.clone(), ["c", "d"]).token_ids == [9, 9]


def test_a_row_that_allows_nothing_is_reported_not_sampled():
    s = _sampler({"a": SamplingParams(temperature=0.0), "b": SamplingParams(temperature=0.5)})
    s.set_grammar(_mask({"a": [], "b": []}))
    out = s.sample(torch.randn(2, V), ["a", "b"])
    assert set(out.errors) == {"a", "b"}
