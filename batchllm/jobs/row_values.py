"""What a row's values mean, each wrong shape named: chat messages (text or OpenAI content parts),
per-row structured-output constraints, OpenAI's response_format, and a value's kind in words."""
from __future__ import annotations

import json
from typing import Any

from batchllm.io.text import unencodable
from batchllm.sampling_params import StructuredOutputsParams


class RowError(ValueError):
    """A row-level problem: the row becomes an error row with this message."""


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


def messages(value: Any, column: str) -> list[dict[str, Any]]:
    """A row's chat messages as [{role, content: str}]: content is text, or OpenAI content parts
    ([{"type": "text", "text": ...}, ...], joined by newlines; other part types are refused)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise RowError(f"column {column!r} holds a string that is not a JSON list of "
                           "messages") from None
    if not isinstance(value, (list, tuple)):
        raise RowError(f"messages in column {column!r} must be a list of {{role, content}} "
                       f"objects, got {describe_type(value)}")
    if not value:
        raise RowError(f"empty list of messages in column {column!r}")
    out = []
    for i, m in enumerate(value):
        content = _content(m.get("content"), column, i) if isinstance(m, dict) else None
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or content is None:
            got = describe_type(m) if not isinstance(m, dict) else (
                f"role {describe_type(m.get('role'))}, content {describe_type(m.get('content'))}")
            raise RowError(f"column {column!r}: message {i} needs a string role and content "
                           f"(text or a list of text parts; got {got})")
        out.append({"role": m["role"], "content": content})
    if not any(m["content"].strip() for m in out):
        raise RowError(f"column {column!r}: every message is empty")
    found = unencodable(out)
    if found:
        raise RowError(f"column {column!r}: the messages are not valid Unicode text ({found})")
    return out


def _content(value: Any, column: str, i: int) -> str | None:
    """A message's content as text (None when it is neither text nor a list of parts)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, (list, tuple)) or not value:
        return None
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = repr(kind) if isinstance(kind, str) else describe_type(part)
            raise RowError(f"column {column!r}: message {i}, content part {j}: only text parts "
                           f"({{\"type\": \"text\", \"text\": ...}}) are supported, got {what}")
        texts.append(part["text"])
    return "\n".join(texts)


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
            raise RowError(f"column {column!r} holds text that is not JSON ({why}); give a JSON "
                           "schema or an object such as {\"regex\": \"...\"}") from None
    if not isinstance(value, dict):
        raise RowError(f"column {column!r} must hold a JSON schema or an object with one of "
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
            raise RowError("body.response_format.json_schema must be an object with a `schema` "
                           "object ({name, schema, strict})")
        return StructuredOutputsParams(json=spec["schema"])
    raise RowError(f"body.response_format must have type text, json_object or json_schema; got "
                   f"{describe_type(value) if kind is None else repr(kind)}")
