"""CLI basics a new user meets: --version, readable help, validate naming a missing device,
finalize --format."""
from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

import batchllm
from batchllm.cli import app
from tests.cli.helpers import write_job


def test_version_and_help_without_python_type_names() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"batchllm {batchllm.__version__}"
    for command in ("run", "validate", "inspect", "finalize"):
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "120"}).output
        assert "list[str]" not in text and "<int" not in text, text
    run_help = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "120"}).output
    assert "KEY=VALUE" in run_help and "JOB.yaml" in run_help


def test_validate_names_a_cuda_device_this_machine_lacks(tmp_path: Path, tiny_model_dir: Path,
                                                         monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    job = write_job(tmp_path, tiny_model_dir)
    res = CliRunner().invoke(app, ["validate", str(job), "--set", "engine.device=cuda"])
    assert res.exit_code == 2 and "engine.device='cuda'" in res.output
    assert "no CUDA device" in res.output and "Traceback" not in res.output


def test_finalize_format_parquet(tmp_path: Path, tiny_model_dir: Path) -> None:
    job = write_job(tmp_path, tiny_model_dir, rows=3)
    runner = CliRunner()
    assert runner.invoke(app, ["run", str(job), "-q"]).exit_code == 0
    res = runner.invoke(app, ["finalize", str(tmp_path / "out"), "--format", "both"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out" / "final").iterdir()) == [
        "00000-in.arrow", "00000-in.parquet"]
    bad = runner.invoke(app, ["finalize", str(tmp_path / "out"), "--format", "csv"])
    assert bad.exit_code == 1 and "not one of arrow, parquet, both" in bad.output
