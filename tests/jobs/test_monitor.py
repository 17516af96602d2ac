"""A running job's own record: live.json while it runs (what `batchllm inspect` shows),
metrics.jsonl samples across runs, and summary figures a rerun with nothing to do keeps."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from typer.testing import CliRunner

from batchllm.cli import app
from batchllm.jobs import run_job
from batchllm.jobs.executor import StopSignal
from batchllm.jobs.monitor import LIVE, METRICS, live_view
from tests.jobs.helpers import job, write_jsonl
from tests.jobs.stream_engine import StreamEngine


def _spec(tmp_path: Path, rows: int = 40) -> dict:
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"p{i}"} for i in range(rows)])
    return job(src, tmp_path / "out", output={"unit_rows": 8, "chunk_rows": 4})


def test_inspect_shows_live_figures_of_a_running_job_and_how_fresh_they_are(
        tmp_path: Path) -> None:
    out = tmp_path / "out"
    seen: dict[str, object] = {}

    def look(engine: StreamEngine) -> None:
        if engine.steps == 25:  # 1.25 s in: the first figures were written at 0.5 s
            seen["live"] = json.loads((out / LIVE).read_text())
            seen["inspect"] = CliRunner().invoke(app, ["inspect", str(out), "--rows", "0"])

    run_job(_spec(tmp_path), engine=StreamEngine(max_running=2, step_s=0.05, on_step=look))
    live = seen["live"]
    assert live["status"] == "running" and live["pid"] == os.getpid()
    assert live["rows_total"] == 40 and 0 < live["rows_done"] < 40
    assert live["tokens_per_s"] > 0 and time.time() - live["updated_at"] < 60
    shown = seen["inspect"]
    assert shown.exit_code == 0, shown.output
    assert f"live: running (pid {os.getpid()}, run 1), updated" in shown.output
    assert "s ago" in shown.output and "tokens_per_s" in shown.output
    after = CliRunner().invoke(app, ["inspect", str(out), "--rows", "0"])
    assert "last run (1): complete" in after.output
    assert json.loads((out / LIVE).read_text())["rows_done"] == 40


def test_inspect_says_when_the_run_that_wrote_live_figures_is_gone(tmp_path: Path) -> None:
    run_job(_spec(tmp_path, rows=4), engine=StreamEngine())
    out = tmp_path / "out"
    dead = int(Path("/proc/sys/kernel/pid_max").read_text())  # no process has this id
    live = json.loads((out / LIVE).read_text())
    live.update(status="running", pid=int(dead), updated_at=time.time() - 600)
    (out / LIVE).write_text(json.dumps(live))
    heading, figures = live_view(out)
    assert heading.startswith("last live figures, 10 min ago: the run (pid ")
    assert "is gone without finishing; rerun the job to resume" in heading
    assert ("rows_done", "4") in figures


def test_metrics_are_sampled_about_once_a_second_and_appended_across_runs(
        tmp_path: Path) -> None:
    stop = StopSignal()

    def interrupt(engine: StreamEngine) -> None:
        if engine.steps == 45:
            stop.signum = 2

    spec = _spec(tmp_path)
    try:
        run_job(spec, engine=StreamEngine(max_running=2, step_s=0.05, on_step=interrupt), stop=stop)
    except Exception:
        pass
    run_job(spec, engine=StreamEngine(max_running=2, step_s=0.02))
    samples = [json.loads(line) for line in (tmp_path / "out" / METRICS).read_text().splitlines()]
    first = [s for s in samples if s["run"] == 1]
    second = [s for s in samples if s["run"] == 2]
    assert len(first) >= 2 and second, samples  # 45 steps of 50 ms: >= 2 s
    for key in ("t", "elapsed_s", "rows_done", "tokens_per_s", "kv_cache_usage", "num_running",
                "generated_tokens", "preemptions", "prefix_cache_hits", "prefix_cache_queries"):
        assert key in samples[0], key
    ticks = [s["t"] for s in first[:-1]]  # (the last one is written as the run ends)
    assert all(b - a >= 0.99 for a, b in zip(ticks, ticks[1:]))
    assert [s["generated_tokens"] for s in first] == sorted(s["generated_tokens"] for s in first)
    assert first[-1]["generated_tokens"] > 0 and second[-1]["rows_done"] == 40
    assert 0 < first[0]["num_running"] <= 2 and 0 < first[0]["kv_cache_usage"] <= 1
    run_job(spec, engine=StreamEngine(), overwrite=True)  # a new job: the old samples go
    samples = [json.loads(line) for line in (tmp_path / "out" / METRICS).read_text().splitlines()]
    assert {s["run"] for s in samples} == {1}


def test_a_rerun_with_nothing_to_do_keeps_the_summary_figures(tmp_path: Path) -> None:
    spec = _spec(tmp_path, rows=12)
    first = run_job(spec, engine=StreamEngine(max_running=2, step_s=0.01)).summary
    again = run_job(spec, engine=StreamEngine()).summary
    assert first["throughput"]["output_tokens_per_s"] > 0
    for key in ("throughput", "elapsed_s", "this_run", "prefix_cache_hit_rate", "preemptions",
                "runs", "rows", "errors", "status"):
        assert again[key] == first[key], key
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["throughput"] == first["throughput"] and on_disk["figures_from_run"] == 1
