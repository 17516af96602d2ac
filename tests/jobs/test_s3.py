"""Jobs on object storage: input and output on a real S3-protocol server on localhost (moto in
server mode, authentication on), reached as a user would: `batchllm run` with the standard AWS
variables, pyarrow's S3FileSystem inside. Killed mid-run, rerun: every row exactly once."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pytest

from batchllm.jobs import run_job
from batchllm.jobs.finalize import finalize
from tests.cli.helpers import TIMINGS, chunk_rows, cli, env, write_job
from tests.s3_server import S3Server, moto_server

pytest.importorskip("moto")
pytestmark = pytest.mark.slow  # a server and `batchllm run` subprocesses

JOB = dict(rows=59, max_tokens=8, unit_rows=6, max_num_seqs=2)  # 60 rows, 10 units
TOTAL = 60


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    yield from moto_server()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    """The job's rows written to a local folder."""
    folder = tmp_path_factory.mktemp("reference")
    run_job(write_job(folder, tiny_model_dir, **JOB))
    return chunk_rows(folder / "out")


def s3_job(tmp_path: Path, model: Path, s3: S3Server, bucket: str, **extra: object) -> Path:
    """The helpers' job with its input uploaded to s3://bucket/in/ and its output there too."""
    job = write_job(tmp_path, model, **JOB)
    fs = s3.filesystem()
    fs.create_dir(bucket)
    with fs.open_output_stream(f"{bucket}/in/in.jsonl") as f:
        f.write((tmp_path / "in.jsonl").read_bytes())
    text = job.read_text().replace(str(tmp_path / "in.jsonl"), f"s3://{bucket}/in/in.jsonl")
    job.write_text(text.replace(str(tmp_path / "out"), f"s3://{bucket}/out"))
    return job


def s3_rows(s3: S3Server, bucket: str) -> pa.Table:
    """Every committed row, read back from the bucket, without timings (as chunk_rows does)."""
    t = s3.rows(f"{bucket}/out")
    assert set(t["input_file"].to_pylist()) == {f"s3://{bucket}/in/in.jsonl"}
    return t.drop_columns(TIMINGS + ["input_file"])


def test_a_job_on_s3_killed_mid_run_resumes_and_writes_every_row_exactly_once(
        s3: S3Server, tmp_path: Path, tiny_model_dir: Path, reference: pa.Table,
        monkeypatch: pytest.MonkeyPatch) -> None:
    job = s3_job(tmp_path, tiny_model_dir, s3, "resume")
    p = subprocess.Popen(cli(job), env=env(**s3.env()), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while len(s3.chunks("resume/out")) < 3:
        assert p.poll() is None, p.communicate()[1]
        assert time.monotonic() < deadline, "no chunk reached the bucket"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    partial = len(s3.chunks("resume/out"))
    done = subprocess.run(cli(job), env=env(**s3.env()), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"done: {TOTAL} rows" in done.stdout and "-> s3://resume/out" in done.stdout
    assert "took over the lease of host" in done.stderr  # the killed run's, found gone
    got = s3_rows(s3, "resume")
    assert len(s3.chunks("resume/out")) > partial
    assert got["id"].to_pylist() == reference["id"].to_pylist()  # none lost, none twice
    assert got.equals(reference)
    summary = json.loads(s3.filesystem().open_input_stream("resume/out/summary.json").read())
    assert summary["status"] == "complete" and summary["rows"] == TOTAL
    assert summary["this_run"]["rows"] < TOTAL  # the rerun did only what was left
    record = json.loads(s3.filesystem().open_input_stream("resume/out/job.json").read())
    assert record["details"]["inputs"][0]["file"] == "s3://resume/in/in.jsonl"
    assert not s3.filesystem().get_file_info("resume/out/.lease").is_file  # released
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    assert finalize("s3://resume/out") == ["s3://resume/out/final/00000-in.arrow"]
    with s3.filesystem().open_input_file("resume/out/final/00000-in.arrow") as f:
        assert pa.ipc.open_file(f).read_all()["id"].to_pylist() == reference["id"].to_pylist()


def test_a_second_run_on_the_same_output_is_refused_then_takes_over_when_asked(
        s3: S3Server, tmp_path: Path, tiny_model_dir: Path) -> None:
    job = s3_job(tmp_path, tiny_model_dir, s3, "busy")
    with s3.filesystem().open_output_stream("busy/out/.lease") as f:  # a live run elsewhere
        f.write(json.dumps({"token": "t", "host": "other-host", "pid": 7,
                            "heartbeat": time.time()}).encode())
    refused = subprocess.run(cli(job), env=env(**s3.env()), capture_output=True, text=True)
    assert refused.returncode == 2, refused.stderr
    assert "in use by another batchllm run (host other-host, pid 7" in refused.stderr
    assert "--take-over" in refused.stderr
    taken = subprocess.run(cli(job, "--take-over"), env=env(**s3.env()), capture_output=True,
                           text=True, timeout=300)
    assert taken.returncode == 0, taken.stderr
    assert "took over the lease of host other-host, pid 7" in taken.stderr


@pytest.mark.parametrize("case", ["no output bucket", "no input bucket", "bad credentials"])
def test_a_missing_bucket_or_bad_credentials_fail_with_exit_2_before_any_work(
        s3: S3Server, tmp_path: Path, tiny_model_dir: Path, case: str) -> None:
    job = s3_job(tmp_path, tiny_model_dir, s3, "present")
    text, variables = job.read_text(), s3.env()
    if case == "no output bucket":
        text, expected = text.replace("s3://present/out", "s3://absent/out"), \
            "bucket 'absent' does not exist"
    elif case == "no input bucket":
        text, expected = text.replace("s3://present/in", "s3://missing/in"), \
            "bucket 'missing' does not exist"
    else:
        variables["AWS_SECRET_ACCESS_KEY"], expected = "wrong", "access denied"
    job.write_text(text)
    p = subprocess.run(cli(job), env=env(**variables), capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert expected in p.stderr
    assert not s3.filesystem().get_file_info("present/out/job.json").is_file  # nothing began
