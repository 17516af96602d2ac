"""A running job's record of itself: the start banner and loading phases (told to the progress
sink), `metrics.jsonl` (engine figures about once a second, appended; the report's time series)
and `live.json` (the latest figures, replaced every few seconds; what `batchllm inspect` shows
while the job runs).

    executor ─► progress_callback ─► JobMonitor.show ─► the user's sink (rich / log lines)
                                                     ├─► metrics.jsonl (one line a second)
                                                     └─► live.json (every 2 s, by a thread)

It wraps the progress sink, so it runs in the process that drives the job, whatever the executor,
and costs what a display costs: one JSON line a second, no fsync. Nothing here may fail a job:
a write that fails stops that file, not the run.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from batchllm.io.writers import TMP_PREFIX
from batchllm.jobs.prepare import JobPlan
from batchllm.jobs.progress import ProgressSink, ProgressState, event_hook

METRICS = "metrics.jsonl"
LIVE = "live.json"
SAMPLE_EVERY_S = 1.0
LIVE_EVERY_S = 2.0


class JobMonitor:
    """A ProgressSink around the user's: adds the errors of earlier runs to what it is shown,
    writes metrics.jsonl and live.json, and at the end the last live status and report.html."""

    def __init__(self, folder: Path, sink: ProgressSink, *, run: int, rows_before: int,
                 rows_total: int, errors_before: int, banner: str, fresh: bool,
                 sample_every_s: float = SAMPLE_EVERY_S, live_every_s: float = LIVE_EVERY_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.folder, self.sink, self.run, self.banner = folder, sink, run, banner
        self.errors_before = errors_before
        self.sample_every_s, self.live_every_s, self.clock = sample_every_s, live_every_s, clock
        self._metrics: Any = None  # the open metrics.jsonl while the run is entered
        self._entered = False
        self._next_sample = self._next_live = 0.0
        self._state: ProgressState | None = None
        self._live_file = _LiveFile(folder / LIVE)
        self._live: dict[str, Any] = {
            "pid": os.getpid(), "host": socket.gethostname(), "run": run, "status": "starting",
            "phase": None,
            "started_at": round(clock(), 3), "updated_at": round(clock(), 3),
            "rows_done": rows_before, "rows_total": rows_total, "errors": errors_before}
        if fresh:  # a new job in this folder: an earlier job's samples are not this one's
            (folder / METRICS).unlink(missing_ok=True)

    @classmethod
    def for_job(cls, folder: Path, sink: ProgressSink, plan: JobPlan, rows_before: int,
                previous: dict[str, Any] | None, resumed: bool) -> "JobMonitor":
        from batchllm import __version__
        from batchllm.jobs.summary import committed_totals

        run = int((previous or {}).get("runs", 0)) + 1
        if previous is not None and previous.get("rows") == rows_before:
            errors_before = int(previous.get("errors") or 0)
        else:  # no summary, or one a killed run left behind: the chunks are the truth
            errors_before = committed_totals(folder)["errors"] if rows_before else 0
        spec = plan.spec
        done = (f"{rows_before} already committed ({errors_before} errors), run {run}"
                if resumed else "a new job")
        banner = (f"batchllm {__version__}: {spec.source or 'job'} | model {spec.model} | "
                  f"{plan.rows_total} rows in {len(plan.shards)} shard(s), {len(plan.units)} work "
                  f"unit(s) | {done} | output {folder} | pid {os.getpid()}")
        return cls(folder, sink, run=run, rows_before=rows_before, rows_total=plan.rows_total,
                   errors_before=errors_before, banner=banner, fresh=not resumed)

    # -- what the job runner calls --------------------------------------------------------------

    def start(self) -> None:
        """The banner, and a first live.json (a job that is still loading shows as such)."""
        hook = event_hook(self.sink)
        if hook is not None:
            hook(self.banner)
        self._write_live()

    def event(self, text: str) -> None:
        """A one-off line: the banner or a loading phase (live.json shows the phase)."""
        hook = event_hook(self.sink)
        if hook is not None:
            hook(text)
        self._live.update(phase=text, status="running" if self._entered else "loading")
        self._write_live()

    def __enter__(self) -> "JobMonitor":
        self.sink.__enter__()
        self._entered = True
        try:
            self._metrics = open(self.folder / METRICS, "a", encoding="utf-8")
        except OSError:
            self._metrics = None
        self._live.update(status="running", phase=None)
        self._write_live()
        return self

    def show(self, state: ProgressState) -> None:
        state.errors += self.errors_before
        self.sink.show(state)
        self._state = state
        now = self.clock()
        if now >= self._next_sample:
            self._next_sample = now + self.sample_every_s
            self._sample(state, now)
        if now >= self._next_live:
            self._next_live = now + self.live_every_s
            self._live.update(status="running", **_live_figures(state))
            self._write_live()

    def __exit__(self, *exc: object) -> None:
        try:
            if self._state is not None:
                self._sample(self._state, self.clock())  # the last figures, whenever they came
            if self._metrics is not None:
                self._metrics.close()
        except OSError:
            pass
        finally:
            self._metrics, self._entered = None, False
            self.sink.__exit__(*exc)

    def finish(self, summary: dict[str, Any], notice: Callable[[str], None]) -> None:
        """After summary.json: the final live status, then report.html (or why there is none)."""
        from batchllm.jobs.report import ReportUnavailable, write_report

        self._live.update(status=summary.get("status", "failed"), phase=None,
                          rows_done=summary.get("rows"), errors=summary.get("errors"))
        self._write_live(wait=True)  # the last word: after any write still under way
        try:
            write_report(self.folder)
        except ReportUnavailable as e:
            notice(str(e))
        except Exception as e:  # noqa: BLE001 - a report is never worth failing a job over
            notice(f"report.html was not written ({type(e).__name__}: {e}); the job's results "
                   "are unaffected. `batchllm report OUT` tries again.")

    # -- files --------------------------------------------------------------------------------

    def _sample(self, state: ProgressState, now: float) -> None:
        if self._metrics is None:
            return
        record = {"t": round(now, 3), "run": self.run, **_live_figures(state),
                  "generated_tokens": state.generated_tokens,
                  "prefix_cache_hits": state.prefix_cache_hits,
                  "prefix_cache_queries": state.prefix_cache_queries}
        try:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()
        except (OSError, ValueError):
            self._metrics = None  # disk full or closed: the run goes on without samples

    def _write_live(self, wait: bool = False) -> None:
        self._live["updated_at"] = round(self.clock(), 3)
        self._live_file.put(json.dumps(self._live), wait)


class _LiveFile:
    """live.json, replaced by a daemon thread so that a slow file system (a rename on a network
    disk) never holds up the engine loop: put() leaves the latest text, the thread writes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._text: str | None = None
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def put(self, text: str, wait: bool = False) -> None:
        """`wait`: write it now, in this thread, after whatever the thread was writing."""
        if wait:
            with self._cv:
                self._text, thread, self._thread = None, self._thread, None
                self._cv.notify()
            if thread is not None:
                thread.join()
            self._replace(text)
            return
        with self._cv:
            self._text = text
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="batchllm-live",
                                                daemon=True)
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        me = threading.current_thread()
        while True:
            with self._cv:
                while self._text is None and self._thread is me:
                    self._cv.wait()
                text, self._text = self._text, None
            if text is None:
                return  # put(wait=True) took over
            self._replace(text)

    def _replace(self, text: str) -> None:
        tmp = self.path.with_name(f"{TMP_PREFIX}{self.path.name}.{os.getpid()}."
                                  f"{threading.get_ident()}")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.path)  # readers see the old file or the new one, never half one
        except OSError:
            tmp.unlink(missing_ok=True)


