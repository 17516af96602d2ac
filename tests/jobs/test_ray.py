"""engine.executor: ray on one local Ray cluster (2 CPUs, shared by this module's tests): replicas
are real actors running the tiny random model. Each finished job is compared, row by row and by
id, with a run of the local executor, so a row lost, written twice or changed shows up."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from batchllm.jobs import run_job
from batchllm.jobs.checkpoint import fingerprint, job_details
from batchllm.jobs.errors import EngineFailed, JobSpecError
from batchllm.jobs.executors.ray_executor import ACTOR_PREFIX
from batchllm.jobs.prepare import plan_job
from batchllm.jobs.spec import load_spec, spec_to_dict
from tests.cli.helpers import TIMINGS, chunk_rows, cli, env, wait_for_chunks, write_job
from tests.s3_server import S3Server, moto_server

ray = pytest.importorskip("ray")

JOB = dict(rows=79, max_tokens=8, unit_rows=6, max_num_seqs=2)  # 80 rows, 14 units
TOTAL = 80
RAY2 = {"engine.executor": "ray", "engine.data_parallel_size": 2}
pytestmark = pytest.mark.slow  # actors are processes


@pytest.fixture(scope="module")
def cluster() -> str:
    """One local Ray cluster for the module (2 CPUs, on the loopback address); its address."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    """The rows of the job run by the local executor."""
    folder = tmp_path_factory.mktemp("reference")
    run_job(write_job(folder, tiny_model_dir, **JOB))
    return chunk_rows(folder / "out")


@pytest.fixture(scope="module")
def s3() -> S3Server:
    pytest.importorskip("moto")
    yield from moto_server()


def summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


def in_thread(job: Path, **overrides: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """run_job in a thread; the dict gets its `result`, `error` and `notices`."""
    box: dict[str, Any] = {"notices": []}

    def go() -> None:
        try:
            box["result"] = run_job(job, on_notice=box["notices"].append, **overrides)
        except BaseException as e:  # noqa: BLE001 - the test reads it
            box["error"] = e

    t = threading.Thread(target=go)
    t.start()
    return t, box


def replica_actors(count: int, timeout: float = 120) -> list[tuple[Any, int]]:
    """(actor handle, pid) of the running job's replicas, once `count` of them have started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = sorted(n for n in ray.util.list_named_actors() if n.startswith(ACTOR_PREFIX))
        if len(names) >= count:
            actors = [ray.get_actor(n) for n in names[-count:]]
            return [(a, ray.get(a.start.remote())["pid"]) for a in actors]
        time.sleep(0.05)
    raise AssertionError(f"{count} replica actors did not start within {timeout}s")


def reading_input(pid: int, src: Path) -> bool:
    """Whether the replica has the input open (it holds a unit it is reading)."""
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) == str(src):
                return True
        except OSError:
            pass  # closed meanwhile
    return False


def kill_a_busy_replica(actors: list[tuple[Any, int]], src: Path) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for actor, pid in actors:
            if reading_input(pid, src):
                ray.kill(actor, no_restart=True)
                return pid
        time.sleep(0.005)
    raise AssertionError("no replica was reading the input")


