"""Progress display: a rich live line on a terminal, plain log lines otherwise (or nothing)."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, TextIO

from batchllm.jobs.executor import RunFigures


@dataclass(slots=True)
class ProgressState:
    rows_done: int
    rows_total: int
    output_tokens_per_s: float
    kv_cache_usage: float
    prefix_hit_rate: float
    preemptions: int
    errors: int
    eta_s: float | None

    def line(self) -> str:
        eta = "?" if self.eta_s is None else _duration(self.eta_s)
        return (f"rows {self.rows_done}/{self.rows_total} | {self.output_tokens_per_s:.1f} tok/s | "
                f"KV {self.kv_cache_usage:.0%} | prefix hits {self.prefix_hit_rate:.0%} | "
                f"preemptions {self.preemptions} | errors {self.errors} | ETA {eta}")


class ProgressSink(Protocol):
    def __enter__(self) -> "ProgressSink": ...

    def __exit__(self, *exc: object) -> None: ...

    def show(self, state: ProgressState) -> None: ...


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_callback(sink: ProgressSink, rows_before: int, rows_total: int,
                      stats: Callable[[], dict[str, Any]], every_s: float = 0.5
                      ) -> Callable[[RunFigures, int], None]:
    """An executor on_progress hook that samples engine stats at most every `every_s` seconds."""
    last = [0.0]

    def update(f: RunFigures, in_flight: int) -> None:
        now = time.monotonic()
        done = rows_before + f.rows
        if now - last[0] < every_s and done < rows_total:
            return
        last[0] = now
        st = stats()
        q = st.get("prefix_cache_queries") or 0
        rate = f.rows / f.elapsed_s if f.elapsed_s > 0 else 0.0
        sink.show(ProgressState(
            rows_done=done, rows_total=rows_total,
            output_tokens_per_s=f.output_tokens / f.elapsed_s if f.elapsed_s > 0 else 0.0,
            kv_cache_usage=float(st.get("kv_cache_usage") or 0.0),
            prefix_hit_rate=(st.get("prefix_cache_hits") or 0) / q if q else 0.0,
            preemptions=int(st.get("num_preemptions") or 0), errors=f.errors,
            eta_s=(rows_total - done) / rate if rate > 0 else None))

    return update


class NullProgress:
    def __enter__(self) -> "NullProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def show(self, state: ProgressState) -> None:
        pass


class LogProgress:
    """One plain line every `every_s` seconds (for logs, CI, pipes)."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self._last = 0.0
        self._state: ProgressState | None = None

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._state is not None:
            print(self._state.line(), file=self.stream, flush=True)

    def show(self, state: ProgressState) -> None:
        self._state = state
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            print(state.line(), file=self.stream, flush=True)


class RichProgress:
    """A rich progress bar with the figures beside it (terminals only)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(TextColumn("[bold]batchllm"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[figures]}"), transient=False)
        self._task = self._progress.add_task("rows", total=None, figures="")

    def __enter__(self) -> "RichProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def show(self, state: ProgressState) -> None:
        eta = "?" if state.eta_s is None else _duration(state.eta_s)
        figures = (f"{state.output_tokens_per_s:.0f} tok/s  KV {state.kv_cache_usage:.0%}  "
                   f"prefix {state.prefix_hit_rate:.0%}  preempt {state.preemptions}  "
                   f"errors {state.errors}  ETA {eta}")
        self._progress.update(self._task, completed=state.rows_done, total=state.rows_total,
                              figures=figures)


def default_progress(stream: TextIO | None = None) -> ProgressSink:
    stream = stream or sys.stderr
    return RichProgress() if stream.isatty() else LogProgress(stream)
