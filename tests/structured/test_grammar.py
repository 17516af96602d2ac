"""Grammars compiled once per distinct constraint; per-request matchers advanced by kept tokens;
a plan's bitmask allows exactly what the grammar allows next (fast: the tiny tokenizer)."""
from __future__ import annotations

import pytest

from batchllm.core.outputs import ScheduledChunk, SchedulerOutput
from batchllm.core.request import Request
from batchllm.sampling_params import SamplingParams, StructuredOutputsParams as SO
from batchllm.structured import StructuredOutputError
from batchllm.structured.bitmask import allowed
from tests.tiny_models import build_tokenizer

pytest.importorskip("llguidance")
from batchllm.structured.matchers import StructuredOutputs  # noqa: E402

VOCAB = 300


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _req(rid: str, so: SO) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(structured_outputs=so), 0.0, eos_token_id=2)


def _plan(*rids: str) -> SchedulerOutput:
    return SchedulerOutput(chunks=[ScheduledChunk(r, [5], 3, [0], True) for r in rids])


def test_each_constraint_compiles_once_and_bad_ones_fail_every_time(tok):
    so = StructuredOutputs(tok, VOCAB, [2])
    for i in range(3):
        so.add([_req(f"a{i}", SO(json={"type": "object"}))], SO(json={"type": "object"}))
    so.add([_req("b", SO(json_object=True))], SO(json_object=True))
    assert so.grammars.num_compiled == 2
    for _ in range(2):
        with pytest.raises(StructuredOutputError, match="invalid regex"):
            so.add([_req("c", SO(regex="(x"))], SO(regex="(x"))
    assert so.grammars.num_compiled == 3


def test_masks_follow_each_matcher_and_a_complete_grammar_ends_the_request(tok):
    so = StructuredOutputs(tok, VOCAB, [2])
    a, b, u = _req("a", SO(choice=["cat", "dog"])), _req("b", SO(regex="[0-9]{2}")), _req("u", SO(regex="x"))
    so.add([a], a.sampling_params.structured_outputs)
    so.add([b], b.sampling_params.structured_outputs)
    so.add([u], u.sampling_params.structured_outputs)
    mask = so.bitmask(_plan("a", "z", "b"))  # z: unconstrained; u: not in this plan
    assert mask.req_ids == ["a", "b"] and mask.bitmask.shape == (2, (VOCAB + 31) // 32)
    c, d, seven = tok.encode("c", add_special_tokens=False)[0], tok.encode("d", add_special_tokens=False)[0], \
        tok.encode("7", add_special_tokens=False)[0]
    assert allowed(mask.bitmask[0], c) and allowed(mask.bitmask[0], d)
    assert not allowed(mask.bitmask[0], seven) and not allowed(mask.bitmask[0], 2)
    assert allowed(mask.bitmask[1], seven) and not allowed(mask.bitmask[1], c)
    assert not any(allowed(mask.bitmask[1], t) for t in range(274, VOCAB))  # beyond the tokenizer
    b.extend_output_tokens([seven])
    assert so.advance(["a", "b"]) == ([], [])
    b.extend_output_tokens([seven])
    assert so.advance(["b"]) == ([b], [])  # "77": nothing may follow
    assert so.valid("b") is True and so.valid("b", 1) is False  # a stop string kept only "7"
    a.extend_output_tokens([seven])  # a token the grammar does not allow
    complete, refused = so.advance(["a"])
    assert refused == [a] and "does not fit the grammar" in a.error
    assert so.valid("u") is False and so.valid("nobody") is None  # u: nothing generated yet
    for rid in ("a", "b", "u"):
        so.release(rid)
    assert not so.active and so.bitmask(_plan("a", "b")) is None
