"""RayExecutor: engine replicas as Ray actors on a cluster (`engine.executor: ray`), fed work
units by this (the driver) process.

    driver: UnitQueue, actor calls                      actor i (placement group: its GPUs, one node)
    queue of incomplete units ◄── take(): WantUnit ───  worker.serve_replica in a thread: builds
                              ─── answer(AssignUnit) ►  its engine (TP ranks inside), runs the
                              ◄── take(): UnitDone ───  JobExecutor over the units it is handed,
                                                        commits its own chunks under output.path
    combined figures ◄── Progress / Finished / Stopped / Failed

The same queue and messages as the multi-process executor; only the carrier differs. A replica
whose actor (or node) is lost is killed for good, the chunks of the units it held are read afresh
and those units go back to the queue; a unit lost more than `ray.max_unit_retries` times fails
the job. The actors belong to this driver: if it dies, Ray ends them, and a rerun resumes from
the committed chunks.
"""
from __future__ import annotations

import signal
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from batchllm.jobs.checkpoint import Committed, scan_committed
from batchllm.jobs.engine_api import EngineLike
from batchllm.jobs.errors import EngineFailed, JobError, JobInterrupted, JobSpecError
from batchllm.jobs.executor import RunFigures
from batchllm.jobs.executors.base import FATAL_ERRORS, Executor, RunContext, RunReport
from batchllm.jobs.executors.messages import (AssignUnit, Failed, Finished, Progress, Stopped,
                                              ToDriver, ToReplica, UnitDone, WantUnit)
from batchllm.jobs.executors.queue import UnitQueue, Wait
from batchllm.jobs.executors.ray_replica import (ReplicaActor, ReplicaShape, actor_options,
                                                 cause, connect, describe_cluster,
                                                 import_ray, replica_shape, reserve, wait_ready)
from batchllm.jobs.executors.worker import WorkerSetup
from batchllm.jobs.prepare import JobPlan
from batchllm.jobs.progress import progress_callback
from batchllm.jobs.spec import JobSpec
from batchllm.jobs.summary import combine_figures

POLL_S = 0.5  # how long one take() waits in the actor for a word from its replica
SHUTDOWN_WAIT_S = 60.0
ACTOR_PREFIX = "batchllm-replica-"


@dataclass(slots=True)
class _Replica:
    """The driver's view of one actor."""

    index: int
    actor: Any
    group: Any  # its placement group
    where: dict[str, Any] = field(default_factory=dict)  # pid, node, device (from start())
    poll: Any = None  # the outstanding take() call
    figures: RunFigures = field(default_factory=RunFigures)
    status: str = "running"  # running | finished | stopped | failed: ... | died: ...
    requeued: list[int] = field(default_factory=list)
    ended: bool = False  # its actor is gone (or killed) and its units are back on the queue


