"""JobSpec: the validated job.yaml (model, input, output, sampling, engine, limits) and overrides."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from batchllm.config import ConfigError, build_engine_config
from batchllm.jobs.errors import JobSpecError
from batchllm.sampling_params import SamplingParams, SamplingParamsError

DEFAULT_MODEL = "smollm2-135m"
INPUT_FORMATS = ("jsonl", "parquet", "openai-batch")
OUTPUT_FORMATS = ("arrow", "openai-batch")
TOO_LONG_POLICIES = ("error", "truncate_left", "skip")
# Engine settings that change what a request generates (part of the job fingerprint).
OUTPUT_AFFECTING_ENGINE_KEYS = ("dtype", "seed", "max_model_len", "load_format", "trust_remote_code",
                                "allow_pickle", "kv_cache_dtype")


@dataclass(slots=True)
class InputSpec:
    path: str | None = None  # file, glob or folder (None only when `data` is given)
    format: str | None = None  # None: from the file suffix (and the first line, for JSONL)
    prompt_column: str | None = None  # default "prompt" when no column is named
    messages_column: str | None = None
    token_ids_column: str | None = None
    id_column: str | None = None  # None: "<shard name>-<row index>"
    system_prompt: str | None = None
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

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.sampling)

    @property
    def max_num_seqs(self) -> int:
        return int(self.engine.get("max_num_seqs", 256))


_SECTIONS: dict[str, type] = {"input": InputSpec, "output": OutputSpec, "limits": LimitsSpec}
_TOP_KEYS = ("model", "tokenizer", "input", "output", "sampling", "engine", "limits")


def _unknown(where: str, key: str, valid: list[str]) -> JobSpecError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean {near[0]!r}?" if near else f" Valid keys: {', '.join(valid)}."
    return JobSpecError(f"{where}: unknown key {key!r}.{hint}")


def _section(cls: type, name: str, raw: object, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise JobSpecError(f"{where}: `{name}` must be a mapping, got {type(raw).__name__}")
    valid = [f.name for f in fields(cls) if f.name != "data"]
    for key in raw:
        if key not in valid and not (cls is InputSpec and key == "data"):
            raise _unknown(where, f"{name}.{key}", [f"{name}.{v}" for v in valid])
    try:
        return cls(**raw)
    except TypeError as e:
        raise JobSpecError(f"{where}: `{name}` is incomplete: {e}") from None


def spec_from_dict(raw: Mapping[str, Any], source: str | None = None) -> JobSpec:
    """Validate a job dict (job.yaml's shape) without touching any file or model."""
    where = source or "job"
    if not isinstance(raw, Mapping):
        raise JobSpecError(f"{where}: a job must be a mapping of keys, got {type(raw).__name__}")
    for key in raw:
        if key not in _TOP_KEYS:
            raise _unknown(where, str(key), list(_TOP_KEYS))
    if "input" not in raw:
        raise JobSpecError(f"{where}: missing key 'input' (input.path: a file, glob or folder)")
    if "output" not in raw or not isinstance(raw["output"], Mapping) or "path" not in raw["output"]:
        raise JobSpecError(f"{where}: missing key 'output.path' (the folder the results go to)")
    inp = _section(InputSpec, "input", raw["input"], where)
    out = _section(OutputSpec, "output", raw["output"], where)
    limits = _section(LimitsSpec, "limits", raw.get("limits") or {}, where)
    engine = raw.get("engine") or {}
    if not isinstance(engine, Mapping):
        raise JobSpecError(f"{where}: `engine` must be a mapping, got {type(engine).__name__}")
    engine = dict(engine)
    spec = JobSpec(input=inp, output=out, limits=limits, source=source,
                   model=str(raw.get("model") or DEFAULT_MODEL),
                   tokenizer=raw.get("tokenizer"),
                   sampling=dict(raw.get("sampling") or {}), engine=engine,
                   data_parallel_size=engine.pop("data_parallel_size", 1))
    validate_spec(spec)
    return spec


def validate_spec(spec: JobSpec) -> None:
    """Check every value that can be checked without reading inputs or loading the model."""
    where = spec.source or "job"
    inp, out = spec.input, spec.output
    if inp.path is None and inp.data is None:
        raise JobSpecError(f"{where}: missing key 'input.path'")
    if inp.format is not None and inp.format not in INPUT_FORMATS:
        raise JobSpecError(f"{where}: input.format={inp.format!r} is invalid: expected "
                           + " | ".join(INPUT_FORMATS))
    named = [k for k in ("prompt_column", "messages_column", "token_ids_column") if getattr(inp, k)]
    if len(named) > 1:
        raise JobSpecError(f"{where}: give only one of input.{', input.'.join(named)}")
    if not isinstance(out.keep_columns, list) or not all(isinstance(c, str) for c in out.keep_columns):
        raise JobSpecError(f"{where}: output.keep_columns must be a list of column names")
    if out.format not in OUTPUT_FORMATS:
        raise JobSpecError(f"{where}: output.format={out.format!r} is invalid: expected "
                           + " | ".join(OUTPUT_FORMATS))
    for key in ("unit_rows", "chunk_rows"):
        if not isinstance(getattr(out, key), int) or getattr(out, key) < 1:
            raise JobSpecError(f"{where}: output.{key}={getattr(out, key)!r} must be an integer >= 1")
    if spec.limits.prompt_too_long not in TOO_LONG_POLICIES:
        raise JobSpecError(f"{where}: limits.prompt_too_long={spec.limits.prompt_too_long!r} is "
                           "invalid: expected " + " | ".join(TOO_LONG_POLICIES))
    unknown = [k for k in spec.sampling if k not in SamplingParams.field_names()]
    if unknown:
        raise _unknown(where, f"sampling.{unknown[0]}",
                       [f"sampling.{n}" for n in SamplingParams.field_names()])
    try:
        spec.sampling_params()
    except (SamplingParamsError, TypeError) as e:
        raise JobSpecError(f"{where}: sampling: {e}") from None
    dp = spec.data_parallel_size
    if dp != "auto" and (not isinstance(dp, int) or isinstance(dp, bool) or dp < 1):
        raise JobSpecError(f"{where}: engine.data_parallel_size={dp!r} is invalid: expected an "
                           "integer >= 1 (engine replicas, one per GPU) or 'auto' (every visible GPU)")
    if "model" in spec.engine or "tokenizer" in spec.engine:
        raise JobSpecError(f"{where}: put model / tokenizer at the top level, not under engine")
    try:
        engine = {k: v for k, v in spec.engine.items() if k != "skip_tokenizer_init"}
        build_engine_config(spec.model, tokenizer=spec.tokenizer, **engine)
    except ConfigError as e:
        raise JobSpecError(f"{where}: engine: {e}") from None
    except TypeError as e:
        raise JobSpecError(f"{where}: engine: {e}") from None


def parse_set(assignment: str) -> tuple[str, Any]:
    """'sampling.max_tokens=8' -> ('sampling.max_tokens', 8); the value is parsed as YAML."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise JobSpecError(f"--set {assignment!r}: expected key=value, e.g. sampling.max_tokens=8")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise JobSpecError(f"--set {assignment!r}: the value is not valid YAML: {e}") from None


def merge_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge overrides into a job dict; keys may be dotted ('output.path') or nested dicts."""
    out = _deep_copy(raw)
    for key, value in overrides.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
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


def read_job_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise JobSpecError(f"cannot read job file {p}: {e.strerror or e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise JobSpecError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise JobSpecError(f"{p}: a job file must be a mapping of keys (model, input, output, ...)")
    return raw


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
    if inp is not None and not isinstance(inp, Mapping) and not isinstance(inp, (str, Path)):
        raw["input"] = {"data": inp}  # a pyarrow.Table or datasets.Dataset
    elif isinstance(inp, (str, Path)):
        raw["input"] = {"path": str(inp)}
    return spec_from_dict(raw, source)


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    def sec(obj: Any) -> dict[str, Any]:
        return {f.name: getattr(obj, f.name) for f in fields(obj)}

    inp = sec(spec.input)
    if inp.get("data") is None:
        inp.pop("data", None)
    engine = dict(spec.engine)
    if spec.data_parallel_size != 1:
        engine["data_parallel_size"] = spec.data_parallel_size
    return {"model": spec.model, "tokenizer": spec.tokenizer, "input": inp, "output": sec(spec.output),
            "sampling": dict(spec.sampling), "engine": engine, "limits": sec(spec.limits)}
