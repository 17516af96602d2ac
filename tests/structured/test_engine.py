"""Structured output through the engine with a tiny random model (fast): outputs match their
constraint exactly, equal the same request run alone under async scheduling and multi-step
rounds, stop by length honestly, and bad constraints become error outputs."""
from __future__ import annotations

import json
import re

import pytest

from batchllm import LLM, SamplingParams
from batchllm.sampling_params import StructuredOutputsParams as SO

pytest.importorskip("llguidance")

PROMPTS = ["the cat sat", "on the mat in", "a b c d e", "there were seven", "hello there",
           "in the end", "the rain", "cats and the"]
SCHEMA = {"type": "object", "properties": {
    "mood": {"enum": ["calm", "angry", "sad"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2}},
    "required": ["mood", "n", "tags"], "additionalProperties": False}


def llm(model_dir, asynchronous: bool = False, steps: int = 1, **kw) -> LLM:
    return LLM(str(model_dir), dtype="float32", device="cpu", num_decode_steps=steps,
               async_scheduling=asynchronous, num_gpu_blocks_override=96, **kw)


def constraints() -> list[SamplingParams]:
    kinds = [SO(regex=r"[0-9]{3}-[a-z]{2}"), SO(choice=["yes", "no", "maybe so"]), None,
             SO(json=SCHEMA), SO(regex=r"(ab|cd){1,3}!"), None, SO(json=json.dumps(SCHEMA)),
             SO(grammar='start: "x" NUM\nNUM: /[0-9]{2}/')]
    return [SamplingParams(temperature=0.0, max_tokens=80 if k else 24, structured_outputs=k)
            for k in kinds]


def check(params: SamplingParams, text: str) -> None:
    so = params.structured_outputs
    if so.regex is not None:
        assert re.fullmatch(so.regex, text), text
    elif so.choice is not None:
        assert text in so.choice
    elif so.json is not None:
        value = json.loads(text)
        assert value["mood"] in ("calm", "angry", "sad") and 0 <= value["n"] <= 99
        assert set(value) == {"mood", "n", "tags"} and len(value["tags"]) <= 2
    else:
        assert re.fullmatch(r"x[0-9]{2}", text), text


def test_outputs_match_their_constraint_and_equal_the_request_run_alone(tiny_model_dir):
    params = constraints()
    alone = llm(tiny_model_dir)
    want = [alone.generate([p], [sp])[0].outputs[0] for p, sp in zip(PROMPTS, params)]
    for w, sp in zip(want, params):
        if sp.structured_outputs is None:
            assert w.structured_output_valid is None
            continue
        assert w.finish_reason == "stop" and w.structured_output_valid is True, w
        check(sp, w.text)
    for asynchronous, steps in [(True, 1), (False, 4), (True, 4)]:
        engine = llm(tiny_model_dir, asynchronous, steps, max_num_seqs=5)
        got = engine.generate(PROMPTS, params)
        for w, g in zip(want, got):
            c = g.outputs[0]
            assert (c.token_ids, c.text, c.finish_reason, c.structured_output_valid) == \
                (w.token_ids, w.text, w.finish_reason, w.structured_output_valid), (asynchronous, steps)
        if steps > 1:
            assert engine.stats()["num_multi_step_rounds"] > 0  # the unconstrained rows' rounds
        assert engine.engine.structured is not None and not engine.engine.structured.active


def test_each_of_n_samples_follows_the_grammar(tiny_model_dir):
    sp = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=16,
                        structured_outputs=SO(regex=r"[a-c]{4}"))
    out = llm(tiny_model_dir, True, 4).generate(["the cat"], sp)[0]
    assert len(out.outputs) == 3
    for c in out.outputs:
        assert re.fullmatch(r"[a-c]{4}", c.text) and c.structured_output_valid


def test_length_before_the_grammar_completes_is_not_valid(tiny_model_dir):
    sp = SamplingParams(temperature=0.0, max_tokens=4, structured_outputs=SO(regex=r"[a-z]{30}"))
    c = llm(tiny_model_dir).generate(["the cat"], sp)[0].outputs[0]
    assert c.finish_reason == "length" and c.structured_output_valid is False
    assert len(c.token_ids) == 4 and re.fullmatch(r"[a-z]+", c.text)


def test_bad_constraints_are_error_outputs_naming_the_problem(tiny_model_dir):
    bad = {"a(b": SO(regex="a(b"), "Unimplemented keys": SO(json={"not": {"type": "string"}}),
           "not valid JSON": SO(json="{not json"), "invalid grammar": SO(grammar="start: foo")}
    params = [SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=so)
              for so in bad.values()] + [SamplingParams(temperature=0.0, max_tokens=8)]
    outs = llm(tiny_model_dir, True, 4).generate(PROMPTS[:5], params)
    for out, needle in zip(outs, bad):
        assert out.error is not None and needle in out.error, out.error
        assert out.outputs[0].finish_reason == "error"
    assert outs[-1].error is None and len(outs[-1].outputs[0].token_ids) == 8


def test_without_the_grammar_library_a_constrained_request_says_how_to_install_it(
        tiny_model_dir, monkeypatch):
    from batchllm.structured import grammar

    monkeypatch.setattr(grammar, "available", lambda: False)
    sp = [SamplingParams(temperature=0.0, max_tokens=4, structured_outputs=SO(choice=["a"])),
          SamplingParams(temperature=0.0, max_tokens=4)]
    outs = llm(tiny_model_dir).generate(PROMPTS[:2], sp)
    assert "pip install 'batchllm[structured]'" in outs[0].error
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) == 4
