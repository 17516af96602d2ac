"""Real faults against a real `batchllm run` subprocess (tiny random model, greedy, CPU).

Every test compares the finished job's rows, by id, with one uninterrupted run of the same job,
so a row lost, written twice or changed by a fault shows up.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from batchllm.io.writers import read_arrow
from batchllm.jobs import run_job
from tests.cli.helpers import chunk_rows, cli, env, wait_for_chunks, write_job

pytestmark = pytest.mark.slow

JOB = dict(rows=24, max_tokens=8, unit_rows=5, max_num_seqs=2)  # 25 rows, 5 units, 2-row chunks
TOTAL = 25


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    """The rows of one uninterrupted run of the job (in process: same code, same model)."""
    folder = tmp_path_factory.mktemp("reference")
    run_job(write_job(folder, tiny_model_dir, **JOB))
    t = chunk_rows(folder / "out")
    assert t["id"].to_pylist() == [f"r{i}" for i in range(24)] + ["in-24"]
    return t


def snapshot(out: Path) -> dict[str, str]:
    """Committed chunk name -> content hash."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "chunks").glob("*.arrow"))}


def assert_no_partial_files(out: Path) -> None:
    for p in (out / "chunks").iterdir():
        assert p.name.endswith(".arrow"), f"leftover {p.name}"
        read_arrow(p)  # every committed file is whole