def test_the_keys_are_checked_and_stay_out_of_the_fingerprint(tmp_path: Path,
                                                               tiny_model_dir: Path) -> None:
    job = write_job(tmp_path, tiny_model_dir)
    with pytest.raises(JobSpecError, match=r"engine.executor='rai' is invalid.*Did you mean 'ray'"):
        load_spec(job, {"engine.executor": "rai"})
    with pytest.raises(JobSpecError, match=r"unknown key 'ray.adress'. Did you mean 'ray.address'"):
        load_spec(job, {"ray": {"adress": "auto"}})
    with pytest.raises(JobSpecError, match=r"ray.num_cpus='two' is invalid: expected a number"):
        load_spec(job, {"ray.num_cpus": "two"})
    with pytest.raises(JobSpecError, match=r"ray.max_unit_retries=-1 is invalid"):
        load_spec(job, {"ray.max_unit_retries": -1})
    with pytest.raises(JobSpecError, match=r"engine.device='cuda:1' pins a GPU"):
        load_spec(job, {**RAY2, "engine.device": "cuda:1"})
    local = plan_job(load_spec(job))
    on_ray = plan_job(load_spec(job, {**RAY2, "ray": {"address": "ray://head:10001",
                                                      "num_cpus": 2}}))
    assert on_ray.spec.executor == "ray" and "executor" not in on_ray.spec.engine
    assert on_ray.spec.ray.address == "ray://head:10001" and on_ray.spec.ray.num_cpus == 2
    again = load_spec(spec_to_dict(on_ray.spec))  # round-trips
    assert again.executor == "ray" and again.ray == on_ray.spec.ray
    assert (fingerprint(job_details(local.spec, local.shards))
            == fingerprint(job_details(on_ray.spec, on_ray.shards)))  # a job may move to Ray


def test_two_ray_replicas_write_exactly_the_local_executors_rows(
        cluster: str, tmp_path: Path, tiny_model_dir: Path, reference: pa.Table) -> None:
    job = write_job(tmp_path, tiny_model_dir, **JOB)
    result = run_job(job, **RAY2)
    got = chunk_rows(tmp_path / "out")
    assert got["id"].to_pylist() == reference["id"].to_pylist()  # none lost, none twice
    assert got.equals(reference)
    s = result.summary
    assert s["status"] == "complete" and s["rows"] == TOTAL and s["this_run"]["rows"] == TOTAL
    workers = s["data_parallel"]["workers"]
    assert [(w["executor"], w["status"], w["device"]) for w in workers] == [
        ("ray", "finished", "cpu")] * 2
    assert all(w["units"] and w["rows"] > 0 for w in workers), workers  # both did work
    assert sorted(u for w in workers for u in w["units"]) == list(range(14))
    assert os.getpid() not in {w["pid"] for w in workers}  # actors, not this process
    assert not [n for n in ray.util.list_named_actors() if n.startswith(ACTOR_PREFIX)]


