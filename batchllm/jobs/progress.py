"""Progress display: figures from the engine's counters (tokens as they are generated), a rich
live line on a terminal, timestamped plain log lines otherwise (or nothing)."""
from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol, TextIO

from batchllm.jobs.executor import RunFigures

RATE_WINDOW_S = 30.0  # rates are measured over the last this many seconds


@dataclass(slots=True)
class ProgressState:
    rows_done: int
    rows_total: int
    output_tokens_per_s: float  # tokens generated per second (the engine's count, smoothed)
    kv_cache_usage: float
    prefix_hit_rate: float
    preemptions: int
    errors: int
    eta_s: float | None
    elapsed_s: float = 0.0  # this run's
    generated_tokens: int = 0  # this run's, in finished and unfinished requests
    num_running: int = 0
    num_waiting: int = 0
    prefix_cache_hits: int = 0  # this run's
    prefix_cache_queries: int = 0

    def line(self) -> str:
        eta = "?" if self.eta_s is None else _duration(self.eta_s)
        return (f"rows {self.rows_done}/{self.rows_total} | {self.output_tokens_per_s:.1f} tok/s | "
                f"running {self.num_running} | KV {self.kv_cache_usage:.0%} | prefix hits "
                f"{self.prefix_hit_rate:.0%} | preemptions {self.preemptions} | errors "
                f"{self.errors} | elapsed {_duration(self.elapsed_s)} | ETA {eta}")


class ProgressSink(Protocol):
    """Shown the figures while a job runs. A sink may also have `event(text)`: a one-off line
    (the start banner, a loading phase); sinks without it are not told."""

    def __enter__(self) -> "ProgressSink": ...

    def __exit__(self, *exc: object) -> None: ...

    def show(self, state: ProgressState) -> None: ...


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def event_hook(sink: Any) -> Callable[[str], None] | None:
    """The sink's `event` method, if it has one (a loading phase goes there)."""
    hook = getattr(sink, "event", None)
    return hook if callable(hook) else None


class RateMeter:
    """A count's rate over the last `window_s` seconds: steady, and right from its second sample
    (no average since the start, which lags behind a pipeline that is still filling)."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, t: float, count: float) -> float:
        s = self._samples
        s.append((t, count))
        while len(s) > 2 and t - s[1][0] >= self.window_s:
            s.popleft()
        t0, c0 = s[0]
        return (count - c0) / (t - t0) if t > t0 else 0.0


def _eta(rows_left: int, f: RunFigures, generated: int | None, token_rate: float,
         row_rate: float) -> float | None:
    """Seconds until the last row is done. With the engine's token count: the tokens the rows left
    still need (finished rows' mean length, less what unfinished rows already generated) over the
    token rate; else rows left over the row rate; None while neither is known."""
    if rows_left <= 0:
        return 0.0
    if generated is not None and f.rows > 0 and f.output_tokens > 0 and token_rate > 0:
        in_flight = max(0, generated - f.output_tokens)
        need = rows_left * (f.output_tokens / f.rows) - in_flight
        return max(need, 0.0) / token_rate
    return rows_left / row_rate if row_rate > 0 else None


def progress_callback(sink: ProgressSink, rows_before: int, rows_total: int,
                      stats: Callable[[], dict[str, Any]], every_s: float = 0.5,
                      clock: Callable[[], float] = time.monotonic
                      ) -> Callable[[RunFigures, int], None]:
    """An executor on_progress hook that samples engine stats at most every `every_s` seconds.
    The engine's counters are lifetime figures; this run's are taken from their values now."""
    def sample() -> dict[str, Any]:
        try:
            return dict(stats())
        except Exception:  # figures only: a broken engine's error surfaces from its step
            return {}

    base = sample()
    start = clock()
    last = [start]
    tokens, rows = RateMeter(), RateMeter()
    tokens.add(start, 0)
    rows.add(start, 0)

    def since(st: dict[str, Any], key: str) -> int:
        return int(st.get(key) or 0) - int(base.get(key) or 0)

    def update(f: RunFigures, in_flight: int) -> None:
        now = clock()
        done = rows_before + f.rows
        if now - last[0] < every_s and done < rows_total:
            return
        last[0] = now
        st = sample()
        generated = since(st, "num_generated_tokens") if "num_generated_tokens" in st else None
        token_rate = tokens.add(now, f.output_tokens if generated is None else generated)
        row_rate = rows.add(now, f.rows)
        hits, queries = since(st, "prefix_cache_hits"), since(st, "prefix_cache_queries")
        sink.show(ProgressState(
            rows_done=done, rows_total=rows_total, output_tokens_per_s=token_rate,
            kv_cache_usage=float(st.get("kv_cache_usage") or 0.0),
            prefix_hit_rate=hits / queries if queries > 0 else 0.0,
            preemptions=since(st, "num_preemptions"), errors=f.errors,
            eta_s=_eta(rows_total - done, f, generated, token_rate, row_rate),
            elapsed_s=now - start,
            generated_tokens=f.output_tokens if generated is None else generated,
            num_running=int(st.get("num_running") or 0),
            num_waiting=int(st.get("num_waiting") or 0),
            prefix_cache_hits=hits, prefix_cache_queries=queries))

    return update


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


class NullProgress:
    def __enter__(self) -> "NullProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def show(self, state: ProgressState) -> None:
        pass


class LogProgress:
    """One timestamped plain line every `every_s` seconds (for logs, CI, pipes), and each event
    (the start banner, loading phases) as it comes."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self._last = 0.0
        self._state: ProgressState | None = None

    def _print(self, text: str) -> None:
        print(f"{_stamp()} {text}", file=self.stream, flush=True)

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._state is not None:
            self._print(self._state.line())
            self._state = None

    def event(self, text: str) -> None:
        self._print(text)

    def show(self, state: ProgressState) -> None:
        self._state = state
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._print(state.line())


class RichProgress:
    """A rich progress bar with the figures beside it (terminals only); events are logged above."""

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

    def event(self, text: str) -> None:
        self._progress.console.print(f"{_stamp()} {text}", markup=False, highlight=False)

    def show(self, state: ProgressState) -> None:
        eta = "?" if state.eta_s is None else _duration(state.eta_s)
        figures = (f"{state.output_tokens_per_s:.0f} tok/s  running {state.num_running}  "
                   f"KV {state.kv_cache_usage:.0%}  prefix {state.prefix_hit_rate:.0%}  "
                   f"preempt {state.preemptions}  errors {state.errors}  ETA {eta}")
        self._progress.update(self._task, completed=state.rows_done, total=state.rows_total,
                              figures=figures)


def default_progress(stream: TextIO | None = None) -> ProgressSink:
    stream = stream or sys.stderr
    return RichProgress() if stream.isatty() else LogProgress(stream)
