"""Ids given twice in the id column are refused before any model work, naming the first two rows
(and JSONL lines); `input.duplicate_ids: allow` accepts them."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchllm.jobs import run_job, validate_job
from batchllm.jobs.errors import JobInputError
from tests.jobs.fake_engine import FakeEngine
from tests.jobs.helpers import committed, job, write_jsonl


def never_built(spec):
    raise AssertionError("the engine must not be built for a refused job")


def test_a_jsonl_id_given_twice_names_both_rows_and_lines(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "prompt": "x"}\n\n{"id": "b", "prompt": "y"}\n'
                   '{"id": "c", "prompt": "z"}\n\n\n{"id": "b", "prompt": "again"}\n'
                   '{"id": "a", "prompt": "and again"}\n')
    with pytest.raises(JobInputError, match=r"id 'b' is given twice: at row 1 \(line 3\) of "
                                            r".*in\.jsonl and at row 3 \(line 7\) of .*in\.jsonl.*"
                                            r"input\.duplicate_ids: allow"):
        run_job(job(src, tmp_path / "out", input={"id_column": "id"}), engine_factory=never_built)
    assert not (tmp_path / "out").exists()


def test_allow_accepts_duplicate_ids_and_writes_every_row(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}])
    r = run_job(job(src, tmp_path / "out", input={"id_column": "id", "duplicate_ids": "allow"}),
                engine=FakeEngine())
    assert r.rows == 2 and committed(tmp_path / "out")["id"].to_pylist() == ["a", "a"]


def test_duplicates_across_shards_of_parquet_are_found_by_row(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"key": [1, 2, 3], "prompt": ["a", "b", "c"]}), folder / "a.parquet",
                   row_group_size=2)
    pq.write_table(pa.table({"key": [4, 3], "prompt": ["d", "e"]}), folder / "b.parquet")
    with pytest.raises(JobInputError, match=r"id '3' is given twice: at row 2 of .*a\.parquet "
                                            r"and at row 1 of .*b\.parquet"):
        validate_job(job(folder, tmp_path / "out", input={"id_column": "key"}))


@pytest.mark.parametrize("ids, dup", [
    ([1, "1"], "'1'"),  # written as the same id string
    (["x", None, None, "y"], None),  # missing ids fall back to <file>-<row>: not duplicates
    ([f"r{i}" for i in range(5000)] + ["r4321"], "'r4321'"),
])
def test_ids_compare_as_they_are_written(tmp_path: Path, ids: list, dup: str | None) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": v, "prompt": "p"} for v in ids])
    spec = job(src, tmp_path / "out", input={"id_column": "id"})
    if dup is None:
        assert validate_job(spec).rows_total == len(ids)
    else:
        with pytest.raises(JobInputError, match=f"id {dup} is given twice"):
            validate_job(spec)


def test_openai_custom_ids_and_in_memory_tables_are_checked_too(tmp_path: Path) -> None:
    line = {"method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hi"}]}}
    src = write_jsonl(tmp_path / "b.jsonl", [json.dumps({"custom_id": c, **line})
                                             for c in ("q1", "q2", "q1")])
    with pytest.raises(JobInputError, match=r"input\.id_column 'custom_id': id 'q1' is given "
                                            r"twice: at row 0 \(line 1\).* row 2 \(line 3\)"):
        validate_job(job(src, tmp_path / "out"))
    table = pa.table({"id": ["u", "v", "v"], "prompt": ["a", "b", "c"]})
    with pytest.raises(JobInputError, match=r"id 'v' is given twice: at row 1 of <memory>"):
        validate_job(job("unused", tmp_path / "o2"), input={"data": table, "id_column": "id"})
