"""Atomic chunk writes: complete files or nothing, clear messages on disk errors."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pyarrow as pa
import pytest

from batchllm.io import writers
from batchllm.io.schema import output_schema, rows_to_table
from batchllm.io.writers import WriteFailed, read_arrow, remove_temp_files, write_arrow_atomic


def test_write_then_read_round_trips_and_leaves_no_temp_file(tmp_path: Path) -> None:
    table = pa.table({"x": [1, 2, 3]})
    write_arrow_atomic(tmp_path / "a.arrow", table)
    assert read_arrow(tmp_path / "a.arrow").equals(table)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.arrow"]


def test_disk_full_leaves_neither_a_partial_file_nor_a_temp_file(tmp_path: Path,
                                                                 monkeypatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writers.os, "fsync", full)
    with pytest.raises(WriteFailed, match="no space left") as info:
        write_arrow_atomic(tmp_path / "a.arrow", pa.table({"x": [1]}))
    assert "a.arrow" in str(info.value) and "rerun" in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_gives_a_permission_message(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(WriteFailed, match="permission denied"):
            write_arrow_atomic(tmp_path / "a.arrow", pa.table({"x": [1]}))
    finally:
        tmp_path.chmod(0o700)


def test_leftover_temp_files_are_removed_and_committed_files_kept(tmp_path: Path) -> None:
    write_arrow_atomic(tmp_path / "a.arrow", pa.table({"x": [1]}))
    (tmp_path / ".tmp-b.arrow.123").write_bytes(b"half")
    assert [p.name for p in remove_temp_files(tmp_path)] == [".tmp-b.arrow.123"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.arrow"]


def test_output_schema_types_and_a_misfit_kept_value_is_null_with_its_row_flagged() -> None:
    schema = output_schema([pa.field("label", pa.int64())], top_logprobs=True, samples=True)
    assert schema.field("token_ids").type == pa.list_(pa.int32())
    assert schema.field("token_logprobs").type == pa.list_(pa.float32())
    assert "sample_index" in schema.names and "top_logprobs" in schema.names
    t = rows_to_table([{"id": "a", "input_row": 0, "label": 3},
                       {"id": "b", "input_row": 1, "label": "not a number", "error": "earlier"}],
                      schema)
    assert t["label"].to_pylist() == [3, None] and t.schema == schema
    assert t["error"][0].as_py() is None
    assert t["error"][1].as_py() == ("earlier; column 'label': the value \"not a number\" does "
                                     "not fit the column's type int64; written as null")


def test_a_misfit_in_a_text_column_is_written_as_json_text_unflagged() -> None:
    schema = output_schema([pa.field("label", pa.string())], top_logprobs=False, samples=False)
    t = rows_to_table([{"id": "a", "input_row": 0, "label": 3},
                       {"id": "b", "input_row": 1, "label": {"k": [1, None]}}], schema)
    assert t["label"].to_pylist() == ["3", '{"k": [1, null]}']
    assert t["error"].null_count == 2


def test_text_utf8_cannot_encode_is_escaped_by_the_writer_wherever_it_is(tmp_path: Path) -> None:
    """Lone surrogates (what a JSON "\\ud800" escape gives) in any text column, nested or not:
    the chunk is written, each one as a backslash escape, the rest of the text unchanged."""
    kept = [pa.field("tags", pa.list_(pa.string())),
            pa.field("meta", pa.struct([("note", pa.string())]))]
    schema = output_schema(kept, top_logprobs=False, samples=False)
    rows = [{"id": "a\ud800", "input_row": 0, "tags": ["ok", "x\udfff"],
             "meta": {"note": "é\udc80"}, "text": "fine", "error": "bad \ud83d"},
            {"id": "plain", "input_row": 1, "tags": ["ü"], "meta": {"note": "n"}, "text": "t"}]
    t = rows_to_table(rows, schema)
    write_arrow_atomic(tmp_path / "c.arrow", t)
    back = read_arrow(tmp_path / "c.arrow").to_pylist()
    assert back[0]["id"] == "a\\ud800" and back[0]["tags"] == ["ok", "x\\udfff"]
    assert back[0]["meta"] == {"note": "é\\udc80"} and back[0]["error"] == "bad \\ud83d"
    assert back[1]["id"] == "plain" and back[1]["tags"] == ["ü"] and back[1]["error"] is None
