"""Faults the job runner must survive or report (fake engine, in process): changed or vanished
inputs, corrupt chunks, leftovers and stale locks, engine refusals, untrusted names and files."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pytest

from batchllm.io import writers
from batchllm.jobs import finalize, run_job
from batchllm.jobs.checkpoint import LOCK
from batchllm.jobs.errors import JobInputError, JobSpecError, OutputFolderError
from tests.jobs.fake_engine import FakeEngine
from tests.jobs.helpers import committed, job, write_jsonl

N = 12


def spec(input_path: Path | str, out: Path) -> dict:
    return job(input_path, out, output={"unit_rows": 4, "chunk_rows": 2}, engine={"max_num_seqs": 2})


def two_shards(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for s in ("a", "b"):
        write_jsonl(folder / f"{s}.jsonl", [{"prompt": f"{s} row {i}"} for i in range(N)])
    return folder


def test_a_vanished_shard_is_named_and_the_run_refused(tmp_path: Path) -> None:
    folder = two_shards(tmp_path)
    run_job(spec(folder, tmp_path / "out"), engine=FakeEngine())
    before = committed(tmp_path / "out")
    (folder / "b.jsonl").unlink()
    with pytest.raises(OutputFolderError, match=r"input shard\(s\) vanished: .*b\.jsonl"):
        run_job(spec(folder, tmp_path / "out"), engine=FakeEngine())
    assert committed(tmp_path / "out").equals(before)  # nothing touched


def test_a_rewritten_shard_with_the_same_row_count_is_reported(tmp_path: Path) -> None:
    folder = two_shards(tmp_path)
    run_job(spec(folder, tmp_path / "out"), engine=FakeEngine())
    time.sleep(0.01)
    write_jsonl(folder / "a.jsonl", [{"prompt": f"other {i}"} for i in range(N)])
    with pytest.raises(OutputFolderError, match=r"input shard .*a\.jsonl changed \(content: "):
        run_job(spec(folder, tmp_path / "out"), engine=FakeEngine())


def test_an_input_that_changes_during_the_run_stops_it_with_a_message(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"row {i}"} for i in range(N)])

    def grow(eng: FakeEngine) -> None:
        if eng.steps == 1:
            with open(src, "a") as f:
                f.write('{"prompt": "late row"}\n')

    with pytest.raises(JobInputError, match=r"in\.jsonl changed during the run"):
        run_job(spec(src, tmp_path / "out"), engine=FakeEngine(on_step=grow))
    with pytest.raises(OutputFolderError, match=r"in\.jsonl changed \(rows"):
        run_job(spec(src, tmp_path / "out"), engine=FakeEngine())


def test_a_chunk_with_rows_outside_its_unit_is_set_aside_reported_and_redone(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"row {i}"} for i in range(N)])
    run_job(spec(src, tmp_path / "ref"), engine=FakeEngine())
    want = committed(tmp_path / "ref").drop_columns(["time_queued_s", "time_to_first_token_s",
                                                     "time_total_s"])
    out = tmp_path / "out"
    run_job(spec(src, out), engine=FakeEngine())
    chunks = sorted((out / "chunks").glob("unit-000001-*.arrow"))
    t = writers.read_arrow(chunks[0])
    bad = t.set_column(t.schema.get_field_index("input_row"), "input_row",
                       pa.array([0] * t.num_rows, pa.int64()))  # rows of unit 0, not unit 1
    writers.write_arrow_atomic(chunks[0], bad)
    notes: list[str] = []
    second = FakeEngine()
    r = run_job(spec(src, out), engine=second, on_notice=notes.append)
    assert len(second.seen_ids) == t.num_rows  # only that chunk's rows were redone
    assert any(chunks[0].name in n and "outside its unit" in n for n in notes)
    assert r.summary["notices"] == notes
    got = committed(out).drop_columns(["time_queued_s", "time_to_first_token_s", "time_total_s"])
    assert got.equals(want)


def test_leftover_temp_files_and_a_stale_lock_are_cleaned_and_reported(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"row {i}"} for i in range(N)])
    out = tmp_path / "out"
    (out / "chunks").mkdir(parents=True)
    (out / LOCK).write_text("999999")  # the pid of a run that is gone; nobody holds the flock
    (out / "chunks" / ".tmp-unit-000000-chunk-00000.arrow.999999").write_bytes(b"partial")
    notes: list[str] = []
    r = run_job(spec(src, out), engine=FakeEngine(), on_notice=notes.append)
    assert r.rows == N
    assert any("stale lock left by pid 999999" in n for n in notes)
    assert any("removed 1 temporary file" in n for n in notes)
    assert not [p for p in (out / "chunks").iterdir() if not p.name.endswith(".arrow")]
    assert (out / LOCK).read_text() == ""  # a clean exit leaves no pid behind


def test_a_request_the_engine_refuses_becomes_an_error_row_and_the_job_goes_on(
        tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"row {i}"} for i in range(N)])

    class Refusing(FakeEngine):
        def add_request(self, request_id, prompt, sampling_params, arrival_time=None):
            if request_id.endswith(":5"):
                raise ValueError("prompt uses a feature this engine lacks")
            super().add_request(request_id, prompt, sampling_params, arrival_time)

    r = run_job(spec(src, tmp_path / "out"), engine=Refusing())
    t = committed(tmp_path / "out")
    assert r.rows == N and r.errors == 1
    assert "engine refused the request: prompt uses a feature" in t["error"][5].as_py()
    assert t["error"].null_count == N - 1


def test_finalize_keeps_files_inside_the_output_folder_whatever_the_input_name(
        tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"row {i}"} for i in range(N)])
    out = tmp_path / "deep" / "out"
    run_job(spec(src, out), engine=FakeEngine())
    record = json.loads((out / "job.json").read_text())
    record["shards"][0]["name"] = "../../../etc/x\n.jsonl"  # a tampered or hostile name
    (out / "job.json").write_text(json.dumps(record))
    files = finalize(out)
    assert [f.name for f in files] == ["00000-x_.arrow"]
    assert all(f.resolve().parent == (out / "final").resolve() for f in files)
    assert not (tmp_path / "etc").exists() and not (tmp_path / "deep" / "etc").exists()
    with pytest.raises(ValueError, match="plain file name"):
        writers.inside(out, "../x.arrow")


def test_job_files_are_parsed_with_a_safe_loader(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    job_file = tmp_path / "job.yaml"
    job_file.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n"
                        f"input: {{path: x.jsonl}}\noutput: {{path: {tmp_path / 'out'}}}\n")
    with pytest.raises(JobSpecError, match="not valid YAML"):
        run_job(job_file, engine=FakeEngine())
    assert not marker.exists()


def test_the_write_fault_hook_fails_the_real_write_path_and_leaves_no_partial_file(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BATCHLLM_FAULT_ENOSPC", "x-*.arrow")
    with pytest.raises(writers.WriteFailed, match="no space left"):
        writers.write_arrow_atomic(tmp_path / "x-1.arrow", pa.table({"a": [1]}))
    assert os.listdir(tmp_path) == []
