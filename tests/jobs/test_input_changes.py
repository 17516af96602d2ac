"""Inputs rewritten during a run (fake engine): the change is caught at the next block of rows, no
row of the new version is committed, and a byte-identical input resumes whatever its mtime."""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchllm.io import digests, writers
from batchllm.jobs import run_job
from batchllm.jobs.checkpoint import CONTENT_KEY
from batchllm.jobs.errors import JobInputError, OutputFolderError
from batchllm.jobs.executor import StopSignal
from tests.jobs.fake_engine import FakeEngine
from tests.jobs.helpers import committed, job, write_jsonl

N = 1000
TIMINGS = ["time_queued_s", "time_to_first_token_s", "time_total_s"]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digests, "BLOCK_ROWS", 16)  # so a change is caught within 16 rows


def spec(src: Path, out: Path) -> dict:
    return job(src, out, output={"unit_rows": 50, "chunk_rows": 5}, engine={"max_num_seqs": 2})


def version(tag: str) -> list[dict]:
    """Rows of one version of the input; versions differ in text, not in length. Lines of ~200
    bytes, so that a reader's buffer (4 KiB) holds only a block or two of them."""
    return [{"prompt": f"{tag} row {i:04d}", "pad": "x" * 180} for i in range(N)]


def texts_of(out: Path) -> dict[int, str]:
    t = committed(out)
    return dict(zip(t["input_row"].to_pylist(), t["text"].to_pylist()))


def rewrite_at_step(path: Path, step: int, write) -> FakeEngine:
    """A fake engine that rewrites `path` in place at its `step`-th step, keeping size and mtime."""
    def on_step(eng: FakeEngine) -> None:
        if eng.steps == step:
            st = path.stat()
            write(path)
            assert path.stat().st_size == st.st_size
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # as a restore from backup does

    return FakeEngine(on_step=on_step)


