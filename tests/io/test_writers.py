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


def test_output_schema_types_and_a_misfit_kept_value_becomes_null() -> None:
    schema = output_schema([pa.field("label", pa.int64())], top_logprobs=True, samples=True)
    assert schema.field("token_ids").type == pa.list_(pa.int32())
    assert schema.field("token_logprobs").type == pa.list_(pa.float32())
    assert "sample_index" in schema.names and "top_logprobs" in schema.names
    t = rows_to_table([{"id": "a", "input_row": 0, "label": 3}, {"id": "b", "input_row": 1,
                                                                 "label": "not a number"}], schema)
    assert t["label"].to_pylist() == [3, None] and t.schema == schema
