"""One bad row never kills a job (fake engine): per-row settings out of range, prompts of the wrong
type, text that is not valid Unicode. Each becomes an error row naming the field or type; the
other rows are served as if the bad ones were not there."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchllm.jobs import finalize, run_job
from batchllm.sampling_params import SamplingParams, SamplingParamsError
from tests.jobs.fake_engine import FakeEngine, FakeTokenizer, expected_text
from tests.jobs.helpers import committed, job, write_jsonl

# (JSON of the row's extra fields, words its error must hold)
BAD_SETTINGS = [
    ('"seed": 18446744073709551616', "seed=18446744073709551616 is invalid"),
    ('"seed": -9223372036854775809', "seed=-9223372036854775809 is invalid"),
    ('"seed": 2.5', "seed=2.5 is invalid"),
    ('"seed": true', "seed=True is invalid"),
    ('"temperature": NaN', "temperature=nan is invalid: expected a finite number"),
    ('"temperature": Infinity', "temperature=inf is invalid"),
    ('"temperature": -0.5', "temperature=-0.5 is invalid"),
    ('"temperature": "hot"', "temperature='hot' is invalid"),
    ('"top_p": NaN', "top_p=nan is invalid"),
    ('"top_p": false', "top_p=False is invalid"),
    ('"max_tokens": true', "max_tokens=True is invalid"),
    ('"max_tokens": 0', "max_tokens=0 is invalid"),
    ('"max_tokens": 100000000000000000000', "max_tokens=100000000000000000000 is invalid"),
    ('"max_tokens": "5"', "max_tokens='5' is invalid"),
    ('"stop": {"a": 1}', "stop={'a': 1} is invalid"),
    ('"stop": true', "stop=True is invalid"),
    ('"stop": false', "stop=False is invalid"),
    ('"stop": [1, 2]', "stop=[1, 2] is invalid"),
    ('"stop": ""', "stop=[''] is invalid"),
    ('"stop": ["\\ud800"]', "stop=['\\ud800'] is invalid"),
]
BAD_PROMPTS = [
    ("5", "must be a string, got a number (5)"),
    ("2.5", "must be a string, got a number (2.5)"),
    ('["a", "b"]', "must be a string, got a list of 2 item(s)"),
    ('{"text": "a"}', "must be a string, got an object (struct)"),
    ("true", "must be a string, got a boolean (True)"),
    ("null", "must be a string, got null"),
    ('"   "', "empty prompt"),
    ('"bad \\ud800 text"', "not valid Unicode text (a lone surrogate \\ud800 at character 4)"),
]


def run_rows(tmp_path: Path, lines: list[str], **sections) -> pa.Table:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(line + "\n" for line in lines))
    output = {"unit_rows": 7, "chunk_rows": 3, **sections.pop("output", {})}
    r = run_job(job(src, tmp_path / "out", output=output, **sections), engine=FakeEngine())
    assert r.summary["status"] == "complete"
    return committed(tmp_path / "out")


def test_per_row_settings_out_of_range_are_error_rows_naming_the_setting(tmp_path: Path) -> None:
    lines = ['{"prompt": "good first"}']
    lines += [f'{{"prompt": "row {i}", {extra}}}' for i, (extra, _) in enumerate(BAD_SETTINGS)]
    lines += ['{"prompt": "good last", "seed": 18446744073709551615, "temperature": 0.5}']
    t = run_rows(tmp_path, lines)
    errors = t["error"].to_pylist()
    assert errors[0] is None and errors[-1] is None  # the largest 64-bit seed is fine
    for i, (_, words) in enumerate(BAD_SETTINGS, start=1):
        assert errors[i] is not None and "invalid per-row parameter" in errors[i], errors[i]
        assert words in errors[i], (words, errors[i])
    assert t["finish_reason"].to_pylist()[1:-1] == ["error"] * len(BAD_SETTINGS)
    tok = FakeTokenizer()
    assert t["text"][0].as_py() == expected_text(tok.encode("good first"),
                                                 SamplingParams(max_tokens=3, temperature=0.0))


def test_prompts_of_the_wrong_type_name_the_type(tmp_path: Path) -> None:
    lines = [f'{{"id": "p{i}", "prompt": {value}}}' for i, (value, _) in enumerate(BAD_PROMPTS)]
    t = run_rows(tmp_path, ['{"id": "ok", "prompt": "fine"}', *lines], input={"id_column": "id"})
    errors = t["error"].to_pylist()
    assert errors[0] is None
    for i, (_, words) in enumerate(BAD_PROMPTS, start=1):
        assert words in errors[i] and "column 'prompt'" in errors[i], (words, errors[i])


@pytest.mark.parametrize("value, words", [
    ('"not json"', "not a JSON list of messages"),
    ("5", "got a number (5)"),
    ('{"role": "user"}', "got an object (struct)"),
    ('[{"role": "user", "content": 5}]', "message 0 needs a string role and content (text or a "
                                          "list of text parts; got role a string, content a number "
                                          "(5))"),
    ('[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]',
     "message 0, content part 0: only text parts"),
    ('[{"role": "user", "content": "\\udfff"}]', "not valid Unicode text (a lone surrogate \\udfff"),
])
def test_bad_messages_name_what_is_wrong(tmp_path: Path, value: str, words: str) -> None:
    good = '{"m": [{"role": "user", "content": "hi"}]}'
    t = run_rows(tmp_path, [good, f'{{"m": {value}}}'], input={"messages_column": "m"})
    assert t["error"][0].as_py() is None
    assert words in t["error"][1].as_py()
    assert t["error"][1].as_py().startswith("line 2 of ")  # the line an editor shows


@pytest.mark.parametrize("value, words", [
    ("[1, 2.5]", "it holds 2.5"), ("[1, -3]", "it holds -3"), ("[1, 4294967296]", "4294967296"),
    ("[true]", "it holds True"), ('"1 2 3"', "got a string"), ("[]", "empty list of token ids"),
])
def test_bad_token_ids_are_refused_before_the_engine(tmp_path: Path, value: str, words: str) -> None:
    t = run_rows(tmp_path, ['{"ids": [5, 6]}', f'{{"ids": {value}}}'],
                 input={"token_ids_column": "ids"})
    assert t["error"][0].as_py() is None and words in t["error"][1].as_py()


def test_text_that_is_not_valid_unicode_is_refused_per_row_and_written_escaped(
        tmp_path: Path) -> None:
    lines = ['{"id": "a", "prompt": "fine", "label": "x"}',
             '{"id": "b\\ud800", "prompt": "fine", "label": "y"}',  # the id
             '{"id": "c", "prompt": "fine", "label": "z\\udc00"}',  # a kept column
             '{"id": "d", "prompt": "fine", "label": ["ok", {"k": "\\ud83d"}]}',  # nested
             '{"id": "e", "prompt": "also fine", "label": "w"}']
    t = run_rows(tmp_path, lines, input={"id_column": "id"}, output={"keep_columns": ["label"]})
    assert t["id"].to_pylist() == ["a", "b\\ud800", "c", "d", "e"]  # escaped, not dropped
    assert t["label"][2].as_py() == "z\\udc00"
    errors = t["error"].to_pylist()
    assert errors[0] is None and errors[4] is None
    assert "the id holds text that is not valid Unicode (a lone surrogate \\ud800 at character 1)" \
        in errors[1]
    assert "kept column 'label'" in errors[2] and "\\udc00" in errors[2]
    assert "label" in errors[3] and "\\ud83d" in errors[3] and "[1].k" in errors[3]
    assert finalize(tmp_path / "out")  # the whole job is committed and finalizes


def test_a_parquet_row_with_a_nan_temperature_or_a_huge_seed_is_an_error_row(tmp_path: Path) -> None:
    table = pa.table({"prompt": ["a", "b", "c", "d"],
                      "temperature": [0.5, float("nan"), None, float("inf")],
                      "seed": pa.array([1, 2**64 - 1, 2**63, None], pa.uint64())})
    pq.write_table(table, tmp_path / "in.parquet")
    r = run_job(job(tmp_path / "in.parquet", tmp_path / "out"), engine=FakeEngine())
    errors = committed(tmp_path / "out")["error"].to_pylist()
    assert errors[0] is None and errors[2] is None  # a null setting takes the job's
    assert "temperature=nan" in errors[1] and "temperature=inf" in errors[3]
    assert r.rows == 4 and r.errors == 2


def test_an_openai_batch_line_with_bad_settings_is_an_error_line(tmp_path: Path) -> None:
    def line(cid: str, **body) -> dict:
        return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": "hi"}], **body}}

    src = write_jsonl(tmp_path / "b.jsonl", [line("ok"), line("s", seed=2**70),
                                             line("t", stop={"x": 1}),
                                             line("m", max_completion_tokens=True)])
    run_job(job(src, tmp_path / "out", output={"format": "openai-batch"}), engine=FakeEngine())
    out = [json.loads(x) for x in
           (tmp_path / "out" / "final" / "00000-b.openai.jsonl").read_text().splitlines()]
    assert out[0]["error"] is None
    assert [o["custom_id"] for o in out] == ["ok", "s", "t", "m"]
    for o, words in zip(out[1:], ["seed=", "stop=", "max_tokens=True"]):
        # a request that cannot be served is answered 400 with the reason, as OpenAI does
        assert o["error"] is None and o["response"]["status_code"] == 400
        assert words in o["response"]["body"]["error"]["message"]


@pytest.mark.parametrize("kw, words", [
    ({"n": True}, "n=True"), ({"top_k": 1.0}, "top_k=1.0"), ({"min_p": float("nan")}, "min_p"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty=inf"),
    ({"presence_penalty": float("-inf")}, "presence_penalty"), ({"logprobs": True}, "logprobs"),
    ({"stop_token_ids": [1.5]}, "stop_token_ids"), ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"), ({"seed": 2**64 - 1, "n": 2}, "seed"),
])
def test_sampling_params_refuse_bools_non_finite_numbers_and_wrong_shapes(kw: dict,
                                                                         words: str) -> None:
    with pytest.raises(SamplingParamsError, match=words.replace("[", r"\[")):
        SamplingParams(**kw)
