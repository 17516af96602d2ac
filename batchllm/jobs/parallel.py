"""Data-parallel jobs: one engine replica per GPU, each in its own process, fed work units by the
parent (`engine.data_parallel_size`).

    parent: coordinator                         worker i (spawned; CUDA_VISIBLE_DEVICES=<GPU i>)
    lock, fingerprint, plan, resume scan        builds its engine, runs JobExecutor whose rows
    queue of incomplete units  ◄── want ──────  come from the units it is handed (it asks again
                               ─── unit ──────► whenever its rows run out, so its batch stays
                               ◄── done ──────  full across units); commits chunks itself
    summary.json, once, at the end ◄── progress / finished / stopped / failed (+ figures)

Until a worker first asks for work (its engine is loaded), one unit is kept back for it, so the
replica that loads first cannot take a short job's every unit.
Chunk names carry the unit, and a unit is held by one worker at a time, so workers never write
the same file. A worker that dies (or whose engine fails) has its units put back on the queue;
whoever takes one next resumes it from its committed chunks. The job fails when every worker is
gone, or at once on an error every worker would meet (bad input, disk full, model unloadable).
Each worker has its own pipe to the parent, so a worker killed mid-message breaks only its pipe.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Iterator


from batchllm.jobs import errors
from batchllm.jobs.checkpoint import Committed, UnitState, scan_committed
from batchllm.jobs.engine_api import EngineLike
from batchllm.jobs.errors import EngineFailed, JobError, JobInterrupted, JobSpecError
from batchllm.jobs.executor import RunFigures, StopSignal
from batchllm.jobs.prepare import JobPlan
from batchllm.jobs.progress import ProgressSink, progress_callback
from batchllm.jobs.spec import JobSpec
from batchllm.jobs.summary import combine_figures
from batchllm.jobs.worker import WorkerSetup, worker_main

SHUTDOWN_WAIT_S = 60.0
# Errors every worker would meet: the job stops at once instead of retiring the worker.
FATAL_ERRORS = {c.__name__: c for c in (errors.JobSpecError, errors.JobInputError,
                                        errors.JobModelError, errors.OutputFolderError,
                                        errors.OutputWriteError)}


def worker_devices(spec: JobSpec) -> list[str | None]:
    """One entry per engine replica: the CUDA_VISIBLE_DEVICES value it gets (None: CPU)."""
    n, device, where = spec.data_parallel_size, str(spec.engine.get("device", "auto")), \
        spec.source or "job"
    gpus = [] if device == "cpu" else _visible_gpus()
    count = max(1, len(gpus)) if n == "auto" else int(n)
    if count > 1 and ":" in device:
        raise JobSpecError(f"{where}: engine.device={device!r} pins every replica to one GPU; with "
                           "engine.data_parallel_size use device: auto (or cuda)")
    if gpus and count > len(gpus):
        raise JobSpecError(f"{where}: engine.data_parallel_size={n} but only {len(gpus)} CUDA "
                           f"device(s) are visible ({','.join(gpus)}); use at most {len(gpus)} or "
                           "'auto'")
    return [gpus[i] if gpus else None for i in range(count)]


def _visible_gpus() -> list[str]:
    import torch

    count = torch.cuda.device_count()
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [d.strip() for d in named.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


@dataclass(slots=True)
class _Worker:
    """The parent's view of one worker."""

    index: int
    device: str
    process: Any  # multiprocessing.process.BaseProcess
    conn: Connection
    holding: set[int] = field(default_factory=set)  # units handed out, not complete yet
    completed: list[int] = field(default_factory=list)
    figures: RunFigures = field(default_factory=RunFigures)
    status: str = "running"  # running | finished | stopped | failed: ... | died: ...
    waiting: bool = False  # asked for a unit while idle; answered when one comes back or at the end
    asked: bool = False  # has asked for work at least once (its engine is loaded)
    pipe_open: bool = True
    reaped: bool = False  # its process has ended and its units are back on the queue

    def record(self) -> dict[str, Any]:
        f = self.figures
        return {"worker": self.index, "device": self.device, "pid": self.process.pid,
                "status": self.status, "units": sorted(self.completed), "rows": f.rows,
                "errors": f.errors, "prompt_tokens": f.prompt_tokens,
                "output_tokens": f.output_tokens, "elapsed_s": round(f.elapsed_s, 3)}


