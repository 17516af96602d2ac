"""OpenAI batch jobs answer what each request asks, in OpenAI's own shapes: every output line's
body validates with the `openai` package's ChatCompletion / Completion types; a request that
cannot be served as asked is answered 400 with the reason."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batchllm.jobs import run_job, validate_job
from batchllm.jobs.errors import JobInputError
from tests.jobs.fake_engine import FakeEngine
from tests.jobs.helpers import committed, job, write_jsonl

openai_types = pytest.importorskip("openai.types")
chat_types = pytest.importorskip("openai.types.chat")

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
          "additionalProperties": False}


def chat(cid: str, content: Any = "Tell me a story.", **body: Any) -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": content}], **body}}


def completion(cid: str, prompt: str = "Once upon a time", **body: Any) -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions",
            "body": {"prompt": prompt, **body}}


def read_lines(out: Path, stem: str = "batch") -> dict[str, dict[str, Any]]:
    text = (out / "final" / f"00000-{stem}.openai.jsonl").read_text()
    lines = [json.loads(x) for x in text.splitlines()]
    return {x["custom_id"]: x for x in lines}


def test_every_line_of_a_varied_batch_validates_with_openai_types(tmp_path: Path,
                                                                  tiny_model_dir: Path) -> None:
    requests = [
        chat("plain", max_tokens=4),
        {**chat("system"), "body": {"model": f"someorg/{tiny_model_dir.name}",
                                    "max_completion_tokens": 3,
                                    "messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hi"}]}},
        chat("parts", [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "a story."}]),
        chat("n2", n=2, temperature=1.0, seed=3),
        chat("logprobs", logprobs=True, top_logprobs=3, max_tokens=5),
        chat("json", response_format={"type": "json_schema", "json_schema": {
            "name": "a", "schema": SCHEMA, "strict": True}}, max_tokens=24),
        chat("json-object", response_format={"type": "json_object"}, max_tokens=24),
        completion("text"),
        completion("text-logprobs", logprobs=2, max_tokens=4),
        completion("text-n2", n=2, temperature=0.9, seed=1),
        chat("other-model", model="gpt-4o-mini"),
        {**chat("embeddings"), "url": "/v1/embeddings"},
        chat("tools", tools=[{"type": "function", "function": {"name": "f"}}]),
        chat("image", [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]),
        chat("bad-top", top_logprobs=2),
    ]
    src = write_jsonl(tmp_path / "batch.jsonl", requests + ["{not json"])
    r = run_job(job(src, tmp_path / "out", model=str(tiny_model_dir),
                    output={"format": "openai-batch"}, engine={"device": "cpu"},
                    sampling={"max_tokens": 6, "temperature": 0.0}))
    lines = read_lines(tmp_path / "out")
    assert len(lines) == len(requests) + 1
    ok = {cid: x for cid, x in lines.items() if x["response"] and
          x["response"]["status_code"] == 200}
    assert set(ok) == {"plain", "system", "parts", "n2", "logprobs", "json", "json-object", "text",
                       "text-logprobs", "text-n2"}
    for cid, x in ok.items():
        assert x["error"] is None and x["id"].startswith("batch_req_")
        body = x["response"]["body"]
        chat_url = not cid.startswith("text")
        typed = (chat_types.ChatCompletion if chat_url else openai_types.Completion).model_validate(
            body)
        assert typed.created > 1_600_000_000 and typed.usage.completion_tokens > 0
        assert len(typed.choices) == (2 if cid.endswith("n2") else 1)
        assert [c.index for c in typed.choices] == list(range(len(typed.choices)))
    rows = [x for x in committed(tmp_path / "out").to_pylist() if x["id"] == "n2"]
    assert [x["sample_index"] for x in rows] == [0, 1]
    assert ok["n2"]["response"]["body"]["usage"]["completion_tokens"] == sum(
        x["num_output_tokens"] for x in rows)
    assert [c["message"]["content"] for c in ok["n2"]["response"]["body"]["choices"]] == [
        x["text"] for x in rows]

    lp = chat_types.ChatCompletion.model_validate(ok["logprobs"]["response"]["body"])
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens
    assert all(len(step.top_logprobs) == 3 for step in content)
    assert all(step.logprob <= 0 and step.bytes == list(step.token.encode()) for step in content)
    assert all(step.top_logprobs[0].logprob >= step.top_logprobs[-1].logprob for step in content)
    assert all(step.logprob <= step.top_logprobs[0].logprob + 1e-5 for step in content)
    text_lp = openai_types.Completion.model_validate(
        ok["text-logprobs"]["response"]["body"]).choices[0].logprobs
    assert len(text_lp.tokens) == len(text_lp.token_logprobs) == len(text_lp.top_logprobs) == 4
    assert all(len(top) <= 2 for top in text_lp.top_logprobs) and text_lp.text_offset[0] == 0
    for name in ("plain", "parts", "text"):
        assert ok[name]["response"]["body"]["choices"][0]["logprobs"] is None

    structured = ok["json"]["response"]["body"]["choices"][0]
    if structured["finish_reason"] == "stop":
        assert isinstance(json.loads(structured["message"]["content"])["a"], int)

    refused = {cid: x for cid, x in lines.items() if cid not in ok and x["response"]}
    for cid, words in {"other-model": "body.model 'gpt-4o-mini' is not the model",
                       "embeddings": "/v1/chat/completions",
                       "tools": "body.tools is not supported",
                       "image": "only text parts",
                       "bad-top": "body.top_logprobs needs body.logprobs: true"}.items():
        x = refused[cid]
        assert x["error"] is None and x["response"]["status_code"] == 400, x
        error = x["response"]["body"]["error"]
        assert words in error["message"] and error["type"] == "invalid_request_error"
    assert "/v1/completions" in refused["embeddings"]["response"]["body"]["error"]["message"]
    broken = [x for x in lines.values() if x["response"] is None]
    assert len(broken) == 1 and "line 16" in broken[0]["error"]["message"]
    assert r.summary["errors"] == 6


def test_a_model_mismatch_can_be_ignored(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "batch.jsonl", [chat("a", model="gpt-4o"), chat("b")])
    run_job(job(src, tmp_path / "out", output={"format": "openai-batch"},
                input={"openai_model_mismatch": "ignore"}), engine=FakeEngine())
    lines = read_lines(tmp_path / "out")
    assert [x["response"]["status_code"] for x in lines.values()] == [200, 200]
    assert lines["a"]["response"]["body"]["model"] == "smollm2-135m"  # who really answered
    run_job(job(src, tmp_path / "strict", output={"format": "openai-batch"}), engine=FakeEngine())
    assert read_lines(tmp_path / "strict")["a"]["response"]["status_code"] == 400


def test_a_short_name_and_its_hf_id_are_the_same_model(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "batch.jsonl", [
        chat("a", model="HuggingFaceTB/SmolLM2-135M-Instruct"), chat("b", model="smollm2-135m"),
        chat("c", model="Llama-3.1-8B")])
    run_job(job(src, tmp_path / "out", output={"format": "openai-batch"}), engine=FakeEngine())
    codes = {k: x["response"]["status_code"] for k, x in read_lines(tmp_path / "out").items()}
    assert codes == {"a": 200, "b": 200, "c": 400}


def test_a_duplicate_custom_id_refuses_the_file_even_when_duplicate_ids_are_allowed(
        tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "batch.jsonl", [json.dumps(chat("q1")), "", json.dumps(chat("q2")),
                                                 json.dumps(chat("q1"))])
    for extra in ({}, {"duplicate_ids": "allow"}):
        with pytest.raises(JobInputError, match=r"id 'q1' is given twice: at row 0 \(line 1\).*"
                                                r"row 2 \(line 4\)"):
            validate_job(job(src, tmp_path / "out", input=extra))
    with pytest.raises(JobInputError, match="duplicate_ids: allow does not apply"):
        run_job(job(src, tmp_path / "out", input={"duplicate_ids": "allow"}), engine=FakeEngine())
    assert not (tmp_path / "out").exists()  # refused before any work
