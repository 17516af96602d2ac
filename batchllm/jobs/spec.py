"""JobSpec: the validated job.yaml (model, input, output, sampling, engine, limits) and overrides."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from batchllm.config import ConfigError, build_engine_config
from batchllm.io.schema import kept_name
from batchllm.jobs.errors import JobSpecError
from batchllm.jobs.job_schema import check_job_dict, unknown_key
from batchllm.jobs.job_yaml import parse_job_yaml, read_job_file
from batchllm.sampling_params import SamplingParams, SamplingParamsError

DEFAULT_MODEL = "smollm2-135m"
# Engine settings that change what a request generates (part of the job fingerprint).
OUTPUT_AFFECTING_ENGINE_KEYS = ("dtype", "seed", "max_model_len", "load_format", "trust_remote_code",
                                "allow_pickle", "kv_cache_dtype", "quantization")


@dataclass(slots=True)
class InputSpec:
    path: str | None = None  # file, glob or folder (None only when `data` is given)
    format: str | None = None  # None: from the file suffix (and the first line, for JSONL)
    prompt_column: str | None = None  # default "prompt" when no column is named
    messages_column: str | None = None
    token_ids_column: str | None = None
    id_column: str | None = None  # None: "<shard name>-<row index>"
    system_prompt: str | None = None
    duplicate_ids: str = "refuse"  # refuse | allow: two rows with the same id in id_column
    structured_output_column: str | None = None  # per-row JSON schema / StructuredOutputsParams
    # prompt columns through the model's chat template (one user message): auto (when the
    # tokenizer has one) | True | False; messages always go through it
    chat_template: bool | str = "auto"
    openai_model_mismatch: str = "error"  # error | ignore: an OpenAI line naming another model
    dataset: str | None = None  # a Dataset.save_to_disk folder (instead of path)
    # an object-store path's filesystem options (credentials, endpoint); never in job.json
    storage_options: dict[str, Any] | None = None
    data: Any = None  # Python API only: a pyarrow.Table or datasets.Dataset

    @property
    def column_kind(self) -> str:
        if self.messages_column:
            return "messages"
        if self.token_ids_column:
            return "token_ids"
        return "prompt"


@dataclass(slots=True)
class OutputSpec:
    path: str
    keep_columns: list[str] = field(default_factory=list)
    format: str = "arrow"  # arrow | openai-batch (adds JSONL result lines on finalize)
    unit_rows: int = 2048  # rows per work unit (part of the plan, so of the fingerprint)
    chunk_rows: int = 256  # a unit's finished rows are committed at least every chunk_rows rows
    commit_interval_s: float = 30.0  # ... and at least this often
    final_format: str = "arrow"  # arrow | parquet | both: what finalize writes per input shard
    # an object-store path's filesystem options (credentials, endpoint); never in job.json
    storage_options: dict[str, Any] | None = None


@dataclass(slots=True)
class RaySpec:
    """The `ray:` section: where the cluster is and what one engine replica (an actor) takes."""

    address: str = "auto"  # auto (a running cluster, or RAY_ADDRESS) | local | host:port | ray://...
    num_cpus: float = 1.0  # CPUs per replica (its torch threads on a CPU replica)
    resources: dict[str, float] = field(default_factory=dict)  # custom resources per replica
    placement_timeout_s: float = 300.0  # how long to wait for the cluster to fit every replica
    max_unit_retries: int = 3  # a unit lost with its replica more often than this fails the job


@dataclass(slots=True)
class LimitsSpec:
    prompt_too_long: str = "error"  # error | truncate_left | skip


@dataclass(slots=True)
class JobSpec:
    input: InputSpec
    output: OutputSpec
    model: str = DEFAULT_MODEL
    tokenizer: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    source: str | None = None  # the job file it came from, for messages
    # engine.data_parallel_size: engine replicas (one per GPU), an int >= 1 or "auto". A job-level
    # setting, kept out of `engine` (the LLM does not take it) and out of the fingerprint.
    data_parallel_size: int | str = 1
    executor: str = "local"  # engine.executor: local (this machine) | ray (actors on a cluster)
    ray: RaySpec = field(default_factory=RaySpec)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.sampling)

    @property
    def max_num_seqs(self) -> int:
        return int(self.engine.get("max_num_seqs", 256))


def spec_from_dict(raw: Mapping[str, Any], source: str | None = None) -> JobSpec:
    """Validate a job dict (job.yaml's shape) without touching any file or model."""
    where = source or "job"
    check_job_dict(raw, where)  # every key's type and range; below, what needs several keys
    engine = dict(raw.get("engine") or {})
    inp = dict(raw["input"])
    out = dict(raw["output"])
    inp["path"] = None if inp.get("path") is None else os.fspath(inp["path"])
    if inp.get("dataset") is not None:
        inp["dataset"] = os.fspath(inp["dataset"])
    out["path"] = os.fspath(out["path"])
    spec = JobSpec(input=InputSpec(**inp), output=OutputSpec(**out),
                   limits=LimitsSpec(**(raw.get("limits") or {})), source=source,
                   model=raw.get("model") or DEFAULT_MODEL, tokenizer=raw.get("tokenizer"),
                   sampling=dict(raw.get("sampling") or {}), engine=engine,
                   data_parallel_size=engine.pop("data_parallel_size", 1),
                   executor=engine.pop("executor", "local"), ray=RaySpec(**(raw.get("ray") or {})))
    validate_spec(spec)
    return spec


def validate_spec(spec: JobSpec) -> None:
    """Checks across keys, and the sampling and engine values (each by its own validation)."""
    where = spec.source or "job"
    inp, out = spec.input, spec.output
    if inp.path is None and inp.data is None and inp.dataset is None:
        raise JobSpecError(f"{where}: missing key 'input.path' (or input.dataset: a folder "
                           "written by Dataset.save_to_disk)")
    if inp.dataset is not None and (inp.path is not None or inp.data is not None):
        raise JobSpecError(f"{where}: give input.path or input.dataset, not both")
    if inp.system_prompt is not None and inp.chat_template is False:
        raise JobSpecError(f"{where}: input.system_prompt goes into the chat template, which "
                           "input.chat_template: false turns off; drop one of the two")
    named = [k for k in ("prompt_column", "messages_column", "token_ids_column") if getattr(inp, k)]
    if len(named) > 1:
        raise JobSpecError(f"{where}: give only one of input.{', input.'.join(named)}")
    clash = _clashing_names(out.keep_columns)
    if clash:
        raise JobSpecError(f"{where}: output.keep_columns: {clash}")
    unknown = [k for k in spec.sampling if k not in SamplingParams.field_names()]
    if unknown:
        raise unknown_key(where, f"sampling.{unknown[0]}",
                          [f"sampling.{n}" for n in SamplingParams.field_names()])
    try:
        spec.sampling_params()
    except SamplingParamsError as e:
        raise JobSpecError(f"{where}: sampling.{e}") from None
    if spec.executor == "ray" and ":" in str(spec.engine.get("device", "auto")):
        raise JobSpecError(f"{where}: engine.device={spec.engine['device']!r} pins a GPU; with "
                           "engine.executor: ray each replica gets its GPUs from Ray: use device: "
                           "auto (or cuda, or cpu)")
    if "model" in spec.engine or "tokenizer" in spec.engine:
        raise JobSpecError(f"{where}: put model / tokenizer at the top level, not under engine")
    try:
        engine = {k: v for k, v in spec.engine.items() if k != "skip_tokenizer_init"}
        build_engine_config(spec.model, tokenizer=spec.tokenizer, **engine)
    except (ConfigError, TypeError, ValueError) as e:
        named = "=" in str(e).split(" ", 1)[0]  # "max_num_seqs=0 is invalid: ..."
        raise JobSpecError(f"{where}: engine{'.' if named else ': '}{e}") from None


def _clashing_names(keep: list[str]) -> str | None:
    """Two kept columns that would be written under one name (`id` and `input_id`)."""
    seen: dict[str, str] = {}
    for c in keep:
        name = kept_name(c)
        if name in seen:
            return f"{seen[name]!r} and {c!r} would both be written as {name!r}; keep only one"
        seen[name] = c
    return None


def parse_set(assignment: str) -> tuple[str, Any]:
    """'sampling.max_tokens=8' -> ('sampling.max_tokens', 8); the value is parsed as YAML."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise JobSpecError(f"--set {assignment!r}: expected key=value, e.g. sampling.max_tokens=8")
    try:
        return key.strip(), parse_job_yaml(value, f"--set {assignment!r}") if value.strip() \
            else None
    except JobSpecError as e:
        raise JobSpecError(f"{e} (the value after '=' is read as YAML)") from None


def merge_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge overrides into a job dict; keys may be dotted ('output.path') or nested dicts."""
    out = _deep_copy(raw)
    for key, value in overrides.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}  # `engine:` left empty in the file is an empty section
            node = node[p]
            if not isinstance(node, dict):
                raise JobSpecError(f"override {key!r}: {p!r} is not a section")
        last = parts[-1]
        if isinstance(value, Mapping) and isinstance(node.get(last), dict) and last != "data":
            node[last] = merge_overrides(node[last], dict(value))
        else:
            node[last] = value
    return out


