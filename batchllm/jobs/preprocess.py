"""Input row -> engine request: prompt from its column, chat template, per-row overrides, length policy.

Row-level problems never raise: they come back as a Prepared with `error` set (or `skipped`).
Everything the engine and the writer will need is checked here, when the row is read: per-row
settings (SamplingParams' types and ranges), the prompt's type, token ids' range, text that
UTF-8 cannot encode (refused in a prompt; escaped in the id and kept columns, which are written
with the error row), and whether an OpenAI batch request can be served as it asks.
Messages name a row as an editor shows it: the line of a JSONL file, the row of a Parquet file.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from batchllm.io.openai_batch import request_logprobs, request_problem
from batchllm.io.readers import InputRow, Shard, row_place
from batchllm.io.schema import kept_name
from batchllm.io.text import escape_unencodable, unencodable
from batchllm.jobs.errors import JobSpecError
from batchllm.jobs.row_values import RowError as _RowError
from batchllm.jobs.row_values import describe_type, messages, response_format, row_constraint
from batchllm.jobs.spec import JobSpec
from batchllm.sampling_params import SamplingParams, SamplingParamsError

__all__ = ["Prepared", "Preprocessor", "describe_type", "response_format", "row_constraint",
           "row_seed"]

ROW_OVERRIDES = ("max_tokens", "temperature", "top_p", "seed", "stop")
OPENAI_OVERRIDES = (*ROW_OVERRIDES, "n", "presence_penalty", "frequency_penalty")
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
    line: int | None = None  # JSONL: the row's line in its file
    # OpenAI batch rows that ask for logprobs: token id -> its text (records.py writes them)
    token_text: Callable[[int], str] | None = None
    top_logprobs: int = 0  # how many top log-probabilities such a row asked for

    @property
    def request_id(self) -> str:
        return f"{self.unit}:{self.row}"

    @property
    def settled(self) -> bool:
        return self.error is not None or self.skipped

    @property
    def where(self) -> str:
        """'line 7 of a.jsonl' / 'row 3 of b.parquet': the row as an editor shows it."""
        return row_place(self.input_file, self.row, self.line)


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
    templated: bool = False  # prompt columns go through the chat template (one user message)

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
        templated = kind == "prompt" and _use_chat_template(spec, tokenizer)
        return cls(spec, shards, tokenizer, max_model_len, spec.sampling_params(), id_column, kind,
                   column, templated)

    def prepare(self, unit: int, r: InputRow) -> Prepared:
        shard = self.shards[r.shard]
        data = r.data or {}
        p = Prepared(unit=unit, shard=r.shard, row=r.row, input_file=shard.name,
                     row_id=self._row_id(shard, r.row, data),
                     kept={kept_name(c): data.get(c) for c in self.spec.output.keep_columns},
                     line=r.line)
        bad_text = self._unencodable(p)
        if r.error is not None or bad_text is not None:
            p.error = r.error or f"{p.where}: {bad_text}"
            return p
        openai = shard.format == "openai-batch"
        if openai and self.kind == "openai":
            mismatch = self.spec.input.openai_model_mismatch
            problem = request_problem(data, self.spec.model if mismatch == "error" else None)
            if problem is not None:
                p.error = f"{p.where}: {problem}"
                return p
        try:
            p.params = self._params(data, p.row_id, openai)
        except (SamplingParamsError, TypeError, ValueError) as e:
            p.error = f"{p.where}: invalid per-row parameter: {e}"
            return p
        if openai and self.kind == "openai" and p.params.logprobs is not None and \
                data.get("logprobs") is not None:
            p.token_text, p.top_logprobs = self._token_text, p.params.logprobs
        try:
            ids = self._prompt_ids(data)
        except _RowError as e:
            p.error = f"{p.where}: {e}"
            return p
        except Exception as e:  # a tokenizer / chat-template failure on this row's content
            p.error = f"{p.where}: could not tokenize the prompt: {e}"
            return p
        limit = self.max_model_len - 1  # room for at least one output token
        policy = self.spec.limits.prompt_too_long
        if policy == "truncate_left":
            # keep the last tokens, leaving room for the row's max_tokens (at least one token)
            keep = max(1, self.max_model_len - (p.params.max_tokens or 1))
            if len(ids) > keep:
                ids = ids[-keep:]
        elif len(ids) > limit:
            if policy == "skip":
                p.skipped = True
                return p
            p.error = (f"{p.where}: prompt too long: {len(ids)} tokens, the model takes at most "
                       f"{limit} (max_model_len {self.max_model_len} - 1); set "
                       "limits.prompt_too_long to truncate_left or skip")
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
        names = OPENAI_OVERRIDES if openai else ROW_OVERRIDES
        overrides = {k: data[k] for k in names if data.get(k) is not None}
        column = self.spec.input.structured_output_column
        constraint = row_constraint(data.get(column), column) if column else None
        if openai:
            if constraint is None:
                constraint = response_format(data.get("response_format"))
            if data.get("logprobs") is not None or data.get("top_logprobs") is not None:
                overrides["logprobs"] = request_logprobs(data)
            if data.get("logit_bias") is not None:
                bias = data["logit_bias"]
                if "logit_bias" not in SamplingParams.field_names():
                    raise ValueError("body.logit_bias is not supported by batchllm")
                if not isinstance(bias, dict):
                    raise ValueError(f"body.logit_bias must map token ids to numbers, got "
                                     f"{describe_type(bias)}")
                overrides["logit_bias"] = {int(k): v for k, v in bias.items()}
        if constraint is not None:  # the row's own constraint replaces sampling.structured_outputs
            overrides["structured_outputs"] = constraint
        params = self.base_params.with_overrides(**overrides) if overrides else self.base_params
        if not params.greedy and params.seed is None:
            # A sampled row without a seed of its own gets one derived from the job's seed and
            # its id: its text then depends neither on batch composition nor on where a resume
            # restarted, so a resumed job equals an uninterrupted one in sampling too.
            params = params.with_overrides(seed=row_seed(self.spec.engine.get("seed", 0), row_id))
        return params

    def _token_text(self, token_id: int) -> str:
        decode = getattr(self.tokenizer, "decode", None)
        if decode is None:
            return f"<{token_id}>"
        return decode([token_id], skip_special_tokens=False)

    def _prompt_ids(self, data: dict[str, Any]) -> list[int]:
        kind, column = self.kind, self.column
        templated = self.templated
        if kind == "openai":
            kind, column = ("messages", "messages") if "messages" in data else ("prompt", "prompt")
            templated = False  # a completions request's prompt is the text the model continues
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
            return list(self.tokenizer.apply_chat_template(
                messages(value, column), add_generation_prompt=True, system_prompt=system))
        if not isinstance(value, str):
            raise _RowError(f"the prompt in column {column!r} must be a string, got "
                            f"{describe_type(value)}")
        if not value.strip():
            raise _RowError(f"empty prompt in column {column!r}")
        found = unencodable(value)
        if found:
            raise _RowError(f"the prompt in column {column!r} is not valid Unicode text ({found})")
        if templated:
            return list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": value}], add_generation_prompt=True,
                system_prompt=system))
        return list(self.tokenizer.encode(value))


def _use_chat_template(spec: JobSpec, tokenizer: TokenizerLike | None) -> bool:
    """Whether prompt-column rows go through the chat template (input.chat_template, resolved
    against the tokenizer: auto is yes when it has a template; a system prompt needs one)."""
    mode, system = spec.input.chat_template, spec.input.system_prompt is not None
    if tokenizer is None or mode is False:
        return False
    has = bool(getattr(tokenizer, "has_chat_template", False))
    if not has and hasattr(tokenizer, "has_chat_template") and (mode is True or system):
        why = "input.system_prompt is" if system and mode is not True else \
            "input.chat_template: true is"
        raise JobSpecError(f"{spec.source or 'job'}: {why} set, but the tokenizer of "
                           f"{spec.tokenizer or spec.model} has no chat template; use a model or "
                           "tokenizer that has one, or set input.chat_template: false (plain "
                           "prompts) and drop input.system_prompt")
    return has or mode is True or system


def row_seed(job_seed: object, row_id: str) -> int:
    """A stable 31-bit seed for one row: the same job seed and row id always give the same seed."""
    digest = hashlib.sha256(f"{job_seed}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
