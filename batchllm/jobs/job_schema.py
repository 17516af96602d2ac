"""The job file's schema: every key with its type and range, checked before anything is read or
loaded. An unknown key or value names the nearest valid one; the message always names the key.

Sampling values are checked by SamplingParams and engine ranges by batchllm.config; here their
types (from the config dataclasses' annotations) and the job's own sections.
"""
from __future__ import annotations

import difflib
import math
import os
from dataclasses import fields
from typing import Any, Callable, Mapping

from batchllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, \
    engine_config_field_names
from batchllm.io.text import unencodable
from batchllm.jobs.errors import JobSpecError

INPUT_FORMATS = ("jsonl", "parquet", "openai-batch")
OUTPUT_FORMATS = ("arrow", "openai-batch")
TOO_LONG_POLICIES = ("error", "truncate_left", "skip")
DUPLICATE_IDS = ("refuse", "allow")
MODEL_MISMATCH = ("error", "ignore")
FINAL_FORMATS = ("arrow", "parquet", "both")
JOB_ENGINE_KEYS = ("data_parallel_size", "skip_tokenizer_init", "executor")  # besides LLM(...)'s
EXECUTORS = ("local", "ray")
INT_MAX = 2**63 - 1

Check = Callable[[Any], str | None]  # a value -> what was expected, or None when it is fine


def near(value: object, options: list[str] | tuple[str, ...]) -> str:
    """' Did you mean 'x'?' for the closest option, or ''."""
    if not isinstance(value, str):
        return ""
    found = difflib.get_close_matches(value, list(options), n=1, cutoff=0.5)
    return f" Did you mean {found[0]!r}?" if found else ""


