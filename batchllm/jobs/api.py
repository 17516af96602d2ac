"""run_job: the Python entry point (the CLI is a thin layer over it).

Plan and check the job, take the output folder (lock, fingerprint, resume scan), let an executor
(jobs/executors/: local, one process per replica, or Ray actors) run the incomplete units, write
summary.json.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from batchllm.jobs.checkpoint import FolderLock, claim_folder, job_details, scan_committed
from batchllm.jobs.engine_api import EngineLike
from batchllm.jobs.errors import JobError, JobInterrupted, JobSpecError
from batchllm.jobs.executor import RunFigures, StopSignal
from batchllm.jobs.executors import (Executor, LocalExecutor, MultiProcessExecutor, RunContext,
                                     replica_devices)
from batchllm.jobs.executors.ray_executor import check_ray, ray_executor
from batchllm.jobs.finalize import finalize
from batchllm.jobs.monitor import JobMonitor
from batchllm.jobs.prepare import JobPlan, plan_job
from batchllm.jobs.progress import NullProgress, ProgressSink
from batchllm.jobs.spec import JobSpec, load_spec
from batchllm.jobs.summary import build_summary, read_summary, summary_warnings, write_summary


@dataclass(slots=True)
class JobResult:
    output_path: Path
    summary: dict[str, Any]
    final_files: list[Path]
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
    return plan_job(spec)


def run_job(spec: "str | Path | Mapping[str, Any] | JobSpec", *, overwrite: bool = False,
            finalize_outputs: bool = False, engine: EngineLike | None = None,
            engine_factory: Callable[[JobSpec], EngineLike] | None = None,
            progress: ProgressSink | None = None, stop: StopSignal | None = None,
            on_notice: Callable[[str], None] | None = None, **overrides: Any) -> JobResult:
    """Run (or resume) a job and return its summary and output folder.

    `spec`: a job.yaml path, a dict of the same shape, or a JobSpec; `overrides` replace parts of
    it: `run_job("job.yaml", sampling={"max_tokens": 8}, input=my_table)` or dotted keys via
    `**{"output.path": "out/x"}`. `input` may be a pyarrow.Table or datasets.Dataset.
    """
    spec = load_spec(spec, overrides)
    check_ray(spec)  # a missing optional Ray fails before any input is read
    plan = plan_job(spec)
    folder = Path(spec.output.path)
    executor = _executor_for(spec, engine, engine_factory)
    notices: list[str] = []

    def notice(message: str) -> None:
        notices.append(message)
        if on_notice is not None:
            on_notice(message)

    with FolderLock(folder) as lock:
        if lock.stale_pid is not None:
            notice(f"took over a stale lock left by pid {lock.stale_pid} (that run is gone)")
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
        monitor = JobMonitor.for_job(folder, progress or NullProgress(), plan, rows_before,
                                     previous, resumed)  # banner, live.json, metrics.jsonl
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
    return JobResult(folder, summary, files, resumed)


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


def _committed_rows(folder: Path, rows_total: int) -> int:
    try:
        return build_summary(folder, rows_total, RunFigures(), None, "failed")["rows"]
    except Exception:
        return 0
