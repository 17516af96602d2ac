"""The job file's schema and its YAML: every key's type and range is checked up front, naming the
key (and the nearest valid value); hostile or broken YAML is refused fast."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from batchllm.jobs.errors import JobSpecError
from batchllm.jobs.job_yaml import MAX_BYTES
from batchllm.jobs.spec import load_spec, parse_set, spec_from_dict

BASE = {"input": {"path": "in.jsonl"}, "output": {"path": "out"}}


def with_(section: str | None, **values) -> dict:
    raw = {k: dict(v) for k, v in BASE.items()}
    if section is None:
        raw.update(values)
    else:
        raw[section] = {**raw.get(section, {}), **values}
    return raw


@pytest.mark.parametrize("raw, words", [
    (with_(None, sampling="fast"), "`sampling` must be a mapping"),
    (with_(None, sampling=5), "`sampling` must be a mapping"),
    (with_(None, sampling=[1]), "`sampling` must be a mapping"),
    (with_(None, engine="cpu"), "`engine` must be a mapping"),
    (with_(None, limits=3), "`limits` must be a mapping"),
    (with_(None, input=5), "`input` must be a mapping"),
    (with_(None, model=5), "model=5 is invalid"),
    (with_(None, model=""), "model='' is invalid"),
    (with_(None, tokenizer=5), "tokenizer=5 is invalid"),
    (with_("output", path=5), "output.path=5 is invalid"),
    (with_("output", path=""), "output.path='' is invalid"),
    (with_("input", path=["a.jsonl"]), r"input.path=\['a.jsonl'\] is invalid"),
    (with_("input", id_column=3), "input.id_column=3 is invalid"),
    (with_("input", system_prompt=["x"]), "input.system_prompt"),
    (with_("input", duplicate_ids="maybe"), "input.duplicate_ids='maybe' is invalid: expected "
                                            "refuse | allow"),
    (with_("input", format="josnl"), "Did you mean 'jsonl'"),
    (with_("output", commit_interval_s="ten"), "output.commit_interval_s='ten' is invalid: "
                                               "expected a number > 0"),
    (with_("output", commit_interval_s=0), "output.commit_interval_s=0"),
    (with_("output", commit_interval_s=float("nan")), "output.commit_interval_s=nan"),
    (with_("output", unit_rows=True), "output.unit_rows=True is invalid"),
    (with_("output", unit_rows=2.5), "output.unit_rows=2.5"),
    (with_("output", chunk_rows=0), "output.chunk_rows=0"),
    (with_("output", chunk_rows=2**40), "output.chunk_rows="),
    (with_("output", keep_columns="label"), "output.keep_columns='label' is invalid"),
    (with_("output", keep_columns=["a", 1]), "output.keep_columns"),
    (with_("output", keep_columns=["a", "a"]), "each named once"),
    (with_("output", keep_columns=["id", "input_id"]), "would both be written as 'input_id'"),
    (with_("output", format="jsonl"), "output.format='jsonl' is invalid"),
    (with_("limits", prompt_too_long="truncate"), "Did you mean 'truncate_left'"),
    (with_("sampling", temperature=float("inf")), "sampling.temperature=inf is invalid"),
    (with_("sampling", seed=2**64), "sampling.seed=18446744073709551616 is invalid"),
    (with_("sampling", max_tokens=True), "sampling.max_tokens=True is invalid"),
    (with_("sampling", stop={"a": 1}), r"sampling.stop=\{'a': 1\} is invalid"),
    (with_("sampling", stop=True), "sampling.stop=True is invalid"),
    (with_("sampling", n="2"), "sampling.n='2' is invalid"),
    (with_("engine", max_num_seqs="many"), "engine.max_num_seqs='many' is invalid: expected an "
                                          "integer"),
    (with_("engine", max_num_seqs=True), "engine.max_num_seqs=True is invalid"),
    (with_("engine", max_num_seqs=0), "engine.max_num_seqs=0 is invalid"),
    (with_("engine", gpu_memory_utilization="0.5"), "engine.gpu_memory_utilization='0.5'"),
    (with_("engine", gpu_memory_utilization=float("nan")), "engine.gpu_memory_utilization=nan"),
    (with_("engine", enforce_eager="yes"), "engine.enforce_eager='yes' is invalid: expected "
                                           "true or false"),
    (with_("engine", max_model_len=None), None),  # null is a valid value here
    (with_("engine", dtype=16), "engine.dtype=16 is invalid"),
    (with_("engine", data_parallel_size=0), "engine.data_parallel_size=0 is invalid"),
    (with_("engine", model="x"), "put model / tokenizer at the top level"),
])
def test_every_key_is_checked_for_type_and_range_naming_the_key(raw: dict,
                                                                words: str | None) -> None:
    if words is None:
        spec_from_dict(raw)
        return
    with pytest.raises(JobSpecError, match=words):
        spec_from_dict(raw)


def write(tmp_path: Path, text: str | bytes) -> Path:
    job = tmp_path / "job.yaml"
    job.write_bytes(text if isinstance(text, bytes) else text.encode())
    return job


BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text, words", [
    (BOMB, "expands to more than 100000 values"),
    (BOMB.replace("a: &a", "input: {path: x}\noutput: {path: o}\na: &a") + "sampling: {stop: *i}\n",
     "expands to more than"),
    ("input: " + "[" * 200 + "]" * 200 + "\n", "nests deeper than 64 levels"),
    ("input: " + "[" * 20000 + "]" * 20000 + "\n", "nests too deeply"),
    ("# padding\n" * (MAX_BYTES // 10 + 1), "a job file may hold at most"),
    (b"model: \xff\xfe x\n", r"not UTF-8 text \(byte 7\)"),
    ("input: {path: a.jsonl}\noutput: {path: out}\nmodel: a\nmodel: b\n",
     r"key 'model' is given twice \(lines 3 and 4\)"),
    ("input: {path: a.jsonl, path: b.jsonl}\noutput: {path: out}\n",
     r"key 'path' is given twice \(lines 1 and 1\)"),
    ("input:\n  path: a.jsonl\noutput:\n  path: o\nsampling:\n  max_tokens: 3\n  max_tokens: 4\n",
     r"key 'max_tokens' is given twice \(lines 6 and 7\)"),
    ("input: [unclosed\n", "not valid YAML"),
    ("? [a, b]\n: 1\n", "not valid YAML"),
    ("input: {path: x}\noutput: {path: !!python/object/apply:os.getcwd []}\n", "not valid YAML"),
    ("", "must be a mapping"),
    ("- a\n- b\n", "must be a mapping"),
])
def test_hostile_or_broken_yaml_is_refused_fast(tmp_path: Path, text: str | bytes,
                                                words: str) -> None:
    start = time.monotonic()
    with pytest.raises(JobSpecError, match=words):
        load_spec(write(tmp_path, text))
    assert time.monotonic() - start < 5


def test_anchors_aliases_and_merge_keys_still_work(tmp_path: Path) -> None:
    job = write(tmp_path, "input: {path: in.jsonl, system_prompt: &p Be brief.}\n"
                "output: {path: out}\nsampling: {stop: [*p]}\n"
                "engine:\n  <<: {dtype: float32, seed: 1}\n  seed: 2\n")
    spec = load_spec(job)
    assert spec.sampling == {"stop": ["Be brief."]}
    assert spec.engine == {"dtype": "float32", "seed": 2}  # a key beside a merge overrides it


def test_job_files_that_are_not_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match="cannot read job file"):
        load_spec(tmp_path / "missing.yaml")
    with pytest.raises(JobSpecError, match="cannot read job file"):
        load_spec(tmp_path)


@pytest.mark.parametrize("assignment, words", [
    ("output.unit_rows=[1", "not valid YAML"),
    ("sampling.stop=&a [*a]", "nests deeper than 64 levels"),  # an alias inside itself
    ("x", "expected key=value"),
])
def test_set_values_are_read_with_the_same_bounds(assignment: str, words: str) -> None:
    with pytest.raises(JobSpecError, match=words):
        parse_set(assignment)


def test_set_into_an_empty_section_and_into_a_value(tmp_path: Path) -> None:
    job = write(tmp_path, "input: {path: in.jsonl}\noutput: {path: out}\nengine:\n")
    assert load_spec(job, dict([parse_set("engine.seed=3")])).engine == {"seed": 3}
    with pytest.raises(JobSpecError, match="'path' is not a section"):
        load_spec(job, dict([parse_set("input.path.x=1")]))


def test_a_jobspec_round_trips_through_the_schema(tmp_path: Path) -> None:
    """run_job(JobSpec) re-validates spec_to_dict(spec): every default (nulls included) passes."""
    import pyarrow as pa

    from batchllm.jobs.spec import spec_to_dict

    spec = load_spec({**BASE, "input": {"data": pa.table({"prompt": ["a"]})}})
    assert spec.input.path is None
    again = load_spec(spec)
    assert spec_to_dict(again) == spec_to_dict(spec)
    with pytest.raises(JobSpecError, match="missing key 'input.path'"):
        spec_from_dict({**BASE, "input": {"path": None}})
