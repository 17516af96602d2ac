"""report.html: written at the end of every run, its plots and figures there (rendered by headless
Chromium where it is installed; CI installs it), and a job that runs on without matplotlib."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from batchllm.jobs import run_job
from batchllm.jobs.executor import StopSignal
from batchllm.jobs.report import REPORT, _count_errors
from tests.jobs.helpers import job, write_jsonl
from tests.jobs.stream_engine import StreamEngine

PLOTS = {"throughput": "Throughput: output tokens per second", "kv-batch": "KV-cache use",
         "preemptions-prefix": "Preemptions (cumulative, per run)",
         "prompt-lengths": "Prompt length (tokens)", "output-lengths": "Output length (tokens)",
         "finish-reasons": "Finish reasons", "errors": "Error rows by message"}


@pytest.fixture(scope="module")
def two_run_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A job of 60 rows (12 with an empty prompt), stopped once and resumed."""
    tmp = tmp_path_factory.mktemp("report")
    rows = [{"prompt": "word " * (1 + i % 9), "max_tokens": 2 + i % 6} if i % 5 else
            {"prompt": ""} for i in range(60)]
    spec = job(write_jsonl(tmp / "in.jsonl", rows), tmp / "out",
               output={"unit_rows": 10, "chunk_rows": 5})
    stop = StopSignal()

    def interrupt(engine: StreamEngine) -> None:
        if engine.steps == 30:
            stop.signum = 2

    try:
        run_job(spec, engine=StreamEngine(max_running=4, step_s=0.05, on_step=interrupt),
                stop=stop)
    except Exception:
        pass
    assert (tmp / "out" / REPORT).exists()  # an interrupted run writes it too
    run_job(spec, engine=StreamEngine(max_running=4, step_s=0.05))
    return tmp / "out"


def test_report_holds_every_plot_with_its_title_and_the_figures(two_run_job: Path) -> None:
    page = (two_run_job / REPORT).read_text()
    for key, title in PLOTS.items():
        m = re.search(rf'<figure class="plot" id="plot-{key}">(.*?)</figure>', page, re.S)
        assert m, key
        assert "<svg" in m.group(1) and f">{title}<" in m.group(1), key
    assert "resumed run starts" in page  # two runs on the time axis
    assert re.search(r"<th>rows</th><td class=n>60</td>", page)
    assert re.search(r"<th>error rows</th><td class=n>12</td>", page)
    assert re.search(r"<tr><td class=n>12</td><td>line \d+ of \S*in.jsonl: [^<]*empty", page)
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # nothing loaded from outside


def test_error_messages_group_by_everything_but_their_numbers() -> None:
    errors: dict = {}
    _count_errors(errors, pa.chunked_array([["line 12 of in.jsonl: prompt has 9000 tokens",
                                             "line 3 of a.jsonl: prompt is empty"],
                                            ["line 3 of in.jsonl: prompt has 8193 tokens"]]))
    assert errors == {"line # of in.jsonl: prompt has # tokens":
                      [2, "line 12 of in.jsonl: prompt has 9000 tokens"],
                      "line # of a.jsonl: prompt is empty": [1, "line 3 of a.jsonl: prompt is empty"]}


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow  # a browser subprocess
@pytest.mark.skipif(_chromium() is None and not os.environ.get("CI"),
                    reason="chromium is not installed (apt-get install -y chromium); CI runs this")
def test_report_renders_in_headless_chromium(two_run_job: Path, tmp_path: Path) -> None:
    browser = _chromium()
    assert browser is not None, "CI must have chromium: .ci/run installs it"
    res = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr",
         "--dump-dom", (two_run_job / REPORT).as_uri()],
        capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    # the page's own check ran (no script error stopped it) and found every plot laid out
    assert f'data-plots-rendered="{len(PLOTS)}/{len(PLOTS)}"' in dom, res.stderr[-2000:]
    assert "Uncaught" not in res.stderr
    for title in PLOTS.values():
        assert f">{title}<" in dom


def test_a_job_without_matplotlib_runs_and_says_how_to_get_the_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    notes: list[str] = []
    r = run_job(job(src, tmp_path / "out"), engine=StreamEngine(), on_notice=notes.append)
    assert r.summary["rows"] == 2 and r.summary["status"] == "complete"
    assert any('needs matplotlib, which is not installed; pip install "batchllm[report]"' in n
               and f"batchllm report {tmp_path / 'out'}" in n for n in notes), notes
    assert not (tmp_path / "out" / REPORT).exists()