def test_ray_replicas_commit_to_s3_with_the_drivers_credentials(
        cluster: str, s3: S3Server, tmp_path: Path, tiny_model_dir: Path, reference: pa.Table,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3.env().items():  # the driver's environment only: actors lack them
        monkeypatch.setenv(key, value)
    job = write_job(tmp_path, tiny_model_dir, **JOB)
    result = run_job(job, **RAY2, **{"output.path": f"s3://{s3.bucket('ray')}/out"})
    assert result.output_path == "s3://ray/out" and result.summary["rows"] == TOTAL
    got = s3.rows("ray/out").drop_columns(TIMINGS + ["input_file"])
    assert got["id"].to_pylist() == reference["id"].to_pylist()
    assert got.equals(reference)
    workers = result.summary["data_parallel"]["workers"]
    assert all(w["rows"] > 0 for w in workers), workers  # both actors wrote there


def test_a_replica_actor_killed_mid_job_loses_nothing_and_duplicates_nothing(
        cluster: str, tmp_path: Path, tiny_model_dir: Path, reference: pa.Table) -> None:
    job, out = write_job(tmp_path, tiny_model_dir, **JOB), tmp_path / "out"
    thread, box = in_thread(job, **RAY2)
    victim = kill_a_busy_replica(replica_actors(2), tmp_path / "in.jsonl")
    thread.join(300)
    assert "error" not in box, box.get("error")
    got = chunk_rows(out)
    assert got["id"].to_pylist() == reference["id"].to_pylist()
    assert got.equals(reference)
    workers = summary(out)["data_parallel"]["workers"]
    (died,) = [w for w in workers if w["pid"] == victim]
    assert died["status"].startswith("died: ") and died["requeued"], workers
    assert any("go back to the queue" in n and "retry 1 of 3" in n for n in box["notices"])
    assert box["result"].summary["status"] == "complete"


def test_a_unit_lost_more_often_than_max_unit_retries_fails_the_job_keeping_its_rows(
        cluster: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    job, out = write_job(tmp_path, tiny_model_dir, **JOB), tmp_path / "out"
    thread, box = in_thread(job, **RAY2, **{"ray.max_unit_retries": 0})
    actors = replica_actors(2)
    wait_for_chunks(out, 0, _Alive(thread))
    kill_a_busy_replica(actors, tmp_path / "in.jsonl")
    thread.join(300)
    error = box.get("error")
    assert isinstance(error, EngineFailed), error
    assert "was lost with its replica 1 times (ray.max_unit_retries: 0" in str(error)
    assert "rerun the same command to resume" in str(error)
    s = summary(out)
    assert s["status"] == "failed" and error.committed == (s["rows"], TOTAL)
    assert chunk_rows(out).num_rows == s["rows"] > 0  # what was committed is kept


def test_when_every_replica_is_lost_the_run_fails_saying_so_and_keeps_its_rows(
        cluster: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    job, out = write_job(tmp_path, tiny_model_dir, **JOB), tmp_path / "out"
    thread, box = in_thread(job, **RAY2)
    actors = replica_actors(2)
    wait_for_chunks(out, 1, _Alive(thread))
    for actor, _ in actors:
        ray.kill(actor, no_restart=True)
    thread.join(300)
    error = box.get("error")
    assert isinstance(error, EngineFailed), error
    assert "all 2 Ray replicas are gone" in str(error) and "died: " in str(error)
    s = summary(out)
    assert s["status"] == "failed" and 0 < s["rows"] < TOTAL
    assert [w["status"].split(":")[0] for w in s["data_parallel"]["workers"]] == ["died"] * 2


class _Alive:
    """A thread seen as wait_for_chunks' process (poll() is None while it runs)."""

    def __init__(self, thread: threading.Thread) -> None:
        self.thread, self.returncode = thread, None

    def poll(self) -> int | None:
        return None if self.thread.is_alive() else 0


def test_killing_the_driver_and_rerunning_resumes_every_row_once(
        cluster: str, tmp_path: Path, tiny_model_dir: Path, reference: pa.Table) -> None:
    job, out = write_job(tmp_path, tiny_model_dir, **JOB), tmp_path / "out"
    sets = ["--set", "engine.executor=ray", "--set", "engine.data_parallel_size=2",
            "--set", f"ray.address={cluster}"]
    driver = subprocess.Popen(cli(job, *sets), env=env(RAY_USAGE_STATS_ENABLED="0"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_chunks(out, 2, driver, timeout=180)
    driver.send_signal(signal.SIGKILL)
    driver.communicate(timeout=60)
    assert chunk_rows(out).num_rows < TOTAL
    rerun = subprocess.run(cli(job, *sets), env=env(RAY_USAGE_STATS_ENABLED="0"),
                           capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr
    assert f"done: {TOTAL} rows" in rerun.stdout and "over 2 engine replicas" in rerun.stdout
    got = chunk_rows(out)
    assert got["id"].to_pylist() == reference["id"].to_pylist()
    assert got.equals(reference)
    assert summary(out)["this_run"]["rows"] < TOTAL  # the rerun did only what was left


def test_without_ray_the_job_fails_before_loading_anything_saying_how_to_install_it(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    job = write_job(tmp_path, tiny_model_dir)
    code = ("import sys; sys.modules['ray'] = None; from batchllm.cli import main; "
            f"sys.argv = ['batchllm', 'run', {str(job)!r}, '--set', 'engine.executor=ray']; main()")
    p = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert "engine.executor: ray needs Ray" in p.stderr
    assert 'pip install "batchllm[ray]"' in p.stderr
    assert not (tmp_path / "out").exists()  # nothing was started
