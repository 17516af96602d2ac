"""The batchllm CLI: typer CliRunner for validate/run/inspect/finalize, and real subprocesses."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchllm.cli import app
from tests.cli.helpers import ROOT, cli, env, final_rows, write_job


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


@pytest.mark.slow
def test_bad_input_exits_2_from_a_real_subprocess(tmp_path: Path, tiny_model_dir: Path) -> None:
    job = write_job(tmp_path, tiny_model_dir)
    res = subprocess.run(cli(job, "--set", "input.path=/no/such/file.jsonl"), env=env(),
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
