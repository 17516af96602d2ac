"""The output row schema: ids, kept input columns, text, tokens, logprobs, counts, timings, error."""
from __future__ import annotations

from typing import Any

import pyarrow as pa

TOP_LOGPROB = pa.struct([("token_id", pa.int32()), ("logprob", pa.float32())])
TIMING_COLUMNS = ("time_queued_s", "time_to_first_token_s", "time_total_s")
RESERVED = ("id", "input_file", "input_row", "sample_index", "text", "token_ids", "token_logprobs",
            "top_logprobs", "finish_reason", "stop_reason", "num_prompt_tokens",
            "num_output_tokens", "num_cached_tokens", *TIMING_COLUMNS, "error")


def output_schema(kept: list[pa.Field], *, top_logprobs: bool, samples: bool) -> pa.Schema:
    """Every output row has these columns, in this order (kept input columns after the ids)."""
    cols: list[pa.Field] = [pa.field("id", pa.string()), pa.field("input_file", pa.string()),
                            pa.field("input_row", pa.int64())]
    if samples:
        cols.append(pa.field("sample_index", pa.int32()))
    cols += kept
    cols += [pa.field("text", pa.string()), pa.field("token_ids", pa.list_(pa.int32())),
             pa.field("token_logprobs", pa.list_(pa.float32()))]
    if top_logprobs:
        cols.append(pa.field("top_logprobs", pa.list_(pa.list_(TOP_LOGPROB))))
    cols += [pa.field("finish_reason", pa.string()), pa.field("stop_reason", pa.string()),
             pa.field("num_prompt_tokens", pa.int32()), pa.field("num_output_tokens", pa.int32()),
             pa.field("num_cached_tokens", pa.int32())]
    cols += [pa.field(name, pa.float64()) for name in TIMING_COLUMNS]
    cols.append(pa.field("error", pa.string()))
    return pa.schema(cols)


def kept_fields(input_schema: pa.Schema, keep: list[str]) -> list[pa.Field]:
    """Output fields of kept input columns (an input column named like an output one gets `input_`)."""
    out = []
    for name in keep:
        typ = input_schema.field(name).type if name in input_schema.names else pa.string()
        if pa.types.is_null(typ):
            typ = pa.string()
        out.append(pa.field(kept_name(name), typ))
    return out


def kept_name(column: str) -> str:
    return f"input_{column}" if column in RESERVED else column


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build a chunk table; a kept value that does not fit its column's type becomes null."""
    arrays = []
    for f in schema:
        values = [r.get(f.name) for r in rows]
        try:
            arrays.append(pa.array(values, type=f.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            arrays.append(pa.array([_fit(v, f.type) for v in values], type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _fit(value: Any, typ: pa.DataType) -> Any:
    try:
        pa.array([value], type=typ)
        return value
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        if pa.types.is_string(typ) or pa.types.is_large_string(typ):
            import json

            return json.dumps(value, default=str)
        return None
