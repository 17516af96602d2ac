"""The executor interface: how a job's incomplete work units reach its engine replicas.

    run_job: lock, fingerprint, plan, resume scan ─► Executor.run(plan, committed, ctx)
                                                    ─► summary.json from Executor.report()

An executor runs every incomplete unit of `plan` through the ordinary JobExecutor loop, in one
engine (LocalExecutor), in one process per replica (MultiProcessExecutor), or elsewhere (a Ray
executor, with actors as replicas: the same UnitQueue and messages, carried by actor calls).
What every implementation keeps true:

- Each replica commits its own chunks under `ctx.folder`; a unit is held by one replica at a time
  (UnitQueue), so replicas never write the same file. What is committed is the truth: a unit whose
  replica is lost goes back to the queue with its committed state read afresh (scan_committed).
- `ctx.stop` (set by a signal handler) stops admitting rows; finished rows are committed and
  run() raises JobInterrupted. An error every replica would meet (FATAL_ERRORS) stops the job at
  once and is raised as its own class. When every replica is gone with work left, run() raises
  EngineFailed (all_replicas_gone). Nothing the executor started outlives run().
- `ctx.progress` is entered for the length of the run and shown the combined figures;
  `ctx.notice` is told of events the user should see (a replica lost, its units requeued).
- report() says what this run did so far: valid after run() returned or raised (summary.json is
  written from it either way).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

from batchllm.io.storage import Storage
from batchllm.jobs import errors
from batchllm.jobs.checkpoint import Committed
from batchllm.jobs.errors import EngineFailed
from batchllm.jobs.executor import RunFigures, StopSignal
from batchllm.jobs.prepare import JobPlan
from batchllm.jobs.progress import ProgressSink

# Errors every replica would meet: the job stops at once instead of retiring the replica.
FATAL_ERRORS: dict[str, type[errors.JobError]] = {
    c.__name__: c for c in (errors.JobSpecError, errors.JobInputError, errors.JobModelError,
                            errors.OutputFolderError, errors.OutputWriteError)}


@dataclass(slots=True)
class RunContext:
    """What run_job gives an executor besides the plan: where, how to stop, whom to tell."""

    folder: Storage  # output.path: a folder or an object-store prefix (picklable)
    stop: StopSignal
    progress: ProgressSink
    rows_before: int  # rows committed before this run (for progress)
    notice: Callable[[str], None]


@dataclass(slots=True)
class RunReport:
    """What one run did: its figures (summed over replicas, throughput over wall time) and, for a
    multi-replica run, one record per replica (summary.json `data_parallel.workers`): worker,
    device, pid, status (running | finished | stopped | failed: ... | died: ...), units, rows,
    errors, prompt_tokens, output_tokens, elapsed_s."""

    figures: RunFigures = field(default_factory=RunFigures)
    replicas: list[dict[str, Any]] | None = None


class Executor(ABC):
    """Runs a job's incomplete work units on one or more engine replicas."""

    @abstractmethod
    def run(self, plan: JobPlan, committed: Committed, ctx: RunContext) -> RunReport:
        """Run every unit `committed` does not show complete; raises JobInterrupted, a
        FATAL_ERRORS class, EngineFailed, or another JobError."""

    @abstractmethod
    def report(self) -> RunReport:
        """What this run did so far (also after run() raised)."""


def all_replicas_gone(statuses: list[str], left: int) -> EngineFailed:
    """The error when every replica is gone with `left` units unfinished; `statuses` name each
    replica and how it ended."""
    return EngineFailed(
        f"all {len(statuses)} data-parallel workers are gone with {left} work unit(s) unfinished "
        f"({'; '.join(statuses)}). Finished rows are committed; rerun the same command to resume "
        "(lower engine.data_parallel_size if a device is faulty).")
