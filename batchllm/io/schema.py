"""The output row schema: ids, kept input columns, text, tokens, logprobs, counts, timings, error.

Kept input columns keep their input type where every row fits it (JSONL: inferred over every
row, widened where rows differ, text where they cannot agree); a value that still does not fit
is written as JSON text in a text column, or as null with the row's `error` saying so. Text UTF-8
cannot encode is escaped (see io/text.py). Nothing is dropped without a word.
"""
from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from batchllm.io.text import escape_unencodable

# one of a generated token's most likely tokens: its id, the token decoded alone, log p
TOP_LOGPROB = pa.struct([("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32())])
# OpenAI batch rows that ask for logprobs: per token its text, log p and the top alternatives
OPENAI_LOGPROBS = pa.list_(pa.struct([
    ("token", pa.string()), ("logprob", pa.float64()),
    ("top_logprobs", pa.list_(pa.struct([("token", pa.string()), ("logprob", pa.float64())])))]))
TIMING_COLUMNS = ("time_queued_s", "time_to_first_token_s", "time_total_s")
RESERVED = ("id", "input_file", "input_row", "sample_index", "text", "token_ids", "token_logprobs",
            "top_logprobs", "openai_logprobs", "finish_reason", "stop_reason",
            "structured_output_valid", "num_prompt_tokens", "num_output_tokens",
            "num_cached_tokens", *TIMING_COLUMNS, "error")
MAX_KEPT_NESTING = 16  # deeper kept values are written as JSON text
_MISFIT = (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, ValueError)


def output_schema(kept: list[pa.Field], *, top_logprobs: bool, samples: bool,
                  openai: bool = False) -> pa.Schema:
    """Every output row has these columns, in this order (kept input columns after the ids).
    `openai` (OpenAI batch input): `sample_index` (a request may ask for n) and
    `openai_logprobs` (what a request that asks for logprobs gets back)."""
    samples = samples or openai
    cols: list[pa.Field] = [pa.field("id", pa.string()), pa.field("input_file", pa.string()),
                            pa.field("input_row", pa.int64())]
    if samples:
        cols.append(pa.field("sample_index", pa.int32()))
    cols += kept
    cols += [pa.field("text", pa.string()), pa.field("token_ids", pa.list_(pa.int32())),
             pa.field("token_logprobs", pa.list_(pa.float32()))]
    if top_logprobs:
        cols.append(pa.field("top_logprobs", pa.list_(pa.list_(TOP_LOGPROB))))
    if openai:
        cols.append(pa.field("openai_logprobs", OPENAI_LOGPROBS))
    cols += [pa.field("finish_reason", pa.string()), pa.field("stop_reason", pa.string()),
             pa.field("structured_output_valid", pa.bool_()),  # null: the row was not constrained
             pa.field("num_prompt_tokens", pa.int32()), pa.field("num_output_tokens", pa.int32()),
             pa.field("num_cached_tokens", pa.int32())]
    cols += [pa.field(name, pa.float64()) for name in TIMING_COLUMNS]
    cols.append(pa.field("error", pa.string()))
    return pa.schema(cols)


def kept_fields(types: dict[str, pa.DataType], keep: list[str]) -> list[pa.Field]:
    """Output fields of kept input columns (an input column named like an output one gets `input_`);
    a column of unknown or null type is text."""
    out = []
    for name in keep:
        typ = types.get(name, pa.string())
        if pa.types.is_null(typ):
            typ = pa.string()
        out.append(pa.field(kept_name(name), typ))
    return out


def kept_name(column: str) -> str:
    return f"input_{column}" if column in RESERVED else column


def infer_type(values: list[Any]) -> pa.DataType:
    """The Arrow type of some kept values: what Arrow infers, or text where it cannot (mixed kinds,
    integers beyond 64 bits, text UTF-8 cannot encode, nesting deeper than MAX_KEPT_NESTING)."""
    try:
        typ = pa.array(values).type
    except _MISFIT:
        return pa.string()
    return pa.string() if _nesting(typ) > MAX_KEPT_NESTING else typ


def widen(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    """One type that holds values of both (int + float -> float, null + x -> x, struct fields
    united); text where none does."""
    if a == b:
        return a
    try:
        return pa.unify_schemas([pa.schema([("x", a)]), pa.schema([("x", b)])],
                                promote_options="permissive").field("x").type
    except (pa.ArrowInvalid, pa.ArrowTypeError, NotImplementedError):
        return pa.string()


def _nesting(typ: pa.DataType) -> int:
    if typ.num_fields == 0:
        return 0
    return 1 + max(_nesting(typ.field(i).type) for i in range(typ.num_fields))


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build a chunk table. Text UTF-8 cannot encode is escaped; a kept value that does not fit its
    column's type is written as JSON text (text columns) or null, and then its row's `error` says so."""
    notes: dict[int, str] = {}
    arrays = []
    for f in schema:
        values = [r.get(f.name) for r in rows]
        if f.name == "error":
            values = [_noted(v, notes.get(i)) for i, v in enumerate(values)]
        try:
            arrays.append(pa.array(values, type=f.type))
            continue
        except _MISFIT:
            pass
        fitted = []
        for i, v in enumerate(values):
            v, misfit = _fit(escape_unencodable(v), f.type)
            if misfit:
                notes[i] = _noted(notes.get(i), f"column {f.name!r}: {misfit}")
            fitted.append(v)
        arrays.append(pa.array(fitted, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _noted(error: str | None, note: str | None) -> str | None:
    if not note:
        return error
    return note if not error else f"{error}; {note}"


def _fit(value: Any, typ: pa.DataType) -> tuple[Any, str | None]:
    """(value as the column can hold it, why it was changed to null or None)."""
    try:
        pa.array([value], type=typ)
        return value, None
    except _MISFIT:
        pass
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return json.dumps(value, default=str), None
    shown = json.dumps(value, default=str)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return None, f"the value {shown} does not fit the column's type {typ}; written as null"
