"""Input shards: order, row indices, malformed lines, Parquet batches, OpenAI batch lines."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchllm.io import digests
from batchllm.io.digests import InputChanged
from batchllm.io.readers import (InputError, check_shard_unchanged, find_input_files, iter_rows,
                                 memory_shard, open_shards)


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
    # messages name the line an editor shows (the blank line 2 counts), not the 0-based row
    assert rows[1].data is None and "malformed JSON" in rows[1].error
    assert "line 3 of a.jsonl" in rows[1].error
    assert rows[2].data is None and "not an object (line 4 of a.jsonl)" in rows[2].error
    assert [r.line for r in rows] == [1, 3, 4, 5]
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


def test_jsonl_digest_blocks_by_rows_and_bytes_and_reading_from_any_row(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(digests, "BLOCK_ROWS", 4)
    monkeypatch.setattr(digests, "BLOCK_BYTES", 100)
    lines = [json.dumps({"prompt": f"p{i}"}) for i in range(10)]
    lines[6] = json.dumps({"prompt": "x" * 120})  # a long line closes its block early
    p = write_jsonl(tmp_path / "a.jsonl", lines[:3] + ["", "  "] + lines[3:])
    (shard,) = open_shards([p], None)
    assert shard.num_rows == 10
    assert [b.first_row for b in shard.digest.blocks] == [0, 4, 7]
    line_of = [1, 2, 3, 6, 7, 8, 9, 10, 11, 12]  # lines 4 and 5 are blank
    for start in (0, 3, 4, 6, 7, 9):
        assert [r.row for r in iter_rows(shard, start=start)] == list(range(start, 10))
        assert next(iter_rows(shard, start=start)).data == json.loads(lines[start])
        # a read that starts at a later block still knows each row's line in the file
        assert [r.line for r in iter_rows(shard, start=start)] == line_of[start:]
        assert [r.line for r in iter_rows(shard, start=start, verify=False)] == line_of[start:]
    same = write_jsonl(tmp_path / "b.jsonl", lines[:3] + ["", "  "] + lines[3:])
    assert open_shards([same], None)[0].content_hash == shard.content_hash
    other = write_jsonl(tmp_path / "c.jsonl", lines[:3] + ["", " "] + lines[3:])  # one byte
    assert open_shards([other], None)[0].content_hash != shard.content_hash


def test_a_jsonl_changed_after_planning_is_caught_at_its_first_changed_block(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(digests, "BLOCK_ROWS", 4)
    rows = [json.dumps({"prompt": f"p{i}"}) for i in range(12)]
    p = write_jsonl(tmp_path / "a.jsonl", rows)
    (shard,) = open_shards([p], None)
    write_jsonl(p, rows[:5] + [json.dumps({"prompt": "P5"})] + rows[6:])  # same size
    got = []
    with pytest.raises(InputChanged, match=r"a\.jsonl changed during the run \(rows 4-7 differ"):
        for r in iter_rows(shard):
            got.append(r.row)
    assert got == [0, 1, 2, 3]  # the rows of the intact block, and none of the changed one
    assert [r.row for r in iter_rows(shard, start=8)] == [8, 9, 10, 11]  # later blocks: intact
    assert [r.row for r in iter_rows(shard, start=4, verify=False)][:1] == [4]  # pre-flight


def test_a_parquet_changed_after_planning_is_caught_per_row_group(tmp_path: Path) -> None:
    p = tmp_path / "a.parquet"

    def write(prompts: list[str]) -> None:  # plain pages, no statistics: same footer, same sizes
        pq.write_table(pa.table({"prompt": prompts}), p, row_group_size=3, use_dictionary=False,
                       write_statistics=False, compression="none")

    write([f"p{i}" for i in range(9)])
    (shard,) = open_shards([p], None)
    assert [b.first_row for b in shard.digest.blocks] == [0, 3, 6]
    check_shard_unchanged(shard)  # untouched: nothing to do
    p.write_bytes(p.read_bytes())  # touched: same bytes, new ctime
    check_shard_unchanged(shard)
    # Only the first row group changes (same length): rows of it may still wait to be committed
    # beside rows of later groups, so the check covers every row group, not just the latest.
    footer = p.read_bytes()[-200:]
    write(["q0"] + [f"p{i}" for i in range(1, 9)])
    assert p.read_bytes()[-200:] == footer
    with pytest.raises(InputChanged, match=r"a\.parquet changed during the run \(row group 0"):
        check_shard_unchanged(shard)
    with pytest.raises(InputChanged, match=r"a\.parquet changed during the run"):
        list(iter_rows(shard))


def test_a_deeply_nested_jsonl_line_is_a_malformed_row_not_a_crash(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "a.jsonl", ['{"prompt": ' + "[" * 100000 + "]" * 100000 + "}",
                                           '{"prompt": "ok"}'])
    (shard,) = open_shards([p], None)
    bad, good = iter_rows(shard)
    assert bad.data is None and "nested too deeply" in bad.error and good.data == {"prompt": "ok"}
