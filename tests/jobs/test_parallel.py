"""Data-parallel jobs (engine.data_parallel_size): real worker processes on CPU, tiny random model.

Each finished job is compared, row by row and by id, with one single-engine run of the same job,
so a row lost, written twice or changed by the replicas (or by a fault) shows up.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pytest

from batchllm.jobs import run_job
from batchllm.jobs.checkpoint import fingerprint, job_details
from batchllm.jobs.errors import EngineFailed, JobSpecError
from batchllm.jobs.prepare import plan_job
from batchllm.jobs.spec import load_spec, spec_to_dict
from tests.cli.helpers import chunk_rows, cli, env, wait_for_chunks, write_job
from tests.jobs.fake_engine import FakeEngine
from tests.jobs.helpers import job, write_jsonl

# 80 rows (the last a malformed line), 14 units of 6 rows, 2-row chunks. Both replicas get units
# however unevenly their engines load: the unit queue keeps one unit for a replica still loading.
JOB = dict(rows=79, max_tokens=8, unit_rows=6, max_num_seqs=2)
TOTAL, UNITS = 80, 14
DP2 = "engine.data_parallel_size=2"


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    """The rows of one single-engine run of the job (data_parallel_size 1, the default)."""
    folder = tmp_path_factory.mktemp("reference")
    result = run_job(write_job(folder, tiny_model_dir, **JOB))
    assert "data_parallel" not in result.summary
    t = chunk_rows(folder / "out")
    assert t["id"].to_pylist() == [f"r{i}" for i in range(TOTAL - 1)] + [f"in-{TOTAL - 1}"]
    return t


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def worker_pids(parent: int) -> list[int]:
    """The parent's data-parallel worker processes (spawned children, not the resource tracker)."""
    pids = []
    for task in Path(f"/proc/{parent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in cmd:
                pids.append(int(pid))
    return sorted(pids)


def reading_input(pid: int, src: Path) -> bool:
    """Whether the worker has the input file open (it holds a unit it is reading)."""
    try:
        return any(os.readlink(f) == str(src) for f in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_the_setting_is_validated_and_not_part_of_the_job_fingerprint(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    job = write_job(tmp_path, tiny_model_dir)
    for bad in (0, -1, "two", 1.5, True):
        with pytest.raises(JobSpecError, match="engine.data_parallel_size"):
            load_spec(job, {"engine.data_parallel_size": bad})
    one = plan_job(load_spec(job))
    auto = plan_job(load_spec(job, {"engine.data_parallel_size": "auto"}))
    assert auto.spec.data_parallel_size == "auto" and "data_parallel_size" not in auto.spec.engine
    assert spec_to_dict(auto.spec)["engine"]["data_parallel_size"] == "auto"  # round-trips
    assert (fingerprint(job_details(one.spec, one.shards))
            == fingerprint(job_details(auto.spec, auto.shards)))


def test_two_replicas_give_exactly_the_single_engine_rows_and_share_the_units(
        tmp_path: Path, tiny_model_dir: Path, reference: pa.Table) -> None:
    job = write_job(tmp_path, tiny_model_dir, **JOB)
    result = run_job(job, **{"engine.data_parallel_size": 2})
    got = chunk_rows(tmp_path / "out")
    assert got["id"].to_pylist() == reference["id"].to_pylist()  # no row lost or duplicated
    assert got.equals(reference)
    s = result.summary
    assert s["status"] == "complete" and s["rows"] == TOTAL and s["this_run"]["rows"] == TOTAL
    workers = s["data_parallel"]["workers"]
    assert [w["status"] for w in workers] == ["finished", "finished"]
    assert all(w["units"] and w["rows"] > 0 for w in workers), workers  # both did work
    units = sorted(u for w in workers for u in w["units"])
    assert units == list(range(UNITS))  # every unit done once, by one worker
    assert sum(w["output_tokens"] for w in workers) == s["output_tokens"]
    assert len({w["pid"] for w in workers}) == 2 and os.getpid() not in {w["pid"] for w in workers}


def test_kill_9_of_one_worker_mid_run_still_completes_every_row_exactly_once(
        tmp_path: Path, tiny_model_dir: Path, reference: pa.Table) -> None:
    job, out = write_job(tmp_path, tiny_model_dir, **JOB), tmp_path / "out"
    p = subprocess.Popen(cli(job, "--set", DP2), env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for_chunks(out, 2, p)
    deadline = time.monotonic() + 60
    victim = None
    while victim is None and time.monotonic() < deadline:
        victim = next((w for w in worker_pids(p.pid) if reading_input(w, tmp_path / "in.jsonl")),
                      None)
        time.sleep(0.005)
    assert victim is not None, "no worker was reading the input"
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    assert f"done: {TOTAL} rows" in stdout
    assert "go back to the queue" in stderr  # its unit was handed to the other worker
    got = chunk_rows(out)
    assert got["id"].to_pylist() == reference["id"].to_pylist()
    assert got.equals(reference)
    workers = summary(out)["data_parallel"]["workers"]
    died = [w for w in workers if w["pid"] == victim]
    assert died and died[0]["status"] == "died: killed by signal 9", workers


def test_sigterm_to_the_parent_stops_every_worker_and_a_rerun_completes_the_job(
        tmp_path: Path, tiny_model_dir: Path, reference: pa.Table) -> None:
    job, out = write_job(tmp_path, tiny_model_dir, **JOB), tmp_path / "out"
    p = subprocess.Popen(cli(job, "--set", DP2), env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for_chunks(out, 1, p)
    pids = worker_pids(p.pid)
    assert len(pids) == 2
    p.send_signal(signal.SIGTERM)
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted: stopped by signal 15" in stderr and "resume with:" in stderr
    assert not any(alive(pid) for pid in pids)  # no replica outlives the job
    s = summary(out)
    assert s["status"] == "interrupted" and s["rows"] < TOTAL
    done = subprocess.run(cli(job, "--set", DP2), env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"done: {TOTAL} rows" in done.stdout
    got = chunk_rows(out)
    assert got["id"].to_pylist() == reference["id"].to_pylist()
    assert got.equals(reference)
    assert summary(out)["runs"] == 2


def crashing_engine(spec: object) -> FakeEngine:
    """An engine_factory (module level, so a spawned worker can import it) whose step fails."""
    return FakeEngine(fail_at_step=2)


def test_when_every_worker_fails_the_job_fails_naming_the_error_and_how_to_resume(
        tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(12)])
    spec = job(src, tmp_path / "out", output={"unit_rows": 3},
               engine={"data_parallel_size": 2, "device": "cpu"})
    with pytest.raises(EngineFailed) as info:
        run_job(spec, engine_factory=crashing_engine)
    message = str(info.value)
    assert "all 2 data-parallel workers are gone" in message and "fake engine crash" in message
    assert "rerun the same command to resume" in message
    s = summary(tmp_path / "out")
    assert info.value.committed == (s["rows"], 12) and s["rows"] < 12  # finished rows are kept
    assert s["status"] == "failed"
    assert [w["status"].split(":")[0] for w in s["data_parallel"]["workers"]] == ["failed"] * 2


def test_a_shared_engine_object_cannot_be_used_with_several_replicas(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p"}])
    spec = job(src, tmp_path / "out", engine={"data_parallel_size": 2, "device": "cpu"})
    with pytest.raises(JobSpecError, match="one engine per worker process"):
        run_job(spec, engine=FakeEngine())
