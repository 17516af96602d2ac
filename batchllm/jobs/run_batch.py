"""`batchllm run-batch -i in.jsonl -o out.jsonl --model M`: vLLM's run-batch as a resumable job.

The input is an OpenAI batch file (one request per line: custom_id, method, url, body); the
output file gets one OpenAI batch output line per request, in input order, once every request is
answered (a request that cannot be served gets its line with the reason, as vLLM writes it).
Underneath it is a job with input and output format openai-batch whose state (job.json, the
committed chunks, summary.json, final/) lives in a hidden folder beside the output file,
`.<output name>.batchllm/`: rerunning the same command after a crash or Ctrl-C resumes from it,
and the output file is written (atomically) only when the job is complete.

As vLLM does, requests that do not say otherwise run with the model's generation_config.json
defaults (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens;
`generation_config="vllm"` ignores them) and without a max_tokens cap (up to the model's length).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from batchllm.jobs.errors import JobError, JobSpecError, OutputWriteError

# generation_config.json key -> SamplingParams field (the keys vLLM takes as request defaults)
GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                       "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                       "max_new_tokens": "max_tokens"}


def state_folder(output_file: str | Path) -> Path:
    """Where run-batch keeps the job behind `output_file`: `.<name>.batchllm` beside it."""
    out = Path(output_file)
    return out.parent / f".{out.name}.batchllm"


def generation_defaults(model: str) -> dict[str, Any]:
    """The sampling defaults in the model folder's generation_config.json (empty without one;
    a model that cannot be found here is left for the job's pre-flight to report)."""
    folder = Path(model)
    if not folder.is_dir():
        try:
            from batchllm import hub

            folder = hub.resolve_model(model)
        except Exception:  # missing or unreadable: the job names the problem, exit 2
            return {}
    path = folder / "generation_config.json" if folder.is_dir() else None
    if path is None or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    return {field: config[key] for key, field in GENERATION_DEFAULTS.items()
            if config.get(key) is not None}


def batch_job(input_file: str | Path, output_file: str | Path, model: str, *,
              tokenizer: str | None = None, engine_settings: dict[str, Any] | None = None,
              generation_config: str = "auto") -> dict[str, Any]:
    """The job run-batch runs (job.yaml's shape)."""
    for flag, value in (("-i/--input-file", input_file), ("-o/--output-file", output_file)):
        if str(value).startswith(("http://", "https://")):
            raise JobSpecError(f"{flag} {value}: URLs are not supported; use a local file")
    if generation_config not in ("auto", "vllm"):
        raise JobSpecError(f"--generation-config {generation_config!r}: expected auto (the "
                           "model's generation_config.json) or vllm (vLLM's own defaults)")
    sampling: dict[str, Any] = {"max_tokens": None}
    if generation_config == "auto":
        sampling.update(generation_defaults(model))
    return {"model": model, "tokenizer": tokenizer,
            "input": {"path": os.fspath(input_file), "format": "openai-batch"},
            "output": {"path": os.fspath(state_folder(output_file)), "format": "openai-batch"},
            "sampling": sampling, "engine": dict(engine_settings or {})}


def run_batch(input_file: str | Path, output_file: str | Path, model: str, *,
              tokenizer: str | None = None, engine_settings: dict[str, Any] | None = None,
              generation_config: str = "auto", **run_options: Any):
    """Run (or resume) the batch and write `output_file`; returns the JobResult.
    `engine_settings`: LLM(...) engine settings; `run_options`: run_job's keywords (overwrite,
    progress, stop, on_notice, engine, ...) and dotted overrides ("sampling.max_tokens": 8)."""
    from batchllm.jobs.api import run_job

    spec = batch_job(input_file, output_file, model, tokenizer=tokenizer,
                     engine_settings=engine_settings, generation_config=generation_config)
    result = run_job(spec, **run_options)
    lines = [f for f in result.final_files if str(f).endswith(".openai.jsonl")]
    if len(lines) != 1:
        raise JobError(f"the job in {result.output_path} wrote {len(lines)} OpenAI batch output "
                       "files; expected one")
    write_atomic(Path(output_file), Path(lines[0]).read_bytes())
    return result


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file through a temporary name beside it, fsynced, then renamed into place."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"  # permissions as the umask says
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise OutputWriteError(f"cannot write {path}: {e.strerror or e}") from None
