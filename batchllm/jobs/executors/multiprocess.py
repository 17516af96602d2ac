"""MultiProcessExecutor: one engine replica per GPU, each in its own spawned process, fed work
units by this (the driver) process (`engine.data_parallel_size` > 1).

    driver: UnitQueue, messages over pipes          worker i (spawned; CUDA_VISIBLE_DEVICES=<GPU i>)
    queue of incomplete units ◄── WantUnit ───────  builds its engine, runs JobExecutor whose rows
                              ─── AssignUnit ─────► come from the units it is handed (it asks again
                              ◄── UnitDone ───────  whenever its rows run out, so its batch stays
                                                    full across units); commits chunks itself
    combined figures ◄── Progress / Finished / Stopped / Failed (+ the worker's figures)

Which unit goes where is the UnitQueue's call; this module only carries messages, watches the
processes and stops them. A worker that dies (or whose engine fails) is reaped: the chunks of the
units it held are read afresh and those units go back to the queue, to be resumed by whoever
takes them next. An error every worker would meet (FATAL_ERRORS) stops the job at once. Each
worker has its own pipe, so a worker killed mid-message breaks only its pipe. A signal to the
driver is passed on through a shared value; shutdown waits for every worker, killing any that
outstays SHUTDOWN_WAIT_S.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from batchllm.jobs.checkpoint import Committed, scan_committed
from batchllm.jobs.engine_api import EngineLike
from batchllm.jobs.errors import JobError, JobInterrupted, JobSpecError
from batchllm.jobs.executor import RunFigures
from batchllm.jobs.executors.base import (FATAL_ERRORS, Executor, RunContext, RunReport,
                                          all_replicas_gone)
from batchllm.jobs.executors.devices import visible_devices
from batchllm.jobs.executors.messages import (AssignUnit, Failed, Finished, Progress, Stopped,
                                              ToDriver, ToReplica, UnitDone, WantUnit)
from batchllm.jobs.executors.queue import UnitQueue, Wait
from batchllm.jobs.executors.worker import WorkerSetup, worker_main
from batchllm.jobs.prepare import JobPlan
from batchllm.jobs.progress import progress_callback
from batchllm.jobs.spec import JobSpec
from batchllm.jobs.summary import combine_figures

SHUTDOWN_WAIT_S = 60.0


@dataclass(slots=True)
class _Worker:
    """The driver's view of one worker process."""

    index: int
    device: str
    process: Any  # multiprocessing.process.BaseProcess
    conn: Connection
    figures: RunFigures = field(default_factory=RunFigures)
    status: str = "running"  # running | finished | stopped | failed: ... | died: ...
    pipe_open: bool = True
    reaped: bool = False  # its process has ended and its units are back on the queue


