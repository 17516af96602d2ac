"""The replica process of the multi-process executor: builds its engine, asks the driver for work
units, runs them with the ordinary JobExecutor (committing chunks itself), reports how it ended.
The driver side is multiprocess.py; the messages are messages.py."""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable, Protocol

import pyarrow as pa

from batchllm.io.readers import Shard
from batchllm.io.storage import Storage
from batchllm.jobs.checkpoint import Committed
from batchllm.jobs.engine_api import EngineLike, build_engine
from batchllm.jobs.errors import JobError, JobInterrupted
from batchllm.jobs.executor import JobExecutor, RunFigures, StopSignal
from batchllm.jobs.executors.messages import (AssignUnit, Failed, Finished, Progress, Stop,
                                              Stopped, ToDriver, ToReplica, UnitDone, WantUnit)
from batchllm.jobs.plan import WorkUnit
from batchllm.jobs.preprocess import Preprocessor
from batchllm.jobs.spec import JobSpec

PROGRESS_EVERY_S = 0.5


@dataclass(slots=True)
class WorkerSetup:
    """What a worker process needs (pickled to it)."""

    index: int
    spec: JobSpec
    shards: list[Shard]
    units: list[WorkUnit]
    schema: pa.Schema
    folder: Storage  # output.path: a folder or an object-store prefix
    threads: int | None  # torch threads (CPU replicas share the cores)
    engine_factory: Callable[[JobSpec], EngineLike] | None


class _Link:
    """The worker's end of its pipe; any failure to talk means the driver is gone."""

    def __init__(self, conn: Connection, signum: Any) -> None:
        self.conn, self.signum = conn, signum
        self.parent = os.getppid()
        self.gone = False

    def send(self, msg: ToDriver) -> None:
        if self.gone:
            return
        try:
            self.conn.send(msg)
        except (OSError, ValueError):
            self.gone = True

    def ask(self, block: bool) -> ToReplica:
        self.send(WantUnit(block))
        try:
            return self.conn.recv() if not self.gone else Stop()
        except (EOFError, OSError):
            self.gone = True
            return Stop()

    def stop_requested(self) -> int:
        """The signal the driver asked us to stop with (SIGTERM if the driver is gone), else 0."""
        if self.signum.value:
            return int(self.signum.value)
        return signal.SIGTERM if self.gone or os.getppid() != self.parent else 0


class _UnitFeed:
    """JobExecutor's unit_source in a worker: asks the driver for the next unit. The first ask of
    a run waits for one; later asks (rows still in flight) take NoUnit for an answer."""

    def __init__(self, link: ReplicaLink, committed: Committed) -> None:
        self.link, self.committed = link, committed
        self.first = True
        self.closed = False  # the driver said Stop (or is gone)

    def __call__(self) -> int | None:
        if self.closed or self.link.stop_requested():
            self.closed = True
            return None
        reply = self.link.ask(block=self.first)
        self.first = False
        if isinstance(reply, AssignUnit):
            self.committed.units[reply.unit] = reply.state
            return reply.unit
        self.closed = isinstance(reply, Stop)
        return None


def _add(total: RunFigures, part: RunFigures, stats: dict[str, Any]) -> RunFigures:
    """total + part (engine counters are the engine's lifetime figures: the latest, not a sum)."""
    return RunFigures(total.rows + part.rows, total.errors + part.errors,
                      total.prompt_tokens + part.prompt_tokens,
                      total.output_tokens + part.output_tokens,
                      total.elapsed_s + part.elapsed_s, dict(stats))


class ReplicaLink(Protocol):
    """A replica's end of its channel to the driver: a pipe here, actor queues under Ray."""

    def send(self, msg: ToDriver) -> None: ...

    def ask(self, block: bool) -> ToReplica: ...

    def stop_requested(self) -> int: ...


def worker_main(setup: WorkerSetup, conn: Connection, signum: Any) -> None:
    """A worker process: build the engine, run units until told to stop, report how it ended."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the driver, which tells us
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG is reported by the writer instead
    try:
        serve_replica(setup, _Link(conn, signum))
    finally:
        conn.close()


def serve_replica(setup: WorkerSetup, link: ReplicaLink) -> None:
    """One replica's life over `link`: build the engine, run the units the driver hands out,
    report how it ended (the last message is Finished, Stopped or Failed)."""
    total, ex = RunFigures(), None
    engine: EngineLike | None = None

    def so_far() -> RunFigures:
        stats = {}
        if engine is not None:
            try:
                stats = dict(engine.stats())
            except Exception:
                pass  # figures only
        return _add(total, ex.figures if ex is not None else RunFigures(), stats)

    try:
        if setup.threads:
            import torch

            torch.set_num_threads(setup.threads)
        spec = setup.spec
        engine = (setup.engine_factory or build_engine)(spec)
        prep = Preprocessor.for_job(spec, setup.shards, engine.tokenizer, engine.max_model_len)
        feed = _UnitFeed(link, Committed({}, []))
        stop = StopSignal()
        last = [0.0]

        def on_progress(figures: RunFigures, in_flight: int) -> None:
            if not stop.requested and (signum_now := link.stop_requested()):
                stop.signum = signum_now
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S:
                last[0] = now
                link.send(Progress(so_far()))

        while not feed.closed:
            feed.first = True
            ex = JobExecutor(
                shards=setup.shards, units=setup.units, committed=feed.committed, engine=engine,
                prep=prep, schema=setup.schema, folder=setup.folder,
                chunk_rows=spec.output.chunk_rows, commit_interval_s=spec.output.commit_interval_s,
                max_num_seqs=spec.max_num_seqs, stop=stop, on_progress=on_progress,
                unit_source=feed, on_unit_complete=lambda unit: link.send(UnitDone(unit)))
            ex.run()
            total, ex = so_far(), None
        link.send(Finished(so_far()))
    except JobInterrupted:
        link.send(Stopped(so_far()))
    except JobError as e:
        link.send(Failed(so_far(), type(e).__name__, str(e)))
    except BaseException as e:  # noqa: BLE001 - reported to the driver, which retires us
        link.send(Failed(so_far(), type(e).__name__, f"{type(e).__name__}: {e}"))
    finally:
        if engine is not None and hasattr(engine, "shutdown"):
            try:
                engine.shutdown()  # its tensor-parallel ranks, if any
            except Exception:  # noqa: BLE001 - a broken group is already reported
                pass
