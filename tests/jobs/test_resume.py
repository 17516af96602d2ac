"""Exactly-once resume (fake engine): interrupted, crashed, corrupt or refused runs."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401
import pytest

from batchllm.io import writers
from batchllm.jobs import finalize, run_job
from batchllm.jobs.checkpoint import FolderLock
from batchllm.jobs.errors import EngineFailed, JobInterrupted, OutputFolderError, OutputWriteError
from batchllm.jobs.executor import StopSignal
from tests.jobs.fake_engine import FakeEngine
from tests.jobs.helpers import committed, job, write_jsonl

N = 40


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"row {i}"} for i in range(N)]
                       + ["{bad"])


def spec(src: Path, out: Path) -> dict:
    return job(src, out, output={"unit_rows": 8, "chunk_rows": 3}, engine={"max_num_seqs": 2})


def reference(src: Path, tmp_path: Path) -> pa.Table:
    run_job(spec(src, tmp_path / "ref"), engine=FakeEngine())
    return committed(tmp_path / "ref").drop_columns(["time_queued_s", "time_to_first_token_s",
                                                     "time_total_s"])


def same_rows(out: Path, ref: pa.Table) -> None:
    t = committed(out).drop_columns(["time_queued_s", "time_to_first_token_s", "time_total_s"])
    assert t["input_row"].to_pylist() == list(range(N + 1))  # none lost, none twice
    assert t.equals(ref)


@pytest.mark.parametrize("stop_step", [1, 4, 9])
def test_signal_stop_commits_and_a_rerun_completes_exactly_once(src: Path, tmp_path: Path,
                                                                stop_step: int) -> None:
    ref = reference(src, tmp_path)
    stop = StopSignal()

    def on_step(eng: FakeEngine) -> None:
        if eng.steps == stop_step:
            stop.signum = 15

    with pytest.raises(JobInterrupted) as info:
        run_job(spec(src, tmp_path / "out"), engine=FakeEngine(on_step=on_step), stop=stop)
    assert info.value.exit_code == 143 and "resume" in str(info.value)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["rows"] < N + 1
    second = FakeEngine()
    r = run_job(spec(src, tmp_path / "out"), engine=second)
    assert r.resumed and r.summary["rows"] == N + 1 and r.summary["runs"] == 2
    assert len(second.seen_ids) == N - (summary["rows"] - summary["errors"])  # only the rest
    same_rows(tmp_path / "out", ref)


def test_engine_crash_keeps_finished_rows_and_rerun_redoes_only_the_rest(src: Path,
                                                                         tmp_path: Path) -> None:
    ref = reference(src, tmp_path)
    with pytest.raises(EngineFailed, match="RuntimeError: fake engine crash") as info:
        run_job(spec(src, tmp_path / "out"), engine=FakeEngine(fail_at_step=6))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert info.value.committed == (summary["rows"], N + 1) and summary["rows"] > 0
    first = committed(tmp_path / "out")
    done = first.filter(pa.compute.is_null(first["error"])).num_rows
    assert done > 0
    second = FakeEngine()
    run_job(spec(src, tmp_path / "out"), engine=second)
    assert len(second.seen_ids) == N - done  # committed rows never reach an engine again
    same_rows(tmp_path / "out", ref)
    files = finalize(tmp_path / "out")
    final = writers.read_arrow(files[0])
    assert final["input_row"].to_pylist() == list(range(N + 1))


def test_a_corrupt_chunk_is_set_aside_and_its_rows_redone(src: Path, tmp_path: Path) -> None:
    ref = reference(src, tmp_path)
    run_job(spec(src, tmp_path / "out"), engine=FakeEngine())
    victim = sorted((tmp_path / "out" / "chunks").glob("*.arrow"))[2]
    victim.write_bytes(victim.read_bytes()[:50])  # truncated
    second = FakeEngine()
    run_job(spec(src, tmp_path / "out"), engine=second)
    assert 0 < len(second.seen_ids) <= 3
    assert list((tmp_path / "out" / "chunks").glob(victim.name + ".corrupt-*"))
    same_rows(tmp_path / "out", ref)


def test_disk_full_mid_job_then_resume(src: Path, tmp_path: Path, monkeypatch) -> None:
    ref = reference(src, tmp_path)
    real = writers.os.replace
    calls: list = []

    def flaky(a, b):
        nonlocal calls
        calls += [b] if str(b).endswith(".arrow") else []
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(writers.os, "replace", flaky)
    with pytest.raises(OutputWriteError, match="no space left") as info:
        run_job(spec(src, tmp_path / "out"), engine=FakeEngine())
    assert "intact" in str(info.value)
    chunk_dir = tmp_path / "out" / "chunks"
    assert not [p for p in chunk_dir.iterdir() if p.name.startswith(".tmp-")]
    assert len(list(chunk_dir.glob("*.arrow"))) == 3
    monkeypatch.setattr(writers.os, "replace", real)
    run_job(spec(src, tmp_path / "out"), engine=FakeEngine())
    same_rows(tmp_path / "out", ref)


def test_a_different_job_in_the_same_folder_is_refused_unless_overwrite(src: Path,
                                                                        tmp_path: Path) -> None:
    run_job(spec(src, tmp_path / "out"), engine=FakeEngine())
    changed = spec(src, tmp_path / "out")
    changed["sampling"]["max_tokens"] = 7
    with pytest.raises(OutputFolderError, match=r"different job \(sampling.max_tokens: 3 -> 7\)"):
        run_job(changed, engine=FakeEngine())
    r = run_job(changed, engine=FakeEngine(), overwrite=True)
    assert not r.resumed and set(committed(tmp_path / "out")["num_output_tokens"].to_pylist()) \
        == {7, None}


def test_a_changed_input_shard_is_reported(src: Path, tmp_path: Path) -> None:
    run_job(spec(src, tmp_path / "out"), engine=FakeEngine())
    with open(src, "a") as f:
        f.write('{"prompt": "one more"}\n')
    with pytest.raises(OutputFolderError, match=r"input shard .*in.jsonl changed \(rows"):
        run_job(spec(src, tmp_path / "out"), engine=FakeEngine())


def test_a_second_run_on_a_locked_folder_is_refused_and_leftovers_are_cleaned(
        src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with FolderLock(out):
        with pytest.raises(OutputFolderError, match="in use by another batchllm run"):
            run_job(spec(src, out), engine=FakeEngine())
    (out / "chunks").mkdir(exist_ok=True)
    (out / "chunks" / ".tmp-unit-000000-chunk-00000.arrow.999").write_bytes(b"partial")
    run_job(spec(src, out), engine=FakeEngine())
    assert not list((out / "chunks").glob(".tmp-*"))
