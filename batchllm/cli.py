"""The `batchllm` command: run, validate, inspect, finalize (typer app; rich output)."""
from __future__ import annotations

import json
import os
import shlex
import signal
from pathlib import Path
from typing import Any

import typer

from batchllm.jobs.errors import JobError, JobInterrupted

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Offline batch inference for LLMs: resumable jobs over Parquet / JSONL.")
JOB_ARG = "JOB.yaml"
SET_METAVAR = "KEY=VALUE"  # not typer's <list[str]>


def _print_version(value: bool) -> None:
    if value:
        from batchllm import __version__

        typer.echo(f"batchllm {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version,
                                          is_eager=True, metavar="",
                                          help="print the version and exit")) -> None:
    """Offline batch inference for LLMs: resumable jobs over Parquet / JSONL."""


def _fail(e: JobError, resume_command: str | None = None) -> None:
    typer.echo(f"error: {e}", err=True)
    if e.committed is not None and resume_command is not None:
        done, total = e.committed
        typer.echo(f"{done} of {total} rows are committed and kept; after fixing the cause, "
                   f"resume with: {resume_command}", err=True)
    raise typer.Exit(e.exit_code)


def _resume_command(job: Path, sets: list[str], finalize: bool) -> str:
    words = ["batchllm", "run", str(job)] + [w for s in sets for w in ("--set", s)]
    return shlex.join(words + (["--finalize"] if finalize else []))


def _overrides(sets: list[str]) -> dict[str, Any]:
    from batchllm.jobs.spec import parse_set

    return dict(parse_set(s) for s in sets)


class _SignalStop:
    """First SIGINT/SIGTERM: stop admitting, commit, exit 130/143. Second: exit at once."""

    def __init__(self, stop: Any) -> None:
        self.stop = stop
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop.requested:
            # Committed chunks are whole files (renamed into place), so nothing committed is
            # lost; a half-written temporary file is removed by the next run.
            os.write(2, f"\nsecond signal {signum}: exiting at once; committed rows are kept, "
                        "rerun the same command to resume\n".encode())
            os._exit(128 + signum)
        self.stop.signum = signum
        typer.echo(f"\nstopping after signal {signum}: committing finished rows "
                   "(send it again to exit at once)", err=True)

    def __enter__(self) -> "_SignalStop":
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


@app.command()
def run(job: Path = typer.Argument(..., help="the job file", metavar=JOB_ARG),
        resume: bool = typer.Option(True, "--resume/--overwrite", metavar="",
                                    help="continue a job in its output folder, or discard it"),
        set_: list[str] = typer.Option([], "--set", metavar=SET_METAVAR,
                                       help="override a key: --set sampling.max_tokens=8"),
        finalize: bool = typer.Option(False, "--finalize", metavar="",
                                      help="also write one file per input shard"),
        quiet: bool = typer.Option(False, "--quiet", "-q", metavar="",
                                   help="no progress display"),
        take_over: bool = typer.Option(False, "--take-over", metavar="",
                                       help="take an object-store output's lease from a run "
                                            "whose machine died")) -> None:
    """Run a job (rerun the same command to resume after a crash or Ctrl-C)."""
    from batchllm.jobs.api import run_job
    from batchllm.jobs.executor import StopSignal
    from batchllm.jobs.progress import NullProgress, default_progress

    stop = StopSignal()
    again = _resume_command(job, set_, finalize)
    if hasattr(signal, "SIGXFSZ"):
        # Past a file-size limit (ulimit -f) a write then fails with EFBIG, which the writer
        # reports, instead of the signal killing the process mid-commit.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        with _SignalStop(stop):
            result = run_job(job, overwrite=not resume, finalize_outputs=finalize, stop=stop,
                             progress=NullProgress() if quiet else default_progress(),
                             on_notice=lambda m: typer.echo(f"note: {m}", err=True),
                             take_over=take_over, **_overrides(set_))
    except JobInterrupted as e:
        typer.echo(f"interrupted: {e}\nresume with: {again}", err=True)
        raise typer.Exit(e.exit_code)
    except JobError as e:
        _fail(e, again)
    s = result.summary
    replicas = f" over {s['data_parallel']['size']} engine replicas" if "data_parallel" in s else ""
    typer.echo(f"done: {s['rows']} rows ({s['errors']} errors, {s['skipped']} skipped), "
               f"{s['output_tokens']} output tokens, "
               f"{s['throughput']['output_tokens_per_s']:.1f} tok/s{replicas} "
               f"-> {result.output_path}")
    for f in result.final_files:
        typer.echo(f"wrote {f}")


