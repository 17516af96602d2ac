"""Input shards: order, row indices, malformed lines, Parquet batches, OpenAI batch lines."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchllm.io.readers import (InputError, find_input_files, iter_rows, memory_shard,
                                 open_shards)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_jsonl_rows_skip_blank_lines_and_flag_malformed_ones(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "a.jsonl", ['{"prompt": "a"}', "", '{oops', "[1, 2]", '{"prompt": "b"}'])
    (shard,) = open_shards([p], None)
    assert shard.format == "jsonl" and shard.num_rows == 4
    rows = list(iter_rows(shard))
    assert [r.row for r in rows] == [0, 1, 2, 3]
    assert rows[0].data == {"prompt": "a"} and rows[3].data == {"prompt": "b"}
    assert rows[1].data is None and "malformed JSON" in rows[1].error and "row 1" in rows[1].error
    assert rows[2].data is None and "not an object" in rows[2].error
    assert [r.row for r in iter_rows(shard, start=2)] == [2, 3]


def test_parquet_streams_from_any_start_row_across_row_groups(tmp_path: Path) -> None:
    table = pa.table({"prompt": [f"p{i}" for i in range(10)], "x": list(range(10))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=3)
    (shard,) = open_shards([tmp_path / "a.parquet"], None)
    assert shard.format == "parquet" and shard.num_rows == 10
    for start in (0, 2, 3, 7, 9):
        rows = list(iter_rows(shard, start=start))
        assert [r.row for r in rows] == list(range(start, 10))
        assert [r.data["x"] for r in rows] == list(range(start, 10))


def test_folder_and_glob_give_a_stable_sorted_order(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.jsonl", "c.parquet"):
        (tmp_path / name).write_text("")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in find_input_files(str(tmp_path))] == ["a.jsonl", "b.jsonl", "c.parquet"]
    assert [p.name for p in find_input_files(str(tmp_path / "*.jsonl"))] == ["a.jsonl", "b.jsonl"]
    with pytest.raises(InputError, match="nothing.jsonl"):
        find_input_files(str(tmp_path / "nothing.jsonl"))
    with pytest.raises(InputError, match="matches no file"):
        find_input_files(str(tmp_path / "*.csv"))


def test_openai_batch_lines_are_detected_and_flattened(tmp_path: Path) -> None:
    line = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5,
                     "temperature": 0.5, "model": "x"}}
    p = write_jsonl(tmp_path / "b.jsonl", [json.dumps(line), json.dumps({"custom_id": "r2"})])
    (shard,) = open_shards([p], None)
    assert shard.format == "openai-batch"
    r1, r2 = iter_rows(shard)
    assert r1.data["custom_id"] == "r1" and r1.data["messages"][0]["content"] == "hi"
    assert r1.data["max_tokens"] == 5 and r1.data["temperature"] == 0.5 and r1.error is None
    assert r2.error is not None and "body" in r2.error


def test_in_memory_table_is_one_shard_whose_hash_follows_the_content() -> None:
    a = memory_shard(pa.table({"prompt": ["x", "y"]}))
    b = memory_shard(pa.table({"prompt": ["x", "z"]}))
    assert a.num_rows == 2 and a.content_hash != b.content_hash
    assert [r.data["prompt"] for r in iter_rows(a, start=1)] == ["y"]
