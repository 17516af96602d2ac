"""`batchllm report OUT`: writes report.html again, refuses a folder that holds no job, and says
how to install matplotlib when it is missing."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchllm.cli import app
from batchllm.jobs import run_job
from tests.jobs.helpers import job, write_jsonl
from tests.jobs.stream_engine import StreamEngine


@pytest.fixture()
def done_job(tmp_path: Path) -> Path:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(6)])
    run_job(job(src, tmp_path / "out"), engine=StreamEngine(step_s=0.01))
    return tmp_path / "out"


def test_report_command_writes_the_report_again(done_job: Path) -> None:
    (done_job / "report.html").unlink()
    res = CliRunner().invoke(app, ["report", str(done_job)])
    assert res.exit_code == 0, res.output
    assert f"wrote {done_job / 'report.html'}" in res.output
    page = (done_job / "report.html").read_text()
    assert 'id="plot-output-lengths"' in page and "<svg" in page


def test_report_command_refuses_a_folder_without_a_job(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "not a batchllm output folder" in res.output


def test_report_command_without_matplotlib_says_how_to_install_it(
        done_job: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = CliRunner().invoke(app, ["report", str(done_job)])
    assert res.exit_code == 1
    assert 'pip install "batchllm[report]"' in res.output
