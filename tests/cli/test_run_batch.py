"""`batchllm run-batch -i in.jsonl -o out.jsonl --model M` (vLLM's run-batch): one output line per
request in input order, written only when complete; the job's state beside the output resumes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from batchllm.cli import app
from batchllm.jobs.run_batch import batch_job, state_folder

chat_types = pytest.importorskip("openai.types.chat")
openai_types = pytest.importorskip("openai.types")


def chat(cid: str, content: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": content}], **body}}


def write_requests(path: Path, requests: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    return path


REQUESTS = [chat("a", "Tell me a story.", max_tokens=5, temperature=0.0),
            {"custom_id": "b", "method": "POST", "url": "/v1/completions",
             "body": {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0.0}},
            chat("c", "Hi", max_completion_tokens=3, logprobs=True, top_logprobs=2,
                 temperature=0.0),
            {**chat("d", "Hi"), "url": "/v1/embeddings"},
            chat("e", "Why is the sky blue?", max_tokens=4, temperature=0.0)]


def run(args: list[str]):
    return CliRunner().invoke(app, args, catch_exceptions=False)


def test_run_batch_writes_one_validated_line_per_request_in_order(tmp_path: Path,
                                                                  tiny_model_dir: Path) -> None:
    src = write_requests(tmp_path / "in.jsonl", REQUESTS)
    out = tmp_path / "results" / "out.jsonl"
    args = ["run-batch", "-i", str(src), "-o", str(out), "--model", str(tiny_model_dir),
            "--max-model-len", "128", "--set", "engine.device=cpu", "-q"]
    r = run(args)
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ["a", "b", "c", "d", "e"]
    by_id = {x["custom_id"]: x for x in lines}
    for cid in ("a", "c", "e"):
        assert by_id[cid]["response"]["status_code"] == 200
        chat_types.ChatCompletion.model_validate(by_id[cid]["response"]["body"])
    openai_types.Completion.model_validate(by_id["b"]["response"]["body"])
    assert by_id["d"]["response"]["status_code"] == 400  # an endpoint batchllm does not serve
    assert len(by_id["c"]["response"]["body"]["choices"][0]["logprobs"]["content"]) == 3
    usage = by_id["a"]["response"]["body"]["usage"]
    assert usage["completion_tokens"] <= 5
    # the job's state is the hidden folder beside the output; a rerun resumes it (nothing to do)
    # and writes the same lines again
    state = state_folder(out)
    assert state == tmp_path / "results" / ".out.jsonl.batchllm" and (state / "job.json").is_file()
    before = out.read_text()
    out.unlink()
    r = run(args)
    assert r.exit_code == 0, r.output
    assert out.read_text() == before
    assert json.loads((state / "summary.json").read_text())["rows"] == 5


def test_run_batch_output_appears_only_when_complete(tmp_path: Path, tiny_model_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that stops before its end leaves no (partial) output file; the rerun finishes it."""
    from batchllm.jobs import api
    from batchllm.jobs.errors import JobError

    src = write_requests(tmp_path / "in.jsonl", REQUESTS)
    out = tmp_path / "out.jsonl"
    real = api.finalize

    def fail_finalize(*a: Any, **k: Any) -> Any:
        raise JobError("simulated failure before the output is written")

    monkeypatch.setattr(api, "finalize", fail_finalize)
    args = ["run-batch", "-i", str(src), "-o", str(out), "--model", str(tiny_model_dir),
            "--set", "engine.device=cpu", "--set", "sampling.max_tokens=3", "-q"]
    r = run(args)
    assert r.exit_code != 0 and "simulated failure" in r.output
    assert not out.exists()
    monkeypatch.setattr(api, "finalize", real)
    assert run(args).exit_code == 0
    assert len(out.read_text().splitlines()) == 5


def test_generation_config_defaults_and_unbounded_max_tokens(tmp_path: Path,
                                                             tiny_model_dir: Path) -> None:
    """As vLLM: the model's generation_config.json gives the request defaults (auto), none with
    --generation-config vllm; no max_tokens cap unless a request sets one."""
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        (model / f.name).symlink_to(f)
    (model / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 7, "eos_token_id": 2}))
    job = batch_job("in.jsonl", tmp_path / "out.jsonl", str(model))
    assert job["sampling"] == {"max_tokens": 7, "temperature": 0.6, "top_p": 0.9}
    assert job["input"]["format"] == job["output"]["format"] == "openai-batch"
    assert batch_job("in.jsonl", "o.jsonl", str(model), generation_config="vllm")["sampling"] == \
        {"max_tokens": None}


def test_run_batch_refuses_urls_and_bad_choices(tmp_path: Path, tiny_model_dir: Path) -> None:
    r = run(["run-batch", "-i", "https://example.com/in.jsonl", "-o", str(tmp_path / "o.jsonl"),
             "--model", str(tiny_model_dir)])
    assert r.exit_code == 2 and "URLs are not supported" in r.output
    r = run(["run-batch", "-i", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.jsonl"),
             "--model", str(tiny_model_dir), "--set", "engine.device=cpu"])
    assert r.exit_code == 2 and "missing.jsonl" in r.output
