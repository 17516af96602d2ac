"""run_job: the Python entry point (the CLI is a thin layer over it)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from batchllm.jobs.checkpoint import FolderLock, claim_folder, job_details, scan_committed
from batchllm.jobs.engine_api import EngineLike, build_engine
from batchllm.jobs.errors import JobError, JobInterrupted, JobSpecError
from batchllm.jobs.executor import JobExecutor, RunFigures, StopSignal
from batchllm.jobs.finalize import finalize
from batchllm.jobs.parallel import Coordinator, worker_devices
from batchllm.jobs.prepare import JobPlan, plan_job
from batchllm.jobs.preprocess import Preprocessor
from batchllm.jobs.progress import NullProgress, ProgressSink, progress_callback
from batchllm.jobs.spec import JobSpec, load_spec
from batchllm.jobs.summary import build_summary, read_summary, write_summary


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
    return plan_job(load_spec(spec, overrides))


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
    plan = plan_job(load_spec(spec, overrides))
    spec = plan.spec
    folder = Path(spec.output.path)
    devices = _replicas(spec, engine)
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
        ex: JobExecutor | None = None
        coord: Coordinator | None = None
        status = "failed"
        try:
            if rows_before < plan.rows_total and len(devices) > 1:
                coord = Coordinator(plan, committed, devices, folder=folder,
                                    stop=stop or StopSignal(), progress=progress or NullProgress(),
                                    rows_before=rows_before, notice=notice,
                                    engine_factory=engine_factory)
                coord.run()
            elif rows_before < plan.rows_total:
                if engine is None:
                    engine = (engine_factory or build_engine)(spec)
                prep = Preprocessor.for_job(spec, plan.shards, engine.tokenizer,
                                            engine.max_model_len)
                sink = progress or NullProgress()
                ex = JobExecutor(
                    shards=plan.shards, units=plan.units, committed=committed, engine=engine,
                    prep=prep, schema=plan.schema, folder=folder,
                    chunk_rows=spec.output.chunk_rows,
                    commit_interval_s=spec.output.commit_interval_s,
                    max_num_seqs=spec.max_num_seqs, stop=stop,
                    on_progress=progress_callback(sink, rows_before, plan.rows_total,
                                                  engine.stats))
                with sink:
                    ex.run()
            status = "complete"
        except JobInterrupted:
            status = "interrupted"
            raise
        except JobError as e:
            e.committed = (_committed_rows(folder, plan.rows_total), plan.rows_total)
            raise
        finally:
            figures = (ex.figures if ex is not None else coord.figures() if coord is not None
                       else RunFigures())
            summary = build_summary(folder, plan.rows_total, figures, previous, status,
                                    workers=coord.worker_records() if coord is not None else None)
            if notices:
                summary["notices"] = notices
            try:
                write_summary(folder, summary)
            except OSError:
                pass  # the chunks are the truth; a missing summary is rebuilt next run
        files = finalize(folder) if finalize_outputs or spec.output.format == "openai-batch" else []
    return JobResult(folder, summary, files, resumed)


def _replicas(spec: JobSpec, engine: EngineLike | None) -> list[str | None]:
    """The engine replicas to run (engine.data_parallel_size); one means this process's engine."""
    if spec.data_parallel_size == 1:
        return [None]
    devices = worker_devices(spec)
    if engine is not None and len(devices) > 1:
        raise JobSpecError(f"{spec.source or 'job'}: engine.data_parallel_size="
                           f"{spec.data_parallel_size} builds one engine per worker process; it "
                           "cannot share the engine passed to run_job(engine=...). Pass "
                           "engine_factory= (a module-level function) or drop one of the two.")
    return devices


def _committed_rows(folder: Path, rows_total: int) -> int:
    try:
        return build_summary(folder, rows_total, RunFigures(), None, "failed")["rows"]
    except Exception:
        return 0