def _deep_copy(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in d.items()}


def load_spec(spec: "str | Path | Mapping[str, Any] | JobSpec",
              overrides: Mapping[str, Any] | None = None) -> JobSpec:
    """A JobSpec from a job file path, a dict of the same shape or a JobSpec, plus overrides."""
    source = None
    if isinstance(spec, JobSpec):
        raw = spec_to_dict(spec)
        source = spec.source
    elif isinstance(spec, (str, Path)):
        raw, source = read_job_file(spec), str(spec)
    elif isinstance(spec, Mapping):
        raw = _deep_copy(spec)
    else:
        raise JobSpecError(f"run_job: expected a job file path, a dict or a JobSpec, got "
                           f"{type(spec).__name__}")
    if overrides:
        raw = merge_overrides(raw, overrides)
    inp = raw.get("input")
    if hasattr(inp, "num_rows") and hasattr(inp, "column_names"):
        raw["input"] = {"data": inp}  # a pyarrow.Table or datasets.Dataset
    elif isinstance(inp, (str, Path)):
        raw["input"] = {"path": str(inp)}
    return spec_from_dict(raw, source)


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    def sec(obj: Any) -> dict[str, Any]:
        return {f.name: getattr(obj, f.name) for f in fields(obj)}

    inp = sec(spec.input)
    for key in ("data", "dataset"):  # unset: left out (a JobSpec passed back in validates)
        if inp.get(key) is None:
            inp.pop(key, None)
    engine = dict(spec.engine)
    if spec.data_parallel_size != 1:
        engine["data_parallel_size"] = spec.data_parallel_size
    if spec.executor != "local":
        engine["executor"] = spec.executor
    return {"model": spec.model, "tokenizer": spec.tokenizer, "input": inp, "output": sec(spec.output),
            "sampling": dict(spec.sampling), "engine": engine, "limits": sec(spec.limits),
            **({"ray": sec(spec.ray)} if spec.ray != RaySpec() else {})}