def resume_and_check(job: Path, out: Path, reference: pa.Table, **env_extra: str) -> str:
    done = subprocess.run(cli(job), env=env(**env_extra), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"done: {TOTAL} rows" in done.stdout
    got = chunk_rows(out)
    assert got["id"].to_pylist() == reference["id"].to_pylist()  # each row exactly once
    assert got.equals(reference)
    return done.stderr


def stopped_run(job: Path, out: Path, sig: int = signal.SIGTERM) -> dict[str, str]:
    """Start a run, stop it with `sig` right after its first commit; returns what is committed."""
    return signalled_run(job, out, sig)[0]


def signalled_run(job: Path, out: Path, sig: int) -> tuple[dict[str, str], str]:
    """Start a run, send `sig` right after its first commit; (what is committed, its stderr)."""
    p = subprocess.Popen(cli(job), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    wait_for_chunks(out, 0, p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err
    return snapshot(out), err


def test_kill_9_right_after_a_commit_three_times_then_resume_gives_the_uninterrupted_rows(
        tmp_path: Path, tiny_model_dir: Path, reference: pa.Table) -> None:
    job, out = write_job(tmp_path, tiny_model_dir, **JOB), tmp_path / "out"
    seen = 0
    for _ in range(3):
        p = subprocess.Popen(cli(job), env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        seen = wait_for_chunks(out, seen, p)  # this run committed a chunk of its own ...
        assert p.poll() is None  # ... and is still working
        p.send_signal(signal.SIGKILL)
        p.wait()
        kept = chunk_rows(out)
        assert 0 < kept.num_rows < TOTAL  # the kill landed after a commit, before the end
        assert len(set(kept["input_row"].to_pylist())) == kept.num_rows
        seen = len(snapshot(out))
    before = snapshot(out)
    resume_and_check(job, out, reference)
    after = snapshot(out)
    assert all(after[name] == digest for name, digest in before.items())  # committed: untouched


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_cleanly_then_the_rerun_completes_exactly_once(
        tmp_path: Path, tiny_model_dir: Path, reference: pa.Table, sig: int) -> None:
    job, out = write_job(tmp_path, tiny_model_dir, **JOB), tmp_path / "out"
    _, err = signalled_run(job, out, sig)
    assert f"stopped by signal {int(sig)}" in err and f"resume with: batchllm run {job}" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["rows"] < TOTAL
    assert_no_partial_files(out)
    resume_and_check(job, out, reference)


def test_a_second_signal_exits_at_once_and_loses_nothing_committed(
        tmp_path: Path, tiny_model_dir: Path, reference: pa.Table) -> None:
    job, out = write_job(tmp_path, tiny_model_dir, **JOB), tmp_path / "out"
    p = subprocess.Popen(cli(job), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    wait_for_chunks(out, 0, p)
    os.kill(p.pid, signal.SIGTERM)  # two different signals: standard signals of one kind merge
    os.kill(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode in (130, 143) and "exiting at once" in err, err
    assert "interrupted:" not in err  # it did not wait for the clean stop
    before = snapshot(out)
    for name in before:
        read_arrow(out / "chunks" / name)
    resume_and_check(job, out, reference)
    after = snapshot(out)
    assert all(after[name] == digest for name, digest in before.items())


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 2 MiB tmpfs mounted for the test, or None where mounting is not permitted."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                           capture_output=True)
    except FileNotFoundError:
        r = None
    if r is None or r.returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_stops_with_a_message_keeps_commits_and_resumes_after_space_is_freed(
        tmp_path: Path, tiny_model_dir: Path, reference: pa.Table, small_fs: Path | None) -> None:
    """Mechanism: a real 2 MiB tmpfs filled up to ~12 KiB, so the run hits ENOSPC after a chunk
    or two of its own. Where mounting is not permitted (not root, no CAP_SYS_ADMIN), the writer's
    BATCHLLM_FAULT_ENOSPC hook raises ENOSPC from the same write path for unit 2's chunks."""
    base = small_fs or tmp_path
    out = base / "out"
    job = write_job(tmp_path, tiny_model_dir, out=out, **JOB)
    first = stopped_run(job, out)
    filler = base / "filler"
    fault = {}
    if small_fs is not None:
        st = os.statvfs(small_fs)
        with open(filler, "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - 12 * 1024))
    else:
        fault = {"BATCHLLM_FAULT_ENOSPC": "unit-000002-*"}
    full = subprocess.run(cli(job), env=env(**fault), capture_output=True, text=True)
    assert full.returncode == 1, full.stderr
    assert "no space left on the device" in full.stderr
    assert "rows are committed and kept" in full.stderr and "resume with: batchllm run" in full.stderr
    now = snapshot(out)
    assert all(now[name] == digest for name, digest in first.items())
    assert_no_partial_files(out)
    assert len(now) < 13  # it stopped: 5 units of 5 rows are at least 15 chunks
    filler.unlink(missing_ok=True)
    resume_and_check(job, out, reference)


def test_a_read_only_output_folder_is_reported_then_resumed_when_writable(
        tmp_path: Path, tiny_model_dir: Path, reference: pa.Table, small_fs: Path | None) -> None:
    """Mechanism: the tmpfs remounted read-only (EROFS binds root too, unlike chmod)."""
    if small_fs is None:
        pytest.skip("mounting a tmpfs is not permitted here; the ENOSPC and EFBIG tests cover "
                    "the write-failure path")
    out = small_fs / "out"
    job = write_job(tmp_path, tiny_model_dir, out=out, **JOB)
    first = stopped_run(job, out)
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    try:
        ro = subprocess.run(cli(job), env=env(), capture_output=True, text=True)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    assert ro.returncode == 2, ro.stderr
    assert f"cannot use output folder {out}" in ro.stderr and "Read-only file system" in ro.stderr
    assert snapshot(out) == first
    resume_and_check(job, out, reference)


def test_a_file_size_limit_fails_the_commit_with_efbig_not_a_signal_death(
        tmp_path: Path, tiny_model_dir: Path, reference: pa.Table) -> None:
    """Mechanism: RLIMIT_FSIZE (ulimit -f) of 1 KiB set in the child, smaller than any chunk; the
    CLI ignores SIGXFSZ so the write fails with EFBIG instead of the kernel killing the run."""
    job, out = write_job(tmp_path, tiny_model_dir, **JOB), tmp_path / "out"
    first = stopped_run(job, out)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    res = subprocess.run(cli(job), env=env(), capture_output=True, text=True, preexec_fn=limit)
    assert res.returncode == 1, res.stderr
    assert "file-size limit" in res.stderr and "resume with" in res.stderr
    assert snapshot(out) == first
    assert_no_partial_files(out)
    resume_and_check(job, out, reference)


def test_a_live_lock_refuses_a_second_run_and_a_killed_holders_lock_is_taken_over(
        tmp_path: Path, tiny_model_dir: Path, reference: pa.Table) -> None:
    job, out = write_job(tmp_path, tiny_model_dir, **JOB), tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from batchllm.jobs.checkpoint import FolderLock\n"
         f"with FolderLock(Path({str(out)!r})):\n    print('locked', flush=True); sys.stdin.read()"],
        env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = subprocess.run(cli(job), env=env(), capture_output=True, text=True)
        assert refused.returncode == 2
        assert f"in use by another batchllm run (pid {holder.pid})" in refused.stderr
        assert not (out / "chunks").exists()  # refused before touching anything
    finally:
        holder.kill()
        holder.wait()
    err = resume_and_check(job, out, reference)
    assert f"took over a stale lock left by pid {holder.pid}" in err


ENGINE_FAULT = """
import batchllm.engine as e
real, calls = e.LLMEngine.step, [0]
def step(self):
    calls[0] += 1
    if calls[0] > 30:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return real(self)
e.LLMEngine.step = step
from batchllm.cli import app
app(prog_name="batchllm")
"""


def test_an_engine_that_raises_from_step_commits_what_is_done_and_names_the_error(
        tmp_path: Path, tiny_model_dir: Path, reference: pa.Table) -> None:
    """Mechanism: the real CLI and engine, with LLMEngine.step patched to raise from step 31 on."""
    job, out = write_job(tmp_path, tiny_model_dir, **JOB), tmp_path / "out"
    res = subprocess.run([sys.executable, "-c", ENGINE_FAULT, "run", str(job), "-q"], env=env(),
                         capture_output=True, text=True)
    assert res.returncode == 1, res.stderr
    assert "the engine failed during a step" in res.stderr
    assert "RuntimeError: CUDA error: an illegal memory access" in res.stderr
    assert f"resume with: batchllm run {job}" in res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and 0 < summary["rows"] < TOTAL
    assert f"{summary['rows']} of {TOTAL} rows are committed" in res.stderr
    resume_and_check(job, out, reference)
