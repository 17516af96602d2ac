"""run_job: the Python entry point (the CLI is a thin layer over it).

Plan and check the job, take the output location (a folder or an object-store prefix: its lock or
lease, fingerprint, resume scan), let an executor
(jobs/executors/: local, one process per replica, or Ray actors) run the incomplete units, write
summary.json.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from batchllm.io.storage import Storage, StorageError, open_storage
from batchllm.jobs.checkpoint import FolderLock, claim_folder, job_details, scan_committed
from batchllm.jobs.engine_api import EngineLike
from batchllm.jobs.errors import JobError, JobInterrupted, JobSpecError, OutputFolderError
from batchllm.jobs.executor import RunFigures, StopSignal
from batchllm.jobs.executors import (Executor, LocalExecutor, MultiProcessExecutor, RunContext,
                                     replica_devices)
from batchllm.jobs.executors.ray_executor import ray_executor
from batchllm.jobs.executors.ray_replica import check_ray
from batchllm.jobs.finalize import finalize
from batchllm.jobs.monitor import JobMonitor
from batchllm.jobs.prepare import JobPlan, plan_job
from batchllm.jobs.progress import NullProgress, ProgressSink
from batchllm.jobs.spec import JobSpec, load_spec
from batchllm.jobs.summary import build_summary, read_summary, summary_warnings, write_summary


@dataclass(slots=True)
class JobResult:
    output_path: Path | str  # the folder, or the URI of an object-store output
    summary: dict[str, Any]
    final_files: list[Path | str]
    resumed: bool

    @property
    def rows(self) -> int:
        return int(self.summary["rows"])

    @property
    def errors(self) -> int:
        return int(self.summary["errors"])


def validate_job(spec: "str | Path | Mapping[str, Any] | JobSpec", **overrides: Any) -> JobPlan:
    """Every job-level check (keys, model, inputs, columns) without loading the model."""
    spec = load_spec(spec, overrides)
    check_ray(spec)
    output_storage(spec)
    return plan_job(spec)


def run_job(spec: "str | Path | Mapping[str, Any] | JobSpec", *, overwrite: bool = False,
            finalize_outputs: bool = False, engine: EngineLike | None = None,
            engine_factory: Callable[[JobSpec], EngineLike] | None = None,
            progress: ProgressSink | None = None, stop: StopSignal | None = None,
            on_notice: Callable[[str], None] | None = None, take_over: bool = False,
            **overrides: Any) -> JobResult:
    """Run (or resume) a job and return its summary and output folder.

    `spec`: a job.yaml path, a dict of the same shape, or a JobSpec; `overrides` replace parts of
    it: `run_job("job.yaml", sampling={"max_tokens": 8}, input=my_table)` or dotted keys via
    `**{"output.path": "out/x"}`. `input` may be a pyarrow.Table or datasets.Dataset.
    `take_over`: take an object-store output's live-looking lease (its run's machine died).
    """
    spec = load_spec(spec, overrides)
    check_ray(spec)  # a missing optional Ray fails before any input is read
    folder = output_storage(spec)  # a missing bucket or bad credentials: before anything else
    plan = plan_job(spec)
    executor = _executor_for(spec, engine, engine_factory)
    notices: list[str] = []

    def notice(message: str) -> None:
        notices.append(message)
        if on_notice is not None:
            on_notice(message)

    with FolderLock(folder, take_over) as lock:
        if lock.stale is not None:
            notice(f"took over {lock.stale}")
        if lock.removed:
            notice(f"removed {len(lock.removed)} temporary file(s) of interrupted writes: "
                   + ", ".join(p.name for p in lock.removed[:5]))
        resumed = claim_folder(folder, job_details(spec, plan.shards), plan.shards,
                               overwrite=overwrite, output_format=spec.output.format)
        committed = scan_committed(folder, plan.units)
        for c in committed.corrupt:
            notice(f"corrupt chunk set aside, its rows will be redone: {c}")
        rows_before = committed.rows_done(plan.units)
        previous = read_summary(folder) if resumed else None
        monitor = JobMonitor.for_job(_monitor_folder(folder), progress or NullProgress(), plan,
                                     rows_before, previous, resumed)  # banner, live.json, ...
        monitor.start()
        status = "failed"
        try:
            if rows_before < plan.rows_total:
                executor.run(plan, committed, RunContext(
                    folder, stop or StopSignal(), monitor, rows_before, notice))
            status = "complete"
        except JobInterrupted:
            status = "interrupted"
            raise
        except JobError as e:
            e.committed = (_committed_rows(folder, plan.rows_total), plan.rows_total)
            raise
        finally:
            report = executor.report()
            summary = build_summary(folder, plan.rows_total, report.figures, previous, status,
                                    workers=report.replicas)
            for message in summary_warnings(summary):  # e.g. most answers empty
                notice(message)
            if notices:
                summary["notices"] = notices
            try:
                write_summary(folder, summary)
            except OSError:
                pass  # the chunks are the truth; a missing summary is rebuilt next run
            monitor.finish(summary, notice)  # the last live.json, report.html
        files = finalize(folder, spec.output.final_format) \
            if finalize_outputs or spec.output.format == "openai-batch" else []
    return JobResult(folder.local_path() or folder.uri, summary, files, resumed)


def output_storage(spec: JobSpec) -> Storage:
    """output.path as a Storage, checked reachable (a bucket that exists, credentials that work);
    an OutputFolderError (exit 2) otherwise."""
    try:
        store = open_storage(spec.output.path, spec.output.storage_options)
        store.check()
    except StorageError as e:
        raise OutputFolderError(f"{spec.source or 'job'}: {e}") from None
    return store


def _monitor_folder(store: Storage) -> Path:
    """Where live.json, metrics.jsonl and report.html go: the output folder, or for an object
    store (no appends; a rewrite a second costs requests) a folder of this machine."""
    local = store.local_path()
    if local is not None:
        return local
    folder = (Path.home() / ".cache" / "batchllm" / "runs"
              / hashlib.sha256(store.uri.encode()).hexdigest()[:16])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _executor_for(spec: JobSpec, engine: EngineLike | None,
                  engine_factory: Callable[[JobSpec], EngineLike] | None) -> Executor:
    """Ray actors for engine.executor: ray; else the local executor when
    engine.data_parallel_size resolves to one replica (this process's engine), else one worker
    process per replica."""
    if spec.executor == "ray":
        return ray_executor(spec, engine, engine_factory)
    if spec.data_parallel_size == 1:
        return LocalExecutor(engine, engine_factory)
    devices = replica_devices(spec)
    if len(devices) == 1:
        return LocalExecutor(engine, engine_factory)
    if engine is not None:
        raise JobSpecError(f"{spec.source or 'job'}: engine.data_parallel_size="
                           f"{spec.data_parallel_size} builds one engine per worker process; it "
                           "cannot share the engine passed to run_job(engine=...). Pass "
                           "engine_factory= (a module-level function) or drop one of the two.")
    return MultiProcessExecutor(devices, engine_factory)


def _committed_rows(folder: Storage, rows_total: int) -> int:
    try:
        return build_summary(folder, rows_total, RunFigures(), None, "failed")["rows"]
    except Exception:
        return 0
