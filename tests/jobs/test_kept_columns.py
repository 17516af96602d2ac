"""Kept columns whose values change type after the first rows (fake engine): the column's type
covers every row (widened, or text), so no kept value is silently written as null."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchllm.jobs import run_job
from tests.jobs.fake_engine import FakeEngine
from tests.jobs.helpers import committed, job, write_jsonl

N = 1500  # past the first 1000 rows, which alone used to decide the types


@pytest.mark.parametrize("late, want_type, want_late", [
    ("n/a", pa.string(), "n/a"),  # int then text: the column is text, ints as their JSON
    (2.5, pa.float64(), 2.5),  # int then float: widened to float
    (2**70, pa.string(), str(2**70)),  # beyond 64 bits: text, not a null
    ([1, 2], pa.string(), "[1, 2]"),  # a list among ints: JSON text
    (True, pa.string(), "true"),
])
def test_a_kept_column_that_changes_type_late_keeps_every_value(
        tmp_path: Path, late: object, want_type: pa.DataType, want_late: object) -> None:
    rows = [{"prompt": f"p{i}", "label": i} for i in range(N)]
    rows[1200]["label"] = late
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    r = run_job(job(src, tmp_path / "out", output={"keep_columns": ["label"]}),
                engine=FakeEngine())
    t = committed(tmp_path / "out")
    assert t.schema.field("label").type == want_type
    labels = t["label"].to_pylist()
    assert labels[1200] == want_late
    assert labels[0] in (0, "0") and labels[1499] in (1499, "1499")
    assert t["label"].null_count == 0 and r.errors == 0


def test_nested_kept_values_are_widened_across_rows(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "meta": {"a": i, "tags": [1, 2]}} for i in range(N)]
    rows[1300]["meta"] = {"a": 1.5, "tags": [0.5], "b": "new"}
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    run_job(job(src, tmp_path / "out", output={"keep_columns": ["meta"]}), engine=FakeEngine())
    meta = committed(tmp_path / "out")["meta"].to_pylist()
    assert meta[1300] == {"a": 1.5, "tags": [0.5], "b": "new"}
    assert meta[0] == {"a": 0.0, "tags": [1.0, 2.0], "b": None}


def test_a_kept_column_typed_differently_in_two_parquet_shards_keeps_both(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": ["a", "b"], "label": [1, 2]}), folder / "a.parquet")
    pq.write_table(pa.table({"prompt": ["c", "d"], "label": ["x", "y"]}), folder / "b.parquet")
    run_job(job(folder, tmp_path / "out", output={"keep_columns": ["label"]}),
            engine=FakeEngine())
    assert committed(tmp_path / "out")["label"].to_pylist() == ["1", "2", "x", "y"]