@app.command("run-batch")
def run_batch(input_file: str = typer.Option(..., "-i", "--input-file", metavar="IN.jsonl",
                                             help="OpenAI batch requests, one JSON object a line"),
              output_file: str = typer.Option(..., "-o", "--output-file", metavar="OUT.jsonl",
                                              help="the batch output lines, in input order"),
              model: str = typer.Option(..., "--model", metavar="MODEL",
                                        help="HF model folder, .gguf file or known short name"),
              tokenizer: str = typer.Option(None, "--tokenizer", metavar="PATH"),
              dtype: str = typer.Option(None, "--dtype", metavar="DTYPE"),
              max_model_len: int = typer.Option(None, "--max-model-len", metavar="N"),
              max_num_seqs: int = typer.Option(None, "--max-num-seqs", metavar="N"),
              gpu_memory_utilization: float = typer.Option(None, "--gpu-memory-utilization",
                                                           metavar="F"),
              tensor_parallel_size: int = typer.Option(None, "--tensor-parallel-size", "-tp",
                                                       metavar="N"),
              seed: int = typer.Option(None, "--seed", metavar="N"),
              enforce_eager: bool = typer.Option(False, "--enforce-eager", metavar=""),
              trust_remote_code: bool = typer.Option(False, "--trust-remote-code", metavar=""),
              generation_config: str = typer.Option(
                  "auto", "--generation-config", metavar="auto|vllm",
                  help="auto: request defaults from the model's generation_config.json"),
              set_: list[str] = typer.Option([], "--set", metavar=SET_METAVAR,
                                             help="any job key: --set engine.kv_cache_dtype=fp8"),
              resume: bool = typer.Option(True, "--resume/--overwrite", metavar="",
                                          help="continue the batch's job, or discard it"),
              quiet: bool = typer.Option(False, "--quiet", "-q", metavar="",
                                         help="no progress display")) -> None:
    """vLLM's run-batch: OpenAI batch JSONL in, batch output JSONL out. Resumable: the job's
    state is kept in .OUT.jsonl.batchllm/ beside the output; rerun the same command."""
    from batchllm.jobs.executor import StopSignal
    from batchllm.jobs.progress import NullProgress, default_progress
    from batchllm.jobs.run_batch import run_batch as run_batch_job

    engine: dict[str, Any] = {k: v for k, v in dict(
        dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs, seed=seed,
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size).items() if v is not None}
    engine.update({k: True for k, on in (("enforce_eager", enforce_eager),
                                         ("trust_remote_code", trust_remote_code)) if on})
    stop = StopSignal()
    again = shlex.join(["batchllm", "run-batch", "-i", input_file, "-o", output_file, "--model",
                        model] + [w for s in set_ for w in ("--set", s)])
    try:
        with _SignalStop(stop):
            result = run_batch_job(input_file, output_file, model, tokenizer=tokenizer,
                                   engine_settings=engine, generation_config=generation_config,
                                   overwrite=not resume, stop=stop,
                                   progress=NullProgress() if quiet else default_progress(),
                                   on_notice=lambda m: typer.echo(f"note: {m}", err=True),
                                   **_overrides(set_))
    except JobInterrupted as e:
        typer.echo(f"interrupted: {e}\nresume with: {again}", err=True)
        raise typer.Exit(e.exit_code)
    except JobError as e:
        _fail(e, again)
    s = result.summary
    typer.echo(f"done: {s['rows']} requests ({s['errors']} errors), {s['output_tokens']} output "
               f"tokens -> {output_file} (job state: {result.output_path})")


