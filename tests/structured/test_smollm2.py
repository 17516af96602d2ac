"""Structured output with the real default model (SmolLM2-135M, CPU): a job whose 50 JSON rows
all validate against their own schema, exact choice / regex rows, error rows for bad
constraints, batch independence under async scheduling and rounds, OpenAI response_format."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from batchllm import LLM, SamplingParams
from batchllm.jobs import run_job
from batchllm.sampling_params import StructuredOutputsParams as SO
from tests.jobs.helpers import committed, write_jsonl

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")
pytestmark = pytest.mark.slow

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "address"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "address": {"type": "object", "additionalProperties": False,
                                     "required": ["city", "country"],
                                     "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "country": {"enum": ["FR", "DE", "US", "JP"]}}}}}
REVIEW = {"type": "object", "additionalProperties": False,
          "required": ["sentiment", "score", "keywords"],
          "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                         "score": {"type": "number", "minimum": 0, "maximum": 1},
                         "keywords": {"type": "array", "minItems": 1, "maxItems": 3,
                                      "items": {"type": "string", "maxLength": 16}}}}
ORDER = {"type": "object", "additionalProperties": False, "required": ["items", "express"],
         "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
             "type": "object", "additionalProperties": False, "required": ["sku", "qty"],
             "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                            "qty": {"type": "integer", "minimum": 1, "maximum": 50}}}},
             "express": {"type": "boolean"}}}
SCHEMAS = [PERSON, REVIEW, ORDER]
TOPICS = ["a French chef", "a hotel stay", "office supplies", "a German engineer",
          "a phone", "garden tools", "a pilot from Japan", "a pizza", "books"]


def _rows() -> tuple[list[dict], dict[str, object]]:
    rows, expect = [], {}
    for i in range(50):
        schema = SCHEMAS[i % 3]
        what = ["a person", "a review", "an order"][i % 3]
        rows.append({"id": f"j{i}", "prompt": f"Write {what} about {TOPICS[i % 9]} as JSON.",
                     "schema": json.dumps(schema) if i % 2 else schema})
        expect[f"j{i}"] = schema
    rows += [{"id": "c0", "prompt": "Is Paris in France? Answer yes or no.",
              "schema": {"choice": ["yes", "no"]}},
             {"id": "c1", "prompt": "Pick a color.", "schema": {"choice": ["red", "green", "blue"]}},
             {"id": "r0", "prompt": "Give a date.", "schema": {"regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}},
             {"id": "r1", "prompt": "A phone number?", "schema": json.dumps({"regex": r"\+33 [0-9]{9}"})},
             {"id": "plain", "prompt": "Say hi.", "schema": None},
             {"id": "short", "prompt": "Write a person as JSON.", "schema": PERSON, "max_tokens": 6},
             {"id": "bad-regex", "prompt": "x", "schema": {"regex": "[0-9"}},
             {"id": "bad-feature", "prompt": "x", "schema": {"type": "string", "not": {"const": "a"}}},
             {"id": "bad-type", "prompt": "x", "schema": {"type": "strnig"}},
             {"id": "not-json", "prompt": "x", "schema": "{type: object"}]
    return rows, expect


def test_a_job_over_50_rows_with_three_schemas_validates_every_output(smollm2_dir, tmp_path: Path):
    rows, expect = _rows()
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    spec = {"model": str(smollm2_dir), "input": {"path": str(src), "id_column": "id",
                                                 "system_prompt": "You answer in JSON.",
                                                 "structured_output_column": "schema"},
            "output": {"path": str(tmp_path / "out")},
            "sampling": {"max_tokens": 256, "temperature": 0.0},
            "engine": {"dtype": "float32", "device": "cpu", "async_scheduling": True,
                       "num_decode_steps": 4, "max_num_seqs": 64, "num_gpu_blocks_override": 1024}}
    result = run_job(spec)
    t = {r["id"]: r for r in committed(tmp_path / "out").to_pylist()}
    assert len(t) == len(rows) and result.summary["errors"] == 4
    for rid, schema in expect.items():
        r = t[rid]
        assert r["finish_reason"] == "stop" and r["structured_output_valid"] is True, r
        jsonschema.validate(json.loads(r["text"]), schema)
    assert t["c0"]["text"] in ("yes", "no") and t["c1"]["text"] in ("red", "green", "blue")
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", t["r0"]["text"])
    assert re.fullmatch(r"\+33 [0-9]{9}", t["r1"]["text"])
    assert all(t[k]["structured_output_valid"] is True for k in ("c0", "c1", "r0", "r1"))
    assert t["plain"]["structured_output_valid"] is None and t["plain"]["error"] is None
    assert t["short"]["finish_reason"] == "length" and t["short"]["structured_output_valid"] is False
    assert "invalid regex" in t["bad-regex"]["error"]
    assert "Unimplemented keys" in t["bad-feature"]["error"] and '"not"' in t["bad-feature"]["error"]
    assert "strnig" in t["bad-type"]["error"]
    assert "column 'schema' holds text that is not JSON" in t["not-json"]["error"]


def test_constrained_greedy_output_does_not_depend_on_the_batch(smollm2_dir):
    prompts = ["Write a person as JSON.", "Tell me a story.", "Write an order as JSON.",
               "Is water wet?", "Count to ten."]
    params = [SamplingParams(temperature=0.0, max_tokens=96, structured_outputs=SO(json=PERSON)),
              SamplingParams(temperature=0.0, max_tokens=24),
              SamplingParams(temperature=0.0, max_tokens=96, structured_outputs=SO(json=ORDER)),
              SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=SO(choice=["yes", "no"])),
              SamplingParams(temperature=0.0, max_tokens=24)]
    alone = LLM(str(smollm2_dir), dtype="float32", device="cpu", num_gpu_blocks_override=256)
    want = [alone.chat([{"role": "user", "content": p}], sp)[0].outputs[0]
            for p, sp in zip(prompts, params)]
    batched = LLM(str(smollm2_dir), dtype="float32", device="cpu", async_scheduling=True,
                  num_decode_steps=4, num_gpu_blocks_override=256)
    got = batched.chat([[{"role": "user", "content": p}] for p in prompts], params)
    for w, g, sp in zip(want, got, params):
        assert g.outputs[0].token_ids == w.token_ids and g.outputs[0].text == w.text
        if sp.structured_outputs is not None and sp.structured_outputs.json is not None:
            jsonschema.validate(json.loads(w.text), sp.structured_outputs.json)
    assert batched.stats()["num_multi_step_rounds"] > 0


def test_openai_batch_response_format_end_to_end(smollm2_dir, tmp_path: Path):
    def line(i: int, body: dict) -> dict:  # a request's model must name the job's
        return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": smollm2_dir.name, "max_tokens": 128, "temperature": 0, **body}}
    msgs = [{"role": "user", "content": "Describe a customer order as JSON."}]
    src = write_jsonl(tmp_path / "batch.jsonl", [
        line(0, {"messages": msgs, "response_format": {"type": "json_schema", "json_schema": {
            "name": "order", "schema": ORDER, "strict": True}}}),
        line(1, {"messages": msgs, "response_format": {"type": "json_object"}}),
        line(2, {"messages": msgs, "response_format": {"type": "text"}, "max_tokens": 8}),
        line(3, {"messages": msgs, "response_format": {"type": "json_schema"}})])
    result = run_job({"model": str(smollm2_dir), "input": {"path": str(src)},
                      "output": {"path": str(tmp_path / "out"), "format": "openai-batch"},
                      "engine": {"dtype": "float32", "device": "cpu",
                                 "num_gpu_blocks_override": 256}})
    out = [json.loads(x) for x in next(p for p in result.final_files
                                       if p.name.endswith(".openai.jsonl")).read_text().splitlines()]
    by_id = {o["custom_id"]: o for o in out}
    choices = [by_id[f"req-{i}"]["response"]["body"]["choices"][0] for i in range(3)]
    content = [c["message"]["content"] for c in choices]
    assert choices[0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(content[0]), ORDER)
    # any JSON object: complete, or cut by max_tokens (a small model may write a long key)
    assert content[1].startswith("{")
    if choices[1]["finish_reason"] == "stop":
        assert isinstance(json.loads(content[1]), dict)
    assert by_id["req-2"]["response"]["body"]["usage"]["completion_tokens"] == 8
    refused = by_id["req-3"]["response"]  # OpenAI's shape: status 400, the reason in the body
    assert refused["status_code"] == 400
    assert "json_schema must be an object with a `schema`" in refused["body"]["error"]["message"]
