"""Input row -> engine request: prompt from its column, chat template, per-row overrides, length policy.

Row-level problems never raise: they come back as a Prepared with `error` set (or `skipped`).
Everything the engine and the writer will need is checked here, when the row is read: per-row
settings (SamplingParams' types and ranges), the prompt's type, token ids' range, and text that
UTF-8 cannot encode (refused in a prompt; escaped in the id and kept columns, which are written
with the error row).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from batchllm.io.readers import InputRow, Shard
from batchllm.io.schema import kept_name
from batchllm.io.text import escape_unencodable, unencodable
from batchllm.jobs.spec import JobSpec
from batchllm.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputsParams

ROW_OVERRIDES = ("max_tokens", "temperature", "top_p", "seed", "stop")
MAX_TOKEN_ID = 2**31 - 1  # what an int32 token column holds; the engine checks the vocabulary


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            system_prompt: str | None = None) -> list[int]: ...


@dataclass(slots=True)
class Prepared:
    """One input row, ready for the engine (prompt_ids + params) or already settled (error/skipped)."""

    unit: int
    shard: int
    row: int
    row_id: str
    input_file: str
    kept: dict[str, Any] = field(default_factory=dict)
    prompt_ids: list[int] | None = None
    params: SamplingParams | None = None
    error: str | None = None
    skipped: bool = False

    @property
    def request_id(self) -> str:
        return f"{self.unit}:{self.row}"

    @property
    def settled(self) -> bool:
        return self.error is not None or self.skipped


@dataclass(slots=True)
class Preprocessor:
    spec: JobSpec
    shards: list[Shard]
    tokenizer: TokenizerLike | None
    max_model_len: int
    base_params: SamplingParams
    id_column: str | None
    kind: str  # prompt | messages | token_ids | openai (prompt or messages, per row)
    column: str

    @classmethod
    def for_job(cls, spec: JobSpec, shards: list[Shard], tokenizer: TokenizerLike | None,
                max_model_len: int) -> "Preprocessor":
        inp = spec.input
        openai = any(s.format == "openai-batch" for s in shards)
        if openai and not (inp.prompt_column or inp.messages_column or inp.token_ids_column):
            kind, column = "openai", ""
        elif inp.messages_column:
            kind, column = "messages", inp.messages_column
        elif inp.token_ids_column:
            kind, column = "token_ids", inp.token_ids_column
        else:
            kind, column = "prompt", inp.prompt_column or "prompt"
        id_column = inp.id_column or ("custom_id" if openai else None)
        return cls(spec, shards, tokenizer, max_model_len, spec.sampling_params(), id_column, kind,
                   column)

    def prepare(self, unit: int, r: InputRow) -> Prepared:
        shard = self.shards[r.shard]
        data = r.data or {}
        p = Prepared(unit=unit, shard=r.shard, row=r.row, input_file=shard.name,
                     row_id=self._row_id(shard, r.row, data),
                     kept={kept_name(c): data.get(c) for c in self.spec.output.keep_columns})
        bad_text = self._unencodable(p)
        if r.error is not None or bad_text is not None:
            p.error = r.error or f"row {r.row} of {shard.name}: {bad_text}"
            return p
        try:
            p.params = self._params(data, p.row_id, shard.format == "openai-batch")
        except (SamplingParamsError, TypeError, ValueError) as e:
            p.error = f"row {r.row} of {shard.name}: invalid per-row parameter: {e}"
            return p
        try:
            ids = self._prompt_ids(data)
        except _RowError as e:
            p.error = f"row {r.row} of {shard.name}: {e}"
            return p
        except Exception as e:  # a tokenizer / chat-template failure on this row's content
            p.error = f"row {r.row} of {shard.name}: could not tokenize the prompt: {e}"
            return p
        limit = self.max_model_len - 1  # room for at least one output token
        if len(ids) > limit:
            policy = self.spec.limits.prompt_too_long
            if policy == "truncate_left":
                ids = ids[-limit:]
            elif policy == "skip":
                p.skipped = True
                return p
            else:
                p.error = (f"row {r.row} of {shard.name}: prompt too long: {len(ids)} tokens, the "
                           f"model takes at most {limit} (max_model_len {self.max_model_len} - 1); "
                           "set limits.prompt_too_long to truncate_left or skip")
                return p
        p.prompt_ids = ids
        return p

    def _unencodable(self, p: Prepared) -> str | None:
        """Why the row's id or kept values cannot be written as they are (then escaped), or None."""
        found = unencodable(p.row_id)
        if found:
            p.row_id = escape_unencodable(p.row_id)
            return (f"the id holds text that is not valid Unicode ({found}); it is written "
                    "escaped, and the row is not run")
        for name, value in p.kept.items():
            found = unencodable(value)
            if found:
                p.kept = escape_unencodable(p.kept)
                return (f"kept column {name!r} holds text that is not valid Unicode ({found}); "
                        "it is written escaped, and the row is not run")
        return None

    def _row_id(self, shard: Shard, row: int, data: dict[str, Any]) -> str:
        if self.id_column is not None and data.get(self.id_column) is not None:
            return str(data[self.id_column])
        stem = Path(shard.name).stem if shard.path is not None else "input"
        return f"{stem}-{row}"

    def _params(self, data: dict[str, Any], row_id: str, openai: bool = False) -> SamplingParams:
        overrides = {k: data[k] for k in ROW_OVERRIDES if data.get(k) is not None}
        column = self.spec.input.structured_output_column
        constraint = row_constraint(data.get(column), column) if column else None
        if constraint is None and openai:
            constraint = response_format(data.get("response_format"))
        if constraint is not None:  # the row's own constraint replaces sampling.structured_outputs
            overrides["structured_outputs"] = constraint
        params = self.base_params.with_overrides(**overrides) if overrides else self.base_params
        if not params.greedy and params.seed is None:
            # A sampled row without a seed of its own gets one derived from the job's seed and
            # its id: its text then depends neither on batch composition nor on where a resume
            # restarted, so a resumed job equals an uninterrupted one in sampling too.
            params = params.with_overrides(seed=row_seed(self.spec.engine.get("seed", 0), row_id))
        return params

    def _prompt_ids(self, data: dict[str, Any]) -> list[int]:
        kind, column = self.kind, self.column
        if kind == "openai":
            kind, column = ("messages", "messages") if "messages" in data else ("prompt", "prompt")
        value = data.get(column)
        if kind == "token_ids":
            if not isinstance(value, (list, tuple)):
                raise _RowError(f"token ids in column {column!r} must be a list of integers, got "
                                f"{describe_type(value)}")
            if not value:
                raise _RowError(f"empty list of token ids in column {column!r}")
            bad = [t for t in value if not isinstance(t, int) or isinstance(t, bool)
                   or not 0 <= t <= MAX_TOKEN_ID][:1]
            if bad:
                bad = bad[0]
                raise _RowError(f"column {column!r} must hold a list of token ids (integers in "
                                f"[0, {MAX_TOKEN_ID}]); it holds {bad!r}")
            return list(value)
        if self.tokenizer is None:
            raise _RowError("the engine has no tokenizer; give token ids (input.token_ids_column)")
        system = self.spec.input.system_prompt
        if kind == "messages":
            messages = _messages(value, column)
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                           system_prompt=system))
        if not isinstance(value, str):
            raise _RowError(f"the prompt in column {column!r} must be a string, got "
                            f"{describe_type(value)}")
        if not value.strip():
            raise _RowError(f"empty prompt in column {column!r}")
        found = unencodable(value)
        if found:
            raise _RowError(f"the prompt in column {column!r} is not valid Unicode text ({found})")
        if system:
            return list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": value}], add_generation_prompt=True,
                system_prompt=system))
        return list(self.tokenizer.encode(value))