@app.command()
def validate(job: Path = typer.Argument(..., help="the job file", metavar=JOB_ARG),
             set_: list[str] = typer.Option([], "--set", metavar=SET_METAVAR,
                                            help="override a key")) -> None:
    """Check a job file, its model, device, inputs and columns without loading the model."""
    from batchllm.jobs.api import validate_job

    try:
        plan = validate_job(job, **_overrides(set_))
    except JobError as e:
        _fail(e)
    typer.echo(f"ok: {len(plan.shards)} shard(s), {plan.rows_total} rows, {len(plan.units)} "
               f"work unit(s), model {plan.spec.model} -> {plan.spec.output.path}")


@app.command()
def inspect(out: str = typer.Argument(..., help="an output folder or URI", metavar="OUT"),
            rows: int = typer.Option(5, min=0, metavar="N", help="how many rows to show")) -> None:
    """Print a job's live figures (while it runs), its summary and a few output rows."""
    import pyarrow as pa
    from rich.console import Console
    from rich.table import Table

    from batchllm.io.storage import open_storage
    from batchllm.jobs.checkpoint import CHUNKS, read_job_record
    from batchllm.jobs.monitor import live_view
    from batchllm.jobs.summary import read_summary

    try:
        store = open_storage(out)  # a folder, or s3://... (credentials from the environment)
        store.check()  # a missing bucket or bad credentials, said as such
        read_job_record(store)
    except JobError as e:
        _fail(e)
    except OSError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    console = Console()
    local = store.local_path()
    view = live_view(local) if local else None  # written by the running job every few seconds
    if view is not None:
        console.print(view[0], soft_wrap=True)
        live = Table()
        live.add_column("figure")
        live.add_column("value", justify="right")
        for k, v in view[1]:
            live.add_row(k, v)
        console.print(live)
    summary = read_summary(store)
    t = Table(title=f"summary of {out}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, v in (summary.items() if isinstance(summary, dict) else []):
        t.add_row(str(k), json.dumps(v) if isinstance(v, dict) else str(v))
    console.print(t)
    chunks = [n for n in store.list(CHUNKS) if n.endswith(".arrow")]
    if not chunks:
        console.print("no committed rows yet")
        return
    try:
        table = store.read_arrow(f"{CHUNKS}/{chunks[0]}").slice(0, rows)
    except (pa.ArrowInvalid, OSError) as e:
        typer.echo(f"note: {chunks[0]} is unreadable ({str(e).splitlines()[0]}); the next "
                   "run sets it aside and redoes its rows", err=True)
        return
    cols = [c for c in ("id", "input_row", "text", "finish_reason", "num_output_tokens", "error")
            if c in table.column_names]
    r = Table(title=f"first rows of {chunks[0]}")
    for c in cols:
        r.add_column(c, overflow="fold", max_width=60 if c == "text" else None)
    for row in table.select(cols).to_pylist():
        r.add_row(*("" if row[c] is None else str(row[c]) for c in cols))
    console.print(r)


@app.command()
def report(out: Path = typer.Argument(..., help="an output folder", metavar="OUT")) -> None:
    """Write OUT/report.html again: the job's figures and plots (needs matplotlib)."""
    from batchllm.io.writers import WriteFailed
    from batchllm.jobs.checkpoint import read_job_record
    from batchllm.jobs.report import ReportUnavailable, write_report

    try:
        read_job_record(out)
    except JobError as e:
        _fail(e)
    try:
        typer.echo(f"wrote {write_report(out)}")
    except (ReportUnavailable, WriteFailed) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)


@app.command("finalize")
def finalize_cmd(out: str = typer.Argument(..., help="an output folder or URI", metavar="OUT"),
                 fmt: str = typer.Option("arrow", "--format", metavar="arrow|parquet|both",
                                         help="Arrow IPC files, Parquet (HF datasets and any "
                                              "other reader), or both")) -> None:
    """Write one file per input shard, rows in input order (the job must be complete)."""
    from batchllm.jobs.finalize import finalize

    try:
        files = finalize(out, fmt)
    except JobError as e:
        _fail(e)
    for f in files:
        typer.echo(f"wrote {f}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