class Coordinator:
    """Hands the plan's incomplete units to worker processes and gathers what they did."""

    def __init__(self, plan: JobPlan, committed: Committed, devices: list[str | None], *,
                 folder: Path, stop: StopSignal, progress: ProgressSink, rows_before: int,
                 notice: Callable[[str], None],
                 engine_factory: Callable[[JobSpec], EngineLike] | None = None) -> None:
        self.plan, self.folder, self.devices = plan, folder, devices
        self.stop, self.sink, self.notice = stop, progress, notice
        self.engine_factory = engine_factory
        self.states: dict[int, UnitState] = dict(committed.units)
        self.pending: deque[int] = deque(u.index for u in plan.units
                                         if not committed.units[u.index].complete)
        self.todo = len(self.pending)
        self.done: set[int] = set()
        self.workers: list[_Worker] = []
        self.fatal: tuple[str, str] | None = None  # (error class name, message)
        self.stopping = False
        self.started: float | None = None  # when the first unit was handed out
        self.elapsed_s = 0.0
        self.show = progress_callback(progress, rows_before, plan.rows_total,
                                      lambda: self.figures().engine_stats)

    # -- the public face --------------------------------------------------------------------

    def run(self) -> None:
        """Run every incomplete unit; raises JobInterrupted, the fatal JobError, or EngineFailed
        when every worker is gone with work left."""
        ctx = mp.get_context("spawn")
        self._signum = ctx.Value("i", 0, lock=False)  # set: workers stop and commit
        try:
            self._start(ctx)
            with self.sink:
                while any(not w.reaped for w in self.workers):
                    self._serve()
        finally:
            self._shutdown()
        self._raise_outcome()

    def figures(self) -> RunFigures:
        return combine_figures([w.figures for w in self.workers], self.elapsed_s)

    def worker_records(self) -> list[dict[str, Any]]:
        return [w.record() for w in self.workers]

    # -- starting and stopping ----------------------------------------------------------------

    def _start(self, ctx: Any) -> None:
        cpu = all(d is None for d in self.devices)
        threads = max(1, (os.cpu_count() or 1) // len(self.devices)) if cpu else None
        for i, device in enumerate(self.devices):
            setup = WorkerSetup(i, self.plan.spec, self.plan.shards, self.plan.units,
                                self.plan.schema, self.folder, threads, self.engine_factory)
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(setup, theirs, self._signum),
                               name=f"batchllm-worker-{i}", daemon=True)
            try:
                with _visible_devices(device):  # set before the child's torch sees CUDA
                    proc.start()
            except (TypeError, AttributeError, pickle.PickleError) as e:  # unpicklable factory, ...
                raise JobSpecError(f"cannot start data-parallel worker {i}: {e} (an engine_factory "
                                   "must be a module-level function)") from e
            theirs.close()
            self.workers.append(_Worker(i, "cpu" if device is None else f"cuda:{device}", proc,
                                        ours))

    def _begin_stop(self, signum: int) -> None:
        if not self.stopping:
            self.stopping = True
            self._signum.value = signum

    def _shutdown(self) -> None:
        """Leave no worker behind: ask the live ones to stop (they commit), then wait for them."""
        if any(w.process.is_alive() for w in self.workers):
            self._signum.value = self._signum.value or signal.SIGTERM
            for w in self.workers:
                w.conn.close()  # a worker waiting on us reads end-of-file and stops
            deadline = time.monotonic() + SHUTDOWN_WAIT_S
            for w in self.workers:
                w.process.join(max(0.0, deadline - time.monotonic()))
                if w.process.is_alive():
                    w.process.kill()
                    w.process.join()
        for w in self.workers:
            w.conn.close()

    def _raise_outcome(self) -> None:
        if self.fatal is not None:
            kind, message = self.fatal
            raise FATAL_ERRORS.get(kind, JobError)(message)
        if self.stop.requested:
            signum = self.stop.signum or signal.SIGINT
            raise JobInterrupted(f"stopped by signal {signum}; finished rows are committed. Rerun "
                                 "the same command to resume.", signum)
        if len(self.done) < self.todo:
            gone = "; ".join(f"worker {w.index} ({w.device}): {w.status}" for w in self.workers)
            raise EngineFailed(
                f"all {len(self.workers)} data-parallel workers are gone with "
                f"{self.todo - len(self.done)} work unit(s) unfinished ({gone}). Finished rows are "
                "committed; rerun the same command to resume (lower engine.data_parallel_size if a "
                "device is faulty).")

    # -- the loop -----------------------------------------------------------------------------

    def _serve(self) -> None:
        if self.stop.requested:
            self._begin_stop(self.stop.signum or signal.SIGINT)
        self._answer_waiting()
        live = [w for w in self.workers if not w.reaped]
        ready = set(wait([w.conn for w in live if w.pipe_open] + [w.process.sentinel for w in live],
                         timeout=0.2))
        for w in live:
            if w.pipe_open and w.conn in ready:
                self._receive(w)
        for w in live:
            if w.process.sentinel in ready or not w.process.is_alive():
                w.process.join()
                self._receive(w)  # whatever it said before it went
                self._reap(w)
        self._clock()
        self.show(self.figures(), 0)

    def _clock(self) -> None:
        """Wall time from the first unit handed out to the last unit done (not worker exits)."""
        if self.started is not None and len(self.done) < self.todo:
            self.elapsed_s = time.monotonic() - self.started

    def _receive(self, w: _Worker) -> None:
        try:
            while w.pipe_open and w.conn.poll():
                self._handle(w, w.conn.recv())
        except (EOFError, OSError, ValueError, TypeError, AttributeError, ImportError,
                IndexError) as e:  # closed, or a message cut short by the worker's death
            w.pipe_open = False
            if not isinstance(e, EOFError) and w.process.is_alive():
                w.process.kill()  # a worker we cannot talk to is of no use

    def _handle(self, w: _Worker, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "want":
            self._want(w, block=bool(msg[1]))
        elif kind == "done":
            self._clock()
            w.holding.discard(msg[1])
            w.completed.append(msg[1])
            self.done.add(msg[1])
        elif kind == "progress":
            w.figures = msg[1]
        elif kind in ("finished", "stopped"):
            w.figures, w.status = msg[1], kind
        elif kind == "failed":
            w.figures, (_, _, error, message) = msg[1], msg
            w.status = f"failed: {message}"
            if error in FATAL_ERRORS and self.fatal is None:
                self.fatal = (error, message)
                self._begin_stop(signal.SIGTERM)
        else:
            raise ValueError(f"unknown message from worker {w.index}: {kind!r}")

    def _reserved(self, w: _Worker) -> int:
        """Units kept back for the other live workers still loading their engines: one each, so
        a replica that is ready first does not take every unit of a short job (or of a job's
        tail) before the others could start."""
        return sum(1 for x in self.workers if x is not w and not x.asked and not x.reaped)

    def _want(self, w: _Worker, block: bool) -> None:
        w.asked = True
        if self.stopping:
            self._send(w, ("stop",))
        elif len(self.pending) > self._reserved(w):
            self._hand_out(w)
        elif self.pending and not block:
            self._send(w, ("none",))  # prefetching: the rest is kept for replicas still loading
        elif self.pending:
            w.waiting = True  # idle: served once the loading replicas ask or die
        elif not block:
            self._send(w, ("none",))
        elif len(self.done) >= self.todo:
            self._send(w, ("stop",))
        else:
            w.waiting = True  # a unit may yet come back from a worker that dies

    def _answer_waiting(self) -> None:
        for w in self.workers:
            if w.waiting and not w.reaped:
                if len(self.pending) > self._reserved(w) and not self.stopping:
                    w.waiting = False
                    self._hand_out(w)
                elif self.stopping or len(self.done) >= self.todo:
                    w.waiting = False
                    self._send(w, ("stop",))

    def _hand_out(self, w: _Worker) -> None:
        unit = self.pending.popleft()
        w.holding.add(unit)
        if self.started is None:
            self.started = time.monotonic()
        if not self._send(w, ("unit", unit, self.states[unit])):
            w.holding.discard(unit)
            self.pending.appendleft(unit)

    def _send(self, w: _Worker, msg: tuple[Any, ...]) -> bool:
        try:
            w.conn.send(msg)
            return True
        except (OSError, ValueError):  # it is gone; its sentinel tells us next
            w.pipe_open = False
            return False

    def _reap(self, w: _Worker) -> None:
        """A worker process ended: if it had not said how, it died; its units go back."""
        w.pipe_open, w.reaped, w.waiting = False, True, False
        if w.status == "running":
            code = w.process.exitcode
            w.status = (f"died: killed by signal {-code}" if code is not None and code < 0
                        else f"died: exited with code {code} without reporting")
        if not w.holding:
            return
        # The chunks are the truth: a unit may have completed after its last message was lost.
        fresh = scan_committed(self.folder, self.plan.units)
        back = []
        for unit in sorted(w.holding):
            self.states[unit] = fresh.units[unit]
            if fresh.units[unit].complete:
                w.completed.append(unit)
                self.done.add(unit)
            else:
                back.append(unit)
        w.holding.clear()
        self.pending.extendleft(reversed(back))
        if back and not self.stopping:
            self.notice(f"worker {w.index} ({w.device}, pid {w.process.pid}) {w.status}; work "
                        f"unit(s) {', '.join(map(str, back))} go back to the queue (their "
                        "committed chunks are kept)")


@contextmanager
def _visible_devices(device: str | None) -> Iterator[None]:
    """CUDA_VISIBLE_DEVICES=device while a worker starts (it inherits the environment)."""
    if device is None:
        yield
        return
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    try:
        yield
    finally:
        if old is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old
