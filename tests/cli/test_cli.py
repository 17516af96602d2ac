"""The batchllm CLI: typer CliRunner for validate/run/inspect/finalize, and real subprocesses."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from batchllm.cli import app
from batchllm.io.writers import read_arrow

ROOT = Path(__file__).resolve().parents[2]
TIMINGS = ["time_queued_s", "time_to_first_token_s", "time_total_s"]


def write_job(tmp_path: Path, model: Path | str, rows: int = 6, **extra: str) -> Path:
    src = tmp_path / "in.jsonl"
    with open(src, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": f"r{i}", "prompt": f"the cat {i} sat on the mat"}) + "\n")
        f.write("{not json\n")
    job = tmp_path / "job.yaml"
    job.write_text(f"""model: {model}
input: {{path: {src}, id_column: id}}
output: {{path: {tmp_path / 'out'}, unit_rows: {extra.get('unit_rows', 4)}, chunk_rows: 2}}
sampling: {{max_tokens: {extra.get('max_tokens', 4)}, temperature: 0.0}}
engine: {{device: cpu, max_num_seqs: {extra.get('max_num_seqs', 8)}}}
""")
    return job


def final_rows(out: Path) -> pa.Table:
    (path,) = [p for p in (out / "final").glob("*.arrow")]
    return read_arrow(path).drop_columns(TIMINGS)


def test_validate_reports_ok_or_names_the_bad_key_with_exit_code_2(tmp_path: Path,
                                                                   tiny_model_dir: Path) -> None:
    job = write_job(tmp_path, tiny_model_dir)
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(job)])
    assert ok.exit_code == 0 and "7 rows" in ok.output
    bad = runner.invoke(app, ["validate", str(job), "--set", "sampling.max_tokenz=3"])
    assert bad.exit_code == 2 and "Did you mean 'sampling.max_tokens'" in bad.output
    col = runner.invoke(app, ["validate", str(job), "--set", "input.prompt_column=question"])
    assert col.exit_code == 2 and "no column 'question'" in col.output
    model = runner.invoke(app, ["validate", str(job), "--set", f"model={tmp_path / 'nope'}"])
    assert model.exit_code == 2 and "nope" in model.output


def test_run_inspect_finalize_with_the_real_engine(tmp_path: Path, tiny_model_dir: Path) -> None:
    job = write_job(tmp_path, tiny_model_dir)
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(job), "-q"])
    assert res.exit_code == 0, res.output
    assert "7 rows (1 errors" in res.output
    again = runner.invoke(app, ["run", str(job), "-q", "--finalize"])  # nothing left to do
    assert again.exit_code == 0 and "wrote" in again.output
    t = final_rows(tmp_path / "out")
    assert t["id"].to_pylist() == [f"r{i}" for i in range(6)] + ["in-6"]
    assert t["num_output_tokens"].to_pylist()[:6] == [4] * 6
    assert "malformed JSON" in t["error"][6].as_py()
    shown = runner.invoke(app, ["inspect", str(tmp_path / "out")])
    assert shown.exit_code == 0 and "rows_total" in shown.output and "r0" in shown.output
    refused = runner.invoke(app, ["run", str(job), "-q", "--set", "sampling.max_tokens=5"])
    assert refused.exit_code == 2 and "different job" in refused.output
    over = runner.invoke(app, ["run", str(job), "-q", "--overwrite", "--set",
                               "sampling.max_tokens=5"])
    assert over.exit_code == 0


def _cli(job: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "batchllm.cli", "run", str(job), "-q", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_outputs(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir(), run_dir.mkdir()
    kw = dict(rows=24, max_tokens=8, unit_rows=5)
    ref_job, job = write_job(ref_dir, tiny_model_dir, **kw), write_job(run_dir, tiny_model_dir, **kw)
    t0 = time.monotonic()
    subprocess.run(_cli(ref_job, "--finalize"), env=_env(), check=True, capture_output=True)
    full = time.monotonic() - t0
    rng = random.Random(0)
    for _ in range(3):
        p = subprocess.Popen(_cli(job), env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.0) * full)
        p.send_signal(signal.SIGKILL)
        p.wait()
    done = subprocess.run(_cli(job, "--finalize"), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    got, want = final_rows(run_dir / "out"), final_rows(ref_dir / "out")
    assert got["input_row"].to_pylist() == list(range(25))
    assert got.drop_columns(["input_file"]).equals(want.drop_columns(["input_file"]))


@pytest.mark.slow
def test_sigint_stops_cleanly_with_130_and_the_rerun_completes(tmp_path: Path,
                                                                tiny_model_dir: Path) -> None:
    job = write_job(tmp_path, tiny_model_dir, rows=24, max_tokens=8, max_num_seqs=2)
    p = subprocess.Popen(_cli(job), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    chunks = tmp_path / "out" / "chunks"
    deadline = time.monotonic() + 120
    while not list(chunks.glob("*.arrow")) and time.monotonic() < deadline:
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("the job finished before the signal arrived")
    assert p.returncode == 130 and "resume with: batchllm run" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    done = subprocess.run(_cli(job), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0 and "25 rows" in done.stdout


@pytest.mark.slow
def test_bad_input_exits_2_from_a_real_subprocess(tmp_path: Path, tiny_model_dir: Path) -> None:
    job = write_job(tmp_path, tiny_model_dir)
    res = subprocess.run(_cli(job, "--set", "input.path=/no/such/file.jsonl"), env=_env(),
                         capture_output=True, text=True)
    assert res.returncode == 2 and "/no/such/file.jsonl" in res.stderr


@pytest.mark.slow
def test_quickstart_job_end_to_end_with_the_default_model(tmp_path: Path, smollm2_dir: Path,
                                                          monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    res = CliRunner().invoke(app, ["run", "jobs/quickstart.yaml", "-q", "--finalize", "--set",
                                   f"output.path={tmp_path / 'qs'}", "--set",
                                   f"model={smollm2_dir}"])
    assert res.exit_code == 0, res.output
    t = final_rows(tmp_path / "qs")
    prompts = [json.loads(x)["prompt"] for x in (ROOT / "sample_data/prompts.jsonl").open()]
    assert t["id"].to_pylist() == [f"q{i}" for i in range(len(prompts))]
    assert t["error"].null_count == len(prompts)
    capital = t["text"][0].as_py()
    assert "Paris" in capital  # "What is the capital of France?"
