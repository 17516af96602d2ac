"""Text that UTF-8 cannot encode (lone surrogates, e.g. a JSON "\\ud800" escape): find it, escape it.

Python strings may hold lone surrogates; Arrow (and every UTF-8 consumer) cannot. A row holding
one is refused where the text matters (its prompt) and escaped where it is only carried along
(its id, kept columns), so that the row can still be written: `\\ud800` becomes the six
characters `\\ud800`.
"""
from __future__ import annotations

from typing import Any

MAX_DEPTH = 64  # nested lists / objects deeper than this are not searched further


def unencodable(value: Any, _where: str = "", _depth: int = 0) -> str | None:
    """Where `value` (a string, or strings nested in lists and objects) holds a character UTF-8
    cannot encode, in words ("a lone surrogate \\ud800 at character 3"); None if it has none."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            at = f" in {_where}" if _where else ""
            return f"a lone surrogate {ascii(value[e.start])[1:-1]} at character {e.start}{at}"
        return None
    if _depth >= MAX_DEPTH:
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = unencodable(v, f"{_where}[{i}]", _depth + 1)
            if found:
                return found
    elif isinstance(value, dict):
        for k, v in value.items():
            found = unencodable(k, f"{_where}{{key}}", _depth + 1) or unencodable(
                v, f"{_where}.{k}" if _where else str(k), _depth + 1)
            if found:
                return found
    return None


def escape_unencodable(value: Any, _depth: int = 0) -> Any:
    """`value` with every character UTF-8 cannot encode written as a backslash escape
    (strings nested in lists and objects too); encodable text is returned unchanged."""
    if isinstance(value, str):
        if value.isascii():
            return value
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if _depth >= MAX_DEPTH:
        return value
    if isinstance(value, (list, tuple)):
        return [escape_unencodable(v, _depth + 1) for v in value]
    if isinstance(value, dict):
        return {escape_unencodable(k, _depth + 1): escape_unencodable(v, _depth + 1)
                for k, v in value.items()}
    return value