class _RowError(ValueError):
    pass


def row_constraint(value: Any, column: str) -> StructuredOutputsParams | None:
    """A row's structured-output column: a JSON schema, or an object of StructuredOutputsParams'
    shape ({"regex": ...}, {"choice": [...]}, ...), either as JSON text; null: none."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise _RowError(f"column {column!r} holds text that is not JSON ({why}); give a JSON "
                            "schema or an object such as {\"regex\": \"...\"}") from None
    if not isinstance(value, dict):
        raise _RowError(f"column {column!r} must hold a JSON schema or an object with one of "
                        f"{', '.join(StructuredOutputsParams.KINDS)}; got {describe_type(value)}")
    if value and set(value) <= set(StructuredOutputsParams.KINDS):
        return StructuredOutputsParams(**value)
    return StructuredOutputsParams(json=value)


def response_format(value: Any) -> StructuredOutputsParams | None:
    """An OpenAI batch line's body.response_format: text (none), json_object, or json_schema
    ({name, schema, strict}; the schema is always enforced)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise _RowError("body.response_format.json_schema must be an object with a `schema` "
                            "object ({name, schema, strict})")
        return StructuredOutputsParams(json=spec["schema"])
    raise _RowError(f"body.response_format must have type text, json_object or json_schema; got "
                    f"{describe_type(value) if kind is None else repr(kind)}")


def row_seed(job_seed: object, row_id: str) -> int:
    """A stable 31-bit seed for one row: the same job seed and row id always give the same seed."""
    digest = hashlib.sha256(f"{job_seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def describe_type(value: Any) -> str:
    """A value's kind in a user's words: 'null', 'a number (5)', 'a list', 'an object (struct)'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        shown = repr(value)
        return f"a number ({shown if len(shown) <= 24 else shown[:21] + '...'})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, dict):
        return "an object (struct)"
    return f"a {type(value).__name__}"


def _messages(value: Any, column: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise _RowError(f"column {column!r} holds a string that is not a JSON list of "
                            "messages") from None
    if not isinstance(value, (list, tuple)):
        raise _RowError(f"messages in column {column!r} must be a list of {{role, content}} "
                        f"objects, got {describe_type(value)}")
    if not value:
        raise _RowError(f"empty list of messages in column {column!r}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str):
            got = describe_type(m) if not isinstance(m, dict) else (
                f"role {describe_type(m.get('role'))}, content {describe_type(m.get('content'))}")
            raise _RowError(f"column {column!r}: message {i} needs a string role and content "
                            f"(got {got})")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["content"].strip() for m in out):
        raise _RowError(f"column {column!r}: every message is empty")
    found = unencodable(out)
    if found:
        raise _RowError(f"column {column!r}: the messages are not valid Unicode text ({found})")
    return out