def _live_figures(s: ProgressState) -> dict[str, Any]:
    return {"rows_done": s.rows_done, "rows_total": s.rows_total, "errors": s.errors,
            "elapsed_s": round(s.elapsed_s, 3), "tokens_per_s": round(s.output_tokens_per_s, 2),
            "eta_s": None if s.eta_s is None else round(s.eta_s, 1),
            "num_running": s.num_running, "num_waiting": s.num_waiting,
            "kv_cache_usage": round(s.kv_cache_usage, 4), "preemptions": s.preemptions,
            "prefix_hit_rate": round(s.prefix_hit_rate, 4)}


def read_live(folder: Path) -> dict[str, Any] | None:
    """live.json as the running (or last) run left it, or None."""
    try:
        live = json.loads((folder / LIVE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return live if isinstance(live, dict) else None


def pid_alive(pid: Any) -> bool:
    """Whether a process with this id runs on this machine (a live.json's writer)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s ago"
    return f"{seconds / 60:.0f} min ago" if seconds < 7200 else f"{seconds / 3600:.1f} h ago"


def live_view(folder: Path, now: float | None = None) -> tuple[str, list[tuple[str, str]]] | None:
    """What `batchllm inspect` shows of live.json: a heading that says whose figures they are and
    how fresh, and the figures; None when the folder has none."""
    live = read_live(folder)
    if live is None:
        return None
    age = (time.time() if now is None else now) - float(live.get("updated_at") or 0.0)
    status, pid = live.get("status"), live.get("pid")
    here = live.get("host") in (None, socket.gethostname())
    if status in ("starting", "loading", "running") and here and not pid_alive(pid):
        heading = (f"last live figures, {_ago(age)}: the run (pid {pid}) is gone without "
                   "finishing; rerun the job to resume")
    elif status in ("starting", "loading", "running"):
        heading = f"live: {status} (pid {pid}, run {live.get('run')}), updated {_ago(age)}"
        if age > 60:
            heading += " (no update since: a long step, or the run is stuck)"
    else:
        heading = f"last run ({live.get('run')}): {status}, updated {_ago(age)}"
    skip = {"pid", "host", "status", "updated_at", "started_at"}
    figures = [(k, "" if v is None else str(v)) for k, v in live.items() if k not in skip]
    return heading, figures