class RayExecutor(Executor):
    """One actor per replica on the Ray cluster of `spec.ray.address`; each builds its engine
    with `engine_factory(spec)` (default build_engine)."""

    def __init__(self, spec: JobSpec,
                 engine_factory: Callable[[JobSpec], EngineLike] | None = None) -> None:
        self.spec, self.engine_factory = spec, engine_factory
        self.where = spec.source or "job"
        self.replicas: list[_Replica] = []
        self.queue: UnitQueue | None = None
        self.fatal: JobError | None = None
        self.retries: dict[int, int] = {}
        self.started: float | None = None
        self.elapsed_s = 0.0

    def run(self, plan: JobPlan, committed: Committed, ctx: RunContext) -> RunReport:
        self.plan, self.ctx = plan, ctx
        ray = self.ray = import_ray(self.where)
        joined = connect(ray, self.spec.ray.address, self.where)
        try:
            shape = replica_shape(self.spec, ray.cluster_resources())
            self._start(shape)
            self.queue = UnitQueue([u.index for u in plan.units
                                    if not committed.units[u.index].complete],
                                   committed.units, len(self.replicas))
            for r in self.replicas:
                if r.ended:  # could not start
                    self.queue.gone(r.index, {})
            self.show = progress_callback(ctx.progress, ctx.rows_before, plan.rows_total,
                                          lambda: self._figures().engine_stats)
            with ctx.progress:
                while any(not r.ended for r in self.replicas):
                    self._serve()
        finally:
            self._shutdown()
            if joined:
                ray.shutdown()
        self._raise_outcome()
        return self.report()

    def report(self) -> RunReport:
        return RunReport(self._figures(), [self._record(r) for r in self.replicas] or None)

    def _figures(self) -> RunFigures:
        return combine_figures([r.figures for r in self.replicas], self.elapsed_s)

    def _record(self, r: _Replica) -> dict[str, Any]:
        f = r.figures
        units = self.queue.completed(r.index) if self.queue is not None else []
        return {"worker": r.index, "executor": "ray", "node": r.where.get("node"),
                "device": r.where.get("device"), "pid": r.where.get("pid"), "status": r.status,
                "units": sorted(units), "requeued": r.requeued, "rows": f.rows,
                "errors": f.errors, "prompt_tokens": f.prompt_tokens,
                "output_tokens": f.output_tokens, "elapsed_s": round(f.elapsed_s, 3)}

    # -- starting and stopping ----------------------------------------------------------------

    def _start(self, shape: ReplicaShape) -> None:
        """Reserve each replica's resources (a placement group), then start its actor. Replicas
        the cluster cannot fit within ray.placement_timeout_s are left out (all of them: fail)."""
        ray, token = self.ray, uuid.uuid4().hex[:8]
        placed = reserve(ray, shape, self.spec.ray.placement_timeout_s, self.ctx.stop, self.where)
        if len(placed) < shape.count:
            self.ctx.notice(f"the Ray cluster fits {len(placed)} of {shape.count} replicas "
                            f"({shape.describe()} each; {describe_cluster(ray)}); running with "
                            f"{len(placed)}")
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        if nodes > 1 and self.ctx.folder.local_path() is not None:
            self.ctx.notice(f"output.path {self.ctx.folder.uri} is a local folder and the Ray "
                            f"cluster has {nodes} nodes: every node must see it (a shared file "
                            "system), or use object storage (s3://...)")
        engine = dict(self.spec.engine, **({} if shape.num_gpus else {"device": "cpu"}))
        spec = replace(self.spec, engine=engine)
        threads = None if shape.num_gpus else max(1, int(shape.num_cpus))
        actor_class = ray.remote(ReplicaActor)
        for i, group in enumerate(placed):
            setup = WorkerSetup(i, spec, self.plan.shards, self.plan.units, self.plan.schema,
                                self.ctx.folder, threads, self.engine_factory)
            actor = actor_class.options(**actor_options(shape, group, f"{ACTOR_PREFIX}{token}-{i}")
                                        ).remote(setup)
            self.replicas.append(_Replica(i, actor, group))
        starts = [r.actor.start.remote() for r in self.replicas]
        wait_ready(ray, starts, self.spec.ray.placement_timeout_s, self.ctx.stop)
        for r, ref in zip(self.replicas, starts):
            try:
                r.where = ray.get(ref, timeout=0)
                r.poll = r.actor.take.remote(POLL_S)
            except Exception as e:  # noqa: BLE001 - the actor could not start: it is lost
                r.status = f"died: could not start: {cause(e)}"
        for r in self.replicas:
            if r.poll is None:
                self._end(r)

    def _begin_stop(self, signum: int) -> None:
        if not self.queue.stopping:
            self.queue.stop()
            for r in self.replicas:
                if not r.ended:
                    r.actor.stop.remote(signum)

    def _shutdown(self) -> None:
        """Leave no actor behind: ask the live ones to stop (they commit), wait, then kill."""
        live = [r for r in self.replicas if not r.ended]
        if live and self.queue is not None:
            self._begin_stop(self.ctx.stop.signum or signal.SIGTERM)
            deadline = time.monotonic() + SHUTDOWN_WAIT_S
            try:
                while any(not r.ended for r in live) and time.monotonic() < deadline:
                    self._serve()
            except Exception:  # noqa: BLE001 - leaving anyway; the kill below ends them
                pass
        for r in self.replicas:
            if not r.ended:
                self._end(r)

    def _raise_outcome(self) -> None:
        if self.fatal is not None:
            raise self.fatal
        stop = self.ctx.stop
        if stop.requested:
            signum = stop.signum or signal.SIGINT
            raise JobInterrupted(f"stopped by signal {signum}; finished rows are committed. Rerun "
                                 "the same command to resume.", signum)
        if self.queue.left:
            raise EngineFailed(
                f"all {len(self.replicas)} Ray replicas are gone with {self.queue.left} work "
                f"unit(s) unfinished ({'; '.join(self._name(r) + ': ' + r.status for r in self.replicas)}"
                "). Finished rows are committed; rerun the same command to resume.")

    # -- the loop -----------------------------------------------------------------------------

    def _serve(self) -> None:
        if self.ctx.stop.requested:
            self._begin_stop(self.ctx.stop.signum or signal.SIGINT)
        for index, answer in self.queue.wake():
            self._answer(self.replicas[index], answer)
        polls = {r.poll: r for r in self.replicas if not r.ended and r.poll is not None}
        ready, _ = self.ray.wait(list(polls), num_returns=1, timeout=0.2) if polls else ([], [])
        for ref in ready:
            r = polls[ref]
            r.poll = None
            try:
                messages = self.ray.get(ref)
            except self.ray.exceptions.RayError as e:  # the actor or its node is lost
                r.status = f"died: {cause(e)}"
                self._end(r)
                continue
            for msg in messages:
                self._handle(r, msg)
            if r.status == "running":
                r.poll = r.actor.take.remote(POLL_S)
            else:
                self._end(r)  # it said how it ended; its actor is no longer needed
        self._clock()
        self.show(self._figures(), 0)

    def _clock(self) -> None:
        """Wall time from the first unit handed out to the last unit done."""
        if self.started is not None and not self.queue.finished:
            self.elapsed_s = time.monotonic() - self.started

    def _handle(self, r: _Replica, msg: ToDriver) -> None:
        match msg:
            case WantUnit(block):
                self._answer(r, self.queue.want(r.index, block))
            case UnitDone(unit):
                self._clock()
                self.queue.done(r.index, unit)
            case Progress(figures):
                r.figures = figures
            case Finished(figures) | Stopped(figures):
                r.figures, r.status = figures, "finished" if isinstance(msg, Finished) else "stopped"
            case Failed(figures, error_class, message):
                r.figures, r.status = figures, f"failed: {message}"
                if error_class in FATAL_ERRORS and self.fatal is None:
                    self.fatal = FATAL_ERRORS[error_class](message)
                    self._begin_stop(signal.SIGTERM)
            case _:
                raise ValueError(f"unknown message from Ray replica {r.index}: {msg!r}")

    def _answer(self, r: _Replica, answer: ToReplica | Wait) -> None:
        if isinstance(answer, Wait):
            return  # answered by a later wake()
        if isinstance(answer, AssignUnit) and self.started is None:
            self.started = time.monotonic()
        r.actor.answer.remote(answer)  # a lost actor shows in its take(); its unit comes back

    def _end(self, r: _Replica) -> None:
        """The replica is done or lost: kill its actor for good (so it can no longer write),
        free its resources, and put the units it held back on the queue."""
        from ray.util.placement_group import remove_placement_group

        r.ended = True
        try:
            self.ray.kill(r.actor, no_restart=True)
            remove_placement_group(r.group)
        except Exception:  # noqa: BLE001 - already gone
            pass
        if self.queue is None:
            return
        held = self.queue.holding(r.index)
        # The chunks are the truth: a unit may have completed after its last message was lost.
        fresh = scan_committed(self.ctx.folder, self.plan.units).units if held else {}
        back = self.queue.gone(r.index, fresh)
        r.requeued += back
        if not back or self.queue.stopping:
            return
        limit = self.spec.ray.max_unit_retries
        for unit in back:
            self.retries[unit] = self.retries.get(unit, 0) + 1
        over = [u for u in back if self.retries[u] > limit]
        if over and self.fatal is None:
            u = self.plan.units[over[0]]
            self.fatal = EngineFailed(
                f"work unit {u.index} (rows {u.start}-{u.stop - 1} of "
                f"{self.plan.shards[u.shard].name}) was lost with its replica "
                f"{self.retries[u.index]} times (ray.max_unit_retries: {limit}; last: "
                f"{self._name(r)} {r.status}). Finished rows are committed; rerun the same command "
                "to resume, or raise ray.max_unit_retries")
            self._begin_stop(signal.SIGTERM)
            return
        tries = ", ".join(f"{u} (retry {self.retries[u]} of {limit})" for u in back)
        self.ctx.notice(f"{self._name(r)} {r.status}; work unit(s) {tries} go back to the queue "
                        "(their committed chunks are kept)")

    @staticmethod
    def _name(r: _Replica) -> str:
        w = r.where
        return (f"Ray replica {r.index} ({w.get('device')} on {w.get('node')}, pid {w.get('pid')})"
                if w else f"Ray replica {r.index}")


def ray_executor(spec: JobSpec, engine: EngineLike | None,
                 engine_factory: Callable[[JobSpec], EngineLike] | None) -> RayExecutor:
    """The executor for engine.executor: ray (refuses an engine object: each actor builds its own)."""
    if engine is not None:
        raise JobSpecError(f"{spec.source or 'job'}: engine.executor: ray builds one engine per "
                           "Ray actor; it cannot use the engine passed to run_job(engine=...). "
                           "Pass engine_factory= or drop one of the two.")
    return RayExecutor(spec, engine_factory)
