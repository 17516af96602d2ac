"""run_job with an injected fake engine: formats, column mapping, overrides, schema, row errors."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchllm.jobs import run_job
from batchllm.jobs.errors import JobInputError, JobModelError
from tests.jobs.fake_engine import FakeEngine, FakeTokenizer, expected_text
from tests.jobs.helpers import committed, job, write_jsonl
from batchllm.sampling_params import SamplingParams


def test_jsonl_prompts_give_one_row_each_with_the_documented_schema(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}", "label": i} for i in range(7)])
    r = run_job(job(src, tmp_path / "out", output={"keep_columns": ["label"], "unit_rows": 3,
                                                    "chunk_rows": 2}), engine=FakeEngine())
    t = committed(tmp_path / "out")
    assert t.column_names[:4] == ["id", "input_file", "input_row", "label"]
    for name in ("text", "token_ids", "token_logprobs", "finish_reason", "num_prompt_tokens",
                 "num_output_tokens", "num_cached_tokens", "time_queued_s",
                 "time_to_first_token_s", "time_total_s", "error"):
        assert name in t.column_names
    assert t.schema.field("token_ids").type == pa.list_(pa.int32())
    assert t["input_row"].to_pylist() == list(range(7))
    assert t["id"].to_pylist() == [f"in-{i}" for i in range(7)]
    assert t["label"].to_pylist() == list(range(7))
    tok = FakeTokenizer()
    base = SamplingParams(max_tokens=3, temperature=0.0)
    assert t["text"].to_pylist() == [expected_text(tok.encode(f"p{i}"), base) for i in range(7)]
    assert t["num_prompt_tokens"].to_pylist() == [len(tok.encode(f"p{i}")) for i in range(7)]
    assert all(x == pytest.approx(0.003, abs=1e-5) for x in t["time_total_s"].to_pylist())
    assert r.summary["rows"] == 7 and r.summary["errors"] == 0 and r.summary["status"] == "complete"
    assert r.summary["output_tokens"] == 21 and r.output_path == tmp_path / "out"
    assert sorted(p.name for p in (tmp_path / "out" / "chunks").iterdir())[-1].endswith("-last.arrow")


def test_row_overrides_reach_only_their_row(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"prompt": "a"}, {"prompt": "b", "max_tokens": 5, "temperature": 0.7, "top_p": 0.5,
                          "seed": 11}, {"prompt": "c", "stop": ["x"]}])
    run_job(job(src, tmp_path / "out"), engine=FakeEngine())
    texts = committed(tmp_path / "out")["text"].to_pylist()
    tok = FakeTokenizer()
    assert texts[0] == expected_text(tok.encode("a"), SamplingParams(max_tokens=3, temperature=0.0))
    assert texts[1] == expected_text(tok.encode("b"), SamplingParams(
        max_tokens=5, temperature=0.7, top_p=0.5, seed=11))
    assert committed(tmp_path / "out")["num_output_tokens"].to_pylist() == [3, 5, 3]


def test_chat_messages_from_parquet_with_id_column_and_system_prompt(tmp_path: Path) -> None:
    msgs = [[{"role": "user", "content": f"hi {i}"}] for i in range(4)]
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(4)], "messages": msgs}),
                   tmp_path / "chat.parquet")
    run_job(job(tmp_path / "chat.parquet", tmp_path / "out",
                input={"messages_column": "messages", "id_column": "key", "system_prompt": "S"}),
            engine=FakeEngine())
    t = committed(tmp_path / "out")
    tok = FakeTokenizer()
    base = SamplingParams(max_tokens=3, temperature=0.0)
    assert t["id"].to_pylist() == ["k0", "k1", "k2", "k3"]
    assert t["text"].to_pylist() == [
        expected_text(tok.apply_chat_template(m, system_prompt="S"), base) for m in msgs]


def test_token_id_column_and_engine_row_errors(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"ids": [5, 6, 7]}, {"ids": [5, 999]}, {"ids": []}])
    r = run_job(job(src, tmp_path / "out", input={"token_ids_column": "ids"}), engine=FakeEngine())
    t = committed(tmp_path / "out")
    assert t["num_prompt_tokens"].to_pylist()[0] == 3 and t["error"][0].as_py() is None
    assert "outside the vocabulary" in t["error"][1].as_py()
    assert "empty" in t["error"][2].as_py()
    assert t["finish_reason"].to_pylist()[1:] == ["error", "error"]
    assert r.summary["errors"] == 2


def test_openai_batch_in_and_out(tmp_path: Path) -> None:
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 2 + i}}
             for i in range(3)]
    src = write_jsonl(tmp_path / "batch.jsonl", lines + ["{broken"])
    r = run_job(job(src, tmp_path / "out", output={"format": "openai-batch"}), engine=FakeEngine())
    out_lines = [__import__("json").loads(x) for x in
                 (tmp_path / "out" / "final" / "00000-batch.openai.jsonl").read_text().splitlines()]
    assert [x["custom_id"] for x in out_lines[:3]] == ["c0", "c1", "c2"]
    ok = out_lines[1]
    assert ok["response"]["status_code"] == 200 and ok["error"] is None
    body = ok["response"]["body"]
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["message"]["content"] == committed(tmp_path / "out")["text"][1].as_py()
    assert out_lines[3]["response"] is None and "malformed" in out_lines[3]["error"]["message"]
    assert r.summary["errors"] == 1 and len(r.final_files) == 2


def test_in_memory_table_and_dataset_inputs(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    table = pa.table({"prompt": ["a", "b", "c"]})
    r1 = run_job(job("unused", tmp_path / "o1"), engine=FakeEngine(), input=table)
    ds = datasets.Dataset.from_dict({"prompt": ["a", "b", "c"]})
    r2 = run_job(job("unused", tmp_path / "o2"), engine=FakeEngine(), input=ds)
    t1, t2 = committed(r1.output_path), committed(r2.output_path)
    assert t1["text"].to_pylist() == t2["text"].to_pylist() and t1.num_rows == 3
    assert t1["input_file"].to_pylist() == ["<memory>"] * 3


def test_n_samples_give_one_row_per_sample_and_logprobs_when_asked(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    r = run_job(job(src, tmp_path / "out", sampling={"n": 3, "logprobs": 2, "temperature": 1.0}),
                engine=FakeEngine())
    t = committed(tmp_path / "out")
    assert t["sample_index"].to_pylist() == [0, 1, 2, 0, 1, 2]
    assert t["input_row"].to_pylist() == [0, 0, 0, 1, 1, 1]
    assert t["token_logprobs"][0].as_py() == [-0.5] * 3
    top = t["top_logprobs"][0].as_py()[0]  # the first token's two most likely, with their text
    assert top[1] == {"token_id": 7, "token": "<7>", "logprob": -1.5} and top[0]["logprob"] == -0.5
    assert r.summary["rows"] == 2 and r.summary["output_rows"] == 6


@pytest.mark.parametrize("policy, expect", [("error", "prompt too long"), ("skip", None),
                                            ("truncate_left", None)])
def test_prompt_too_long_policies(tmp_path: Path, policy: str, expect: str | None) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x" * 100}, {"prompt": "ok"}])
    r = run_job(job(src, tmp_path / "out", limits={"prompt_too_long": policy}),
                engine=FakeEngine(max_model_len=32))
    t = committed(tmp_path / "out")
    first = t.slice(0, 1).to_pylist()[0]
    if policy == "error":
        assert expect in first["error"] and "truncate_left" in first["error"]
    elif policy == "skip":
        assert first["error"] is None and first["finish_reason"] == "skipped"
        assert r.summary["skipped"] == 1
    else:  # the last tokens are kept, leaving room for max_tokens (3), not just one token
        assert first["error"] is None and first["num_prompt_tokens"] == 32 - 3
    assert t["error"][1].as_py() is None and r.summary["rows"] == 2


def test_backpressure_keeps_the_engine_full_but_bounded(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(100)])
    eng = FakeEngine(per_step=2)
    run_job(job(src, tmp_path / "out", engine={"max_num_seqs": 4}), engine=eng)
    assert eng.max_unfinished == 12  # 3 x max_num_seqs, reached and never exceeded
    assert committed(tmp_path / "out").num_rows == 100


def test_job_level_problems_fail_before_the_engine_is_built(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    built = []

    def factory(spec):
        built.append(spec)
        return FakeEngine()

    with pytest.raises(JobInputError, match=r"in.jsonl has no column 'prompt'.*input.prompt_column"):
        run_job(job(src, tmp_path / "out"), engine_factory=factory)
    with pytest.raises(JobInputError, match="keep_columns"):
        run_job(job(src, tmp_path / "out", input={"prompt_column": "text"},
                    output={"keep_columns": ["nope"]}), engine_factory=factory)
    with pytest.raises(JobInputError, match="missing.jsonl"):
        run_job(job(tmp_path / "missing.jsonl", tmp_path / "out"), engine_factory=factory)
    with pytest.raises(JobModelError, match="no-such-model"):
        run_job(job(src, tmp_path / "out", model="no-such-model"), engine_factory=factory)
    assert built == []