def unknown_key(where: str, key: str, valid: list[str]) -> JobSpecError:
    hint = near(key, valid) or f" Valid keys: {', '.join(valid)}."
    return JobSpecError(f"{where}: unknown key {key!r}.{hint}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) and abs(v) <= INT_MAX) or (isinstance(v, float) and math.isfinite(v))


def text(null: bool = False, what: str = "a non-empty string", empty: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if v is None and null:
            return None
        if isinstance(v, str) and (empty or v.strip()) and not unencodable(v):
            return None
        return what + (" or null" if null else "") + (" (valid Unicode text)" if isinstance(
            v, str) and unencodable(v) else "")
    return check


def path_like(what: str, null: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if v is None and null:
            return None
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        return None if isinstance(v, str) and v.strip() and "\0" not in v else what
    return check


def integer(lo: int, hi: int = INT_MAX, what: str = "") -> Check:
    def check(v: Any) -> str | None:
        if _is_int(v) and lo <= v <= hi:
            return None
        bound = f"an integer >= {lo}" if hi == INT_MAX else f"an integer in [{lo}, {hi}]"
        return bound + (f" ({what})" if what else "")
    return check


def positive_number(what: str) -> Check:
    return lambda v: None if _is_number(v) and v > 0 else f"a number > 0 ({what})"


def choice(options: tuple[str, ...], null: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if (v is None and null) or (isinstance(v, str) and v in options):
            return None
        return " | ".join(options) + (" or null" if null else "") + "." + near(v, options)
    return check


def storage_options() -> Check:
    """<section>.storage_options: keyword arguments of the store's filesystem (for s3:
    access_key, secret_key, session_token, region, endpoint_url, ...); checked by the store."""
    def check(v: Any) -> str | None:
        if v is None or (isinstance(v, Mapping) and all(
                isinstance(k, str) and k and (v[k] is None or isinstance(v[k], (str, int, float,
                                                                              bool)))
                for k in v)):
            return None
        return ("a mapping of the object store's options to plain values, e.g. "
                "{endpoint_url: http://localhost:9000, region: us-east-1}")
    return check


def names() -> Check:
    def check(v: Any) -> str | None:
        if isinstance(v, list) and all(isinstance(c, str) and c and not unencodable(c) for c in v):
            return None if len(set(v)) == len(v) else "a list of column names, each named once"
        return "a list of column names, e.g. [label, source]"
    return check


INPUT: dict[str, Check] = {
    "path": path_like("a file, glob or folder (a string)", null=True),  # null: input.data
    "format": choice(INPUT_FORMATS, null=True),
    "prompt_column": text(null=True, what="a column name"),
    "messages_column": text(null=True, what="a column name"),
    "token_ids_column": text(null=True, what="a column name"),
    "id_column": text(null=True, what="a column name"),
    "system_prompt": text(null=True, what="a string", empty=True),
    "duplicate_ids": choice(DUPLICATE_IDS),
    "structured_output_column": text(null=True, what="a column name"),
    "chat_template": lambda v: None if v == "auto" or isinstance(v, bool) else (
        "auto | true | false (prompt columns through the model's chat template; auto: when the "
        "model has one)"),
    "openai_model_mismatch": choice(MODEL_MISMATCH),
    "dataset": path_like("a folder written by Dataset.save_to_disk (a string)", null=True),
    "storage_options": storage_options(),
}
OUTPUT: dict[str, Check] = {
    "path": path_like("a folder, or an object-store URI such as s3://bucket/prefix (a string)"),
    "keep_columns": names(),
    "format": choice(OUTPUT_FORMATS),
    "unit_rows": integer(1, 2**31 - 1, "rows per work unit"),
    "chunk_rows": integer(1, 2**31 - 1, "rows per committed chunk"),
    "commit_interval_s": positive_number("seconds"),
    "final_format": choice(FINAL_FORMATS),
    "storage_options": storage_options(),
}
LIMITS: dict[str, Check] = {"prompt_too_long": choice(TOO_LONG_POLICIES)}
STRUCTURED: dict[str, Check] = {  # sampling.structured_outputs: give one of these
    "json": lambda v: None if isinstance(v, (Mapping, str)) and v else (
        "a JSON schema (a mapping, or its JSON text)"),
    "regex": text(null=True, what="a regular expression"),
    "choice": lambda v: None if v is None or (isinstance(v, list) and v and all(
        isinstance(c, str) and c for c in v)) else "a list of non-empty strings",
    "grammar": text(null=True, what="a grammar (Lark, or GBNF with ::= rules)"),
    "json_object": lambda v: None if v in (None, True, False) else "true or false",
}
RAY: dict[str, Check] = {  # the `ray:` section (engine.executor: ray)
    "address": text(what="auto, local, host:port or ray://host:port"),
    "num_cpus": lambda v: None if _is_number(v) and v >= 0 else "a number >= 0 (CPUs per replica)",
    "resources": lambda v: None if isinstance(v, Mapping) and all(
        isinstance(k, str) and k and _is_number(n) and n >= 0 for k, n in v.items()) else (
        "a mapping of Ray resource names to amounts per replica, e.g. {accelerator_type:H100: 1}"),
    "placement_timeout_s": positive_number("seconds to wait for the cluster to fit the replicas"),
    "max_unit_retries": integer(0, 1000, "times a unit lost with its replica is retried"),
}
TOP: dict[str, Check] = {
    "model": text(null=True, what="an HF model folder, a .gguf file or a known short name"),
    "tokenizer": text(null=True, what="a tokenizer folder"),
}
SECTIONS = ("input", "output", "sampling", "engine", "limits", "ray")


def _annotation_check(annotation: str) -> Check:
    """A check from a config field's annotation ('int', 'float', 'bool | None', 'str', ...)."""
    kinds = {part.strip() for part in str(annotation).split("|")}
    null = "None" in kinds

    def check(v: Any) -> str | None:
        if v is None and null:
            return None
        if "bool" in kinds and isinstance(v, bool):
            return None
        if "int" in kinds and _is_int(v) and abs(v) <= INT_MAX:
            return None
        if "float" in kinds and _is_number(v):
            return None
        if "str" in kinds and isinstance(v, str) and not unencodable(v):
            return None
        words = {"int": "an integer", "float": "a number", "bool": "true or false",
                 "str": "a string", "None": "null"}
        return " or ".join(words.get(k, k) for k in sorted(kinds, key=lambda k: k == "None"))
    return check


def _engine_checks() -> dict[str, Check]:
    checks: dict[str, Check] = {}
    owners = engine_config_field_names()
    for cls in (ModelConfig, CacheConfig, SchedulerConfig, EngineConfig):
        for f in fields(cls):
            if owners.get(f.name) is cls and f.name not in ("model", "tokenizer"):
                checks[f.name] = _annotation_check(f.type)
    checks["skip_tokenizer_init"] = _annotation_check("bool")
    checks["data_parallel_size"] = lambda v: None if v == "auto" or (
        _is_int(v) and 1 <= v <= 4096) else ("an integer >= 1 (engine replicas, one per GPU) or "
                                            "'auto' (every visible GPU)")
    checks["executor"] = choice(EXECUTORS)
    return checks


def _bad(where: str, key: str, value: Any, expected: str) -> JobSpecError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return JobSpecError(f"{where}: {key}={shown} is invalid: expected {expected}")


def _check_section(where: str, name: str, raw: Any, checks: Mapping[str, Check],
                   extra: tuple[str, ...] = ()) -> None:
    if not isinstance(raw, Mapping):
        raise JobSpecError(f"{where}: `{name}` must be a mapping of keys, got "
                           f"{type(raw).__name__} {_short(raw)}")
    valid = list(checks)
    for key, value in raw.items():
        if key in extra:
            continue
        if key not in checks:
            raise unknown_key(where, f"{name}.{key}", [f"{name}.{v}" for v in valid])
        expected = checks[key](value)
        if expected is not None:
            raise _bad(where, f"{name}.{key}", value, expected)


def _short(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def check_job_dict(raw: Mapping[str, Any], where: str) -> None:
    """Every key's type and range (job.yaml's shape); raises JobSpecError naming the key."""
    if not isinstance(raw, Mapping):
        raise JobSpecError(f"{where}: a job must be a mapping of keys, got {type(raw).__name__}")
    for key in raw:
        if key not in TOP and key not in SECTIONS:
            raise unknown_key(where, str(key), [*TOP, *SECTIONS])
    for key, check in TOP.items():
        expected = check(raw.get(key))
        if expected is not None:
            raise _bad(where, key, raw.get(key), expected)
    if "input" not in raw:
        raise JobSpecError(f"{where}: missing key 'input' (input.path: a file, glob or folder)")
    _check_section(where, "input", raw["input"], INPUT, extra=("data",))
    if not isinstance(raw.get("output"), Mapping) or "path" not in raw["output"]:
        raise JobSpecError(f"{where}: missing key 'output.path' (the folder the results go to)")
    _check_section(where, "output", raw["output"], OUTPUT)
    engine = raw.get("engine")
    if isinstance(engine, Mapping) and ("model" in engine or "tokenizer" in engine):
        raise JobSpecError(f"{where}: put model / tokenizer at the top level, not under engine")
    for name, checks in (("limits", LIMITS), ("engine", _engine_checks()), ("ray", RAY)):
        if raw.get(name) is not None:
            _check_section(where, name, raw[name], checks)
    if raw.get("sampling") is not None and not isinstance(raw["sampling"], Mapping):
        raise JobSpecError(f"{where}: `sampling` must be a mapping of SamplingParams fields, e.g. "
                           f"{{max_tokens: 64, temperature: 0.0}}; got {type(raw['sampling']).__name__}"
                           f" {_short(raw['sampling'])}")
    if (raw.get("sampling") or {}).get("structured_outputs") is not None:
        _check_structured(where, raw["sampling"]["structured_outputs"])


def _check_structured(where: str, raw: Any) -> None:
    """sampling.structured_outputs: its keys' types, then the constraint itself (an invalid
    schema, regex or grammar would fail every row, so it fails the job up front)."""
    from batchllm.sampling_params import SamplingParamsError, StructuredOutputsParams
    from batchllm.structured import check_grammar

    _check_section(where, "sampling.structured_outputs", raw, STRUCTURED)
    try:
        problem = check_grammar(StructuredOutputsParams(**raw))
    except SamplingParamsError as e:
        problem = str(e)
    if problem:
        named = problem.startswith("structured_outputs")
        raise JobSpecError(f"{where}: sampling.{'' if named else 'structured_outputs: '}{problem}")
