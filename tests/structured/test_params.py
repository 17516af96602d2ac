"""Where users say it: StructuredOutputsParams, a job's sampling.structured_outputs and per-row
column, OpenAI's response_format; each wrong shape is named (fast, no model)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchllm.jobs import validate_job
from batchllm.jobs.errors import JobError
from batchllm.jobs.preprocess import response_format, row_constraint
from batchllm.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputsParams as SO
from tests.jobs.helpers import job, write_jsonl

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def test_exactly_one_constraint_of_the_right_shape():
    assert SO(json=SCHEMA).kind == "json" and SO(choice=("a", "b")).choice == ["a", "b"]
    for kw, needle in [({}, "got none"), ({"regex": "a", "choice": ["a"]}, "got regex, choice"),
                       ({"choice": []}, "non-empty list"), ({"choice": ["a", ""]}, "non-empty"),
                       ({"regex": 5}, "regular expression"), ({"json": []}, "JSON schema"),
                       ({"json_object": "yes"}, "true")]:
        with pytest.raises(SamplingParamsError, match=needle):
            SO(**kw)


def test_sampling_params_take_the_object_or_a_mapping_of_its_shape():
    sp = SamplingParams(structured_outputs={"regex": "[0-9]+"})
    assert sp.structured_outputs == SO(regex="[0-9]+")
    assert sp.with_overrides(max_tokens=3).structured_outputs == SO(regex="[0-9]+")
    with pytest.raises(SamplingParamsError, match="Did you mean 'regex'"):
        SamplingParams(structured_outputs={"regexp": "x"})
    # equal constraints share one compiled grammar: the key ignores key order in schemas
    assert SO(json={"b": 1, "a": 2}).key == SO(json={"a": 2, "b": 1}).key != SO(regex="x").key


def test_a_row_column_holds_a_schema_or_a_constraint_object_as_value_or_json_text():
    assert row_constraint(SCHEMA, "s") == SO(json=SCHEMA)
    assert row_constraint(json.dumps(SCHEMA), "s") == SO(json=SCHEMA)
    assert row_constraint('{"choice": ["x", "y"]}', "s") == SO(choice=["x", "y"])
    assert row_constraint({"regex": "a+", "json": None}, "s") == SO(regex="a+")  # a struct row
    assert row_constraint(None, "s") is None
    with pytest.raises(ValueError, match="column 's' holds text that is not JSON"):
        row_constraint("{type: object", "s")
    with pytest.raises(ValueError, match="got a number"):
        row_constraint(5, "s")


def test_openai_response_format():
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    assert response_format(rf) == SO(json=SCHEMA)
    assert response_format({"type": "json_object"}) == SO(json_object=True)
    assert response_format({"type": "text"}) is None and response_format(None) is None
    with pytest.raises(ValueError, match="`schema` object"):
        response_format({"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(ValueError, match="type text, json_object or json_schema; got 'xml'"):
        response_format({"type": "xml"})


def _validate(tmp_path: Path, **sections):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "schema": None}])
    return validate_job(job(src, tmp_path / "out", **sections))


def test_the_job_file_checks_the_keys_and_compiles_the_constraint_up_front(tmp_path):
    pytest.importorskip("llguidance")
    _validate(tmp_path, sampling={"structured_outputs": {"json": SCHEMA}},
              input={"structured_output_column": "schema"})
    for so, needle in [({"jsn": SCHEMA}, "unknown key 'sampling.structured_outputs.jsn'. Did you "
                                         "mean 'sampling.structured_outputs.json'"),
                       ({"choice": "a"}, "sampling.structured_outputs.choice='a' is invalid"),
                       ({"regex": "a(b"}, "sampling.structured_outputs.regex: invalid regex"),
                       ({"json": {"type": "object", "not": {}}}, 'Unimplemented keys: \\["not"\\]'),
                       ({"json": "{oops"}, "structured_outputs.json: the schema is not valid JSON"),
                       ({"regex": "a", "choice": ["a"]}, "give exactly one")]:
        with pytest.raises(JobError, match=needle):
            _validate(tmp_path, sampling={"structured_outputs": so})
    with pytest.raises(JobError, match="has no column 'schemas' \\(named by "
                                       "input.structured_output_column\\)"):
        _validate(tmp_path, input={"structured_output_column": "schemas"})


def test_a_job_constraint_without_the_library_says_how_to_install_it(tmp_path, monkeypatch):
    from batchllm.structured import grammar

    monkeypatch.setattr(grammar, "available", lambda: False)
    with pytest.raises(JobError, match="pip install 'batchllm\\[structured\\]'"):
        _validate(tmp_path, sampling={"structured_outputs": {"regex": "a"}})