class MultiProcessExecutor(Executor):
    """One worker process per entry of `devices` (a CUDA_VISIBLE_DEVICES value, None: CPU); each
    builds its engine with `engine_factory(spec)` (a module-level function; default build_engine)."""

    def __init__(self, devices: list[str | None],
                 engine_factory: Callable[[JobSpec], EngineLike] | None = None) -> None:
        self.devices, self.engine_factory = devices, engine_factory
        self.workers: list[_Worker] = []
        self.queue: UnitQueue | None = None
        self.fatal: tuple[str, str] | None = None  # (error class name, message)
        self.started: float | None = None  # when the first unit was handed out
        self.elapsed_s = 0.0

    def run(self, plan: JobPlan, committed: Committed, ctx: RunContext) -> RunReport:
        self.plan, self.ctx = plan, ctx
        self.queue = UnitQueue([u.index for u in plan.units if not committed.units[u.index].complete],
                               committed.units, len(self.devices))
        self.show = progress_callback(ctx.progress, ctx.rows_before, plan.rows_total,
                                      lambda: self._figures().engine_stats)
        spawn = mp.get_context("spawn")
        self._signum = spawn.Value("i", 0, lock=False)  # set: workers stop and commit
        try:
            self._start(spawn)
            with ctx.progress:
                while any(not w.reaped for w in self.workers):
                    self._serve()
        finally:
            self._shutdown()
        self._raise_outcome()
        return self.report()

    def report(self) -> RunReport:
        return RunReport(self._figures(), [self._record(w) for w in self.workers] or None)

    def _figures(self) -> RunFigures:
        return combine_figures([w.figures for w in self.workers], self.elapsed_s)

    def _record(self, w: _Worker) -> dict[str, Any]:
        f = w.figures
        units = self.queue.completed(w.index) if self.queue is not None else []
        return {"worker": w.index, "device": w.device, "pid": w.process.pid, "status": w.status,
                "units": sorted(units), "rows": f.rows, "errors": f.errors,
                "prompt_tokens": f.prompt_tokens, "output_tokens": f.output_tokens,
                "elapsed_s": round(f.elapsed_s, 3)}

    # -- starting and stopping ----------------------------------------------------------------

    def _start(self, spawn: Any) -> None:
        cpu = all(d is None for d in self.devices)
        threads = max(1, (os.cpu_count() or 1) // len(self.devices)) if cpu else None
        plan = self.plan
        for i, device in enumerate(self.devices):
            setup = WorkerSetup(i, plan.spec, plan.shards, plan.units, plan.schema,
                                self.ctx.folder, threads, self.engine_factory)
            ours, theirs = spawn.Pipe()
            proc = spawn.Process(target=worker_main, args=(setup, theirs, self._signum),
                                 name=f"batchllm-worker-{i}", daemon=False)  # may start TP ranks
            try:
                with visible_devices(device):  # set before the child's torch sees CUDA
                    proc.start()
            except (TypeError, AttributeError, pickle.PickleError) as e:  # unpicklable factory, ...
                raise JobSpecError(f"cannot start data-parallel worker {i}: {e} (an engine_factory "
                                   "must be a module-level function)") from e
            theirs.close()
            self.workers.append(_Worker(i, "cpu" if device is None else f"cuda:{device}", proc,
                                        ours))

    def _begin_stop(self, signum: int) -> None:
        if not self.queue.stopping:
            self.queue.stop()
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
        stop = self.ctx.stop
        if stop.requested:
            signum = stop.signum or signal.SIGINT
            raise JobInterrupted(f"stopped by signal {signum}; finished rows are committed. Rerun "
                                 "the same command to resume.", signum)
        if self.queue.left:
            raise all_replicas_gone([f"worker {w.index} ({w.device}): {w.status}"
                                     for w in self.workers], self.queue.left)

    # -- the loop -----------------------------------------------------------------------------

    def _serve(self) -> None:
        if self.ctx.stop.requested:
            self._begin_stop(self.ctx.stop.signum or signal.SIGINT)
        for index, answer in self.queue.wake():
            self._answer(self.workers[index], answer)
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
        self.show(self._figures(), 0)

    def _clock(self) -> None:
        """Wall time from the first unit handed out to the last unit done (not worker exits)."""
        if self.started is not None and not self.queue.finished:
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

    def _handle(self, w: _Worker, msg: ToDriver) -> None:
        match msg:
            case WantUnit(block):
                self._answer(w, self.queue.want(w.index, block))
            case UnitDone(unit):
                self._clock()
                self.queue.done(w.index, unit)
            case Progress(figures):
                w.figures = figures
            case Finished(figures) | Stopped(figures):
                w.figures, w.status = figures, "finished" if isinstance(msg, Finished) else "stopped"
            case Failed(figures, error_class, message):
                w.figures, w.status = figures, f"failed: {message}"
                if error_class in FATAL_ERRORS and self.fatal is None:
                    self.fatal = (error_class, message)
                    self._begin_stop(signal.SIGTERM)
            case _:
                raise ValueError(f"unknown message from worker {w.index}: {msg!r}")

    def _answer(self, w: _Worker, answer: ToReplica | Wait) -> None:
        if isinstance(answer, Wait):
            return  # answered by a later wake()
        if isinstance(answer, AssignUnit) and self.started is None:
            self.started = time.monotonic()
        try:
            w.conn.send(answer)
        except (OSError, ValueError):  # it is gone; its sentinel tells us next, and the unit
            w.pipe_open = False       # it was given goes back to the queue when it is reaped

    def _reap(self, w: _Worker) -> None:
        """A worker process ended: if it had not said how, it died; its units go back."""
        w.pipe_open, w.reaped = False, True
        if w.status == "running":
            code = w.process.exitcode
            w.status = (f"died: killed by signal {-code}" if code is not None and code < 0
                        else f"died: exited with code {code} without reporting")
        held = self.queue.holding(w.index)
        # The chunks are the truth: a unit may have completed after its last message was lost.
        fresh = scan_committed(self.ctx.folder, self.plan.units).units if held else {}
        back = self.queue.gone(w.index, fresh)
        if back and not self.queue.stopping:
            self.ctx.notice(f"worker {w.index} ({w.device}, pid {w.process.pid}) {w.status}; work "
                            f"unit(s) {', '.join(map(str, back))} go back to the queue (their "
                            "committed chunks are kept)")
