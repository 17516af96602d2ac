"""job.yaml validation: unknown keys name the nearest valid one; values are checked up front."""
from __future__ import annotations

from pathlib import Path

import pytest

from batchllm.jobs.errors import JobSpecError
from batchllm.jobs.spec import load_spec, merge_overrides, parse_set, spec_from_dict

BASE = {"input": {"path": "in.jsonl"}, "output": {"path": "out"}}


@pytest.mark.parametrize("raw, hint", [
    ({**BASE, "sampler": {}}, "'sampling'"),
    ({**BASE, "input": {"path": "x", "prompt_colum": "p"}}, "'input.prompt_column'"),
    ({**BASE, "sampling": {"max_token": 5}}, "'sampling.max_tokens'"),
    ({**BASE, "engine": {"max_num_seq": 5}}, "'engine.max_num_seqs'"),
    ({**BASE, "output": {"path": "o", "keep_column": ["a"]}}, "'output.keep_columns'"),
])
def test_unknown_key_fails_naming_the_nearest_valid_key(raw: dict, hint: str) -> None:
    with pytest.raises(JobSpecError, match=f"Did you mean {hint}"):
        spec_from_dict(raw)


@pytest.mark.parametrize("raw, words", [
    ({**BASE, "sampling": {"temperature": -1}}, "temperature"),
    ({**BASE, "engine": {"dtype": "int3"}}, "dtype"),
    ({**BASE, "limits": {"prompt_too_long": "drop"}}, "prompt_too_long"),
    ({**BASE, "input": {"path": "x", "format": "csv"}}, "input.format"),
    ({"input": {"path": "x"}}, "output.path"),
])
def test_bad_values_name_the_key(raw: dict, words: str) -> None:
    with pytest.raises(JobSpecError, match=words):
        spec_from_dict(raw)


def test_set_overrides_parse_yaml_values_and_merge_into_sections(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("input: {path: in.jsonl}\noutput: {path: out}\nsampling: {max_tokens: 4}\n")
    spec = load_spec(job, dict([parse_set("sampling.temperature=0.5"),
                                parse_set("output.keep_columns=[a, b]")]))
    assert spec.sampling == {"max_tokens": 4, "temperature": 0.5}
    assert spec.output.keep_columns == ["a", "b"] and spec.source == str(job)
    assert merge_overrides({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}
    with pytest.raises(JobSpecError, match="key=value"):
        parse_set("sampling.temperature")


def test_job_file_must_be_a_yaml_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(JobSpecError, match="mapping"):
        load_spec(bad)
    bad.write_text("input: [unclosed\n")
    with pytest.raises(JobSpecError, match="not valid YAML"):
        load_spec(bad)