def test_a_jsonl_rewritten_in_place_mid_run_stops_at_the_next_block_with_nothing_of_it_committed(
        tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", version("a"))
    run_job(spec(src, tmp_path / "ref"), engine=FakeEngine())
    want = texts_of(tmp_path / "ref")
    eng = rewrite_at_step(src, 5, lambda p: write_jsonl(p, version("b")))
    with pytest.raises(JobInputError, match=r"in\.jsonl changed during the run \(rows (\d+)-"
                                            r"\d+ differ from the planned bytes") as info:
        run_job(spec(src, tmp_path / "out"), engine=eng)
    # Caught at the next block the reader reads from the file, not at the end of the shard.
    assert int(info.value.args[0].split("(rows ")[1].split("-")[0]) <= 64
    assert len(eng.seen_ids) <= 64
    got = texts_of(tmp_path / "out")
    assert got and all(want[r] == text for r, text in got.items())  # only version a's rows
    # The other version stays refused (its content differs); the original, restored with its old
    # mtime, resumes and completes with its own rows only.
    with pytest.raises(OutputFolderError, match=r"in\.jsonl changed \(content: "):
        run_job(spec(src, tmp_path / "out"), engine=FakeEngine())
    write_jsonl(src, version("a"))
    r = run_job(spec(src, tmp_path / "out"), engine=FakeEngine())
    assert r.resumed and r.rows == N
    assert texts_of(tmp_path / "out") == want


@pytest.mark.parametrize("change", ["shorter", "longer", "vanished"])
def test_a_jsonl_cut_grown_or_removed_mid_run_is_reported_by_name(tmp_path: Path,
                                                                   change: str) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", version("a"))
    write_jsonl(tmp_path / "z.jsonl", version("z"))  # a second shard, opened after the first

    def edit(eng: FakeEngine) -> None:
        if eng.steps == 2:
            if change == "shorter":
                write_jsonl(src, version("a")[:30])
            elif change == "longer":
                write_jsonl(tmp_path / "z.jsonl", version("z") + [{"prompt": "late"}])
            else:
                (tmp_path / "z.jsonl").unlink()

    spec_ = job(tmp_path, tmp_path / "out", output={"unit_rows": 50, "chunk_rows": 5},
                engine={"max_num_seqs": 2})
    words = {"shorter": r"in\.jsonl changed during the run \(it ends before row 30; 1000 rows",
             "longer": r"z\.jsonl changed during the run \(it has rows beyond the 1000 planned",
             "vanished": r"z\.jsonl changed during the run \(it cannot be opened"}[change]
    with pytest.raises(JobInputError, match=words):
        run_job(spec_, engine=FakeEngine(on_step=edit))
    got = committed(tmp_path / "out")
    assert got.num_rows and got["error"].null_count == got.num_rows  # no row lost its prompt


def test_a_parquet_rewritten_mid_run_commits_nothing_of_the_new_version(tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"

    def write(p: Path, tag: str = "a") -> None:
        pq.write_table(pa.Table.from_pylist(version(tag)), p, row_group_size=20)

    write(src)
    run_job(spec(src, tmp_path / "ref"), engine=FakeEngine())
    want = texts_of(tmp_path / "ref")
    eng = FakeEngine(on_step=lambda e: write(src, "b") if e.steps == 4 else None)
    with pytest.raises(JobInputError, match=r"in\.parquet changed during the run \((its Parquet "
                                            r"footer|row group \d+) differs"):
        run_job(spec(src, tmp_path / "out"), engine=eng)
    assert len(eng.seen_ids) <= 60  # at the next commit or row group, not at the end
    got = texts_of(tmp_path / "out")
    assert all(want[r] == text for r, text in got.items())
    write(src)  # the original bytes again: the job resumes and ends with version a only
    r = run_job(spec(src, tmp_path / "out"), engine=FakeEngine())
    assert r.rows == N and texts_of(tmp_path / "out") == want


def test_a_parquet_touched_mid_run_with_the_same_bytes_goes_on(tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(version("a")), src, row_group_size=20)
    data = src.read_bytes()

    def touch(eng: FakeEngine) -> None:
        if eng.steps == 4:
            src.write_bytes(data)  # rewritten, byte for byte the same: a new mtime and ctime
            os.utime(src, ns=(1, 10**18))

    r = run_job(spec(src, tmp_path / "out"), engine=FakeEngine(on_step=touch))
    assert r.rows == N and r.errors == 0


def test_a_byte_identical_input_with_a_new_mtime_resumes(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", version("a"))
    run_job(spec(src, tmp_path / "ref"), engine=FakeEngine())
    stop = StopSignal()
    eng = FakeEngine(on_step=lambda e: setattr(stop, "signum", 15) if e.steps == 10 else None)
    with pytest.raises(Exception, match="stopped by signal 15"):
        run_job(spec(src, tmp_path / "out"), engine=eng, stop=stop)
    src.write_bytes(src.read_bytes())  # copied back over itself: same bytes, new mtime
    os.utime(src, ns=(10**18, 10**18))
    second = FakeEngine()
    r = run_job(spec(src, tmp_path / "out"), engine=second)
    assert r.resumed and r.rows == N and len(second.seen_ids) < N
    assert texts_of(tmp_path / "out") == texts_of(tmp_path / "ref")


def test_a_chunk_read_from_another_version_of_the_input_is_set_aside_and_redone(
        tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", version("a"))
    out = tmp_path / "out"
    run_job(spec(src, out), engine=FakeEngine())
    want = committed(out).drop_columns(TIMINGS)
    victim = sorted((out / "chunks").glob("unit-000002-*.arrow"))[1]
    t = writers.read_arrow(victim)
    assert t.schema.metadata[CONTENT_KEY]  # every chunk records its input's digest
    writers.write_arrow_atomic(victim, t.replace_schema_metadata({CONTENT_KEY: b"0" * 32}))
    notes: list[str] = []
    second = FakeEngine()
    run_job(spec(src, out), engine=second, on_notice=notes.append)
    assert len(second.seen_ids) == t.num_rows
    assert any(victim.name in n and "another version of the input" in n for n in notes)
    assert committed(out).drop_columns(TIMINGS).equals(want)
