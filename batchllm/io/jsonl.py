"""JSONL lines: the rows of a file (non-blank lines), read plain or a checked block at a time, and
the OpenAI batch line shape flattened to a generic row."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator

from batchllm.io.digests import FileDigest, changed

OPENAI_OVERRIDES = ("max_tokens", "temperature", "top_p", "seed", "stop")


def jsonl_lines(path: Path, start: int = 0, limit: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(row, line) from row `start` on, at most `limit` rows; not checked against any digest."""
    row = -1
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            row += 1
            if row < start:
                continue
            if limit is not None and row >= start + limit:
                return
            yield row, line


def verified_jsonl_lines(path: Path, name: str, digest: FileDigest,
                         start: int = 0) -> Iterator[tuple[int, bytes]]:
    """(row, line) from row `start` on, a block at a time: a block's lines are read and checked
    against its planned digest before any of them is yielded (raises InputChanged). Reading
    starts at the byte offset of the block holding `start`."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise changed(name, f"it cannot be opened: {e.strerror or e}") from None
    with f:
        k0 = max(0, digest.block_of(start))
        f.seek(digest.blocks[k0].offset if digest.blocks else 0)
        for k in range(k0, len(digest.blocks)):
            lo, hi = digest.rows_of(k)
            lines, h = [], hashlib.blake2b(digest_size=8)
            while len(lines) < hi - lo:
                try:
                    line = f.readline()
                except OSError as e:
                    raise changed(name, f"it cannot be read: {e.strerror or e}") from None
                if not line:
                    raise changed(name, f"it ends before row {lo + len(lines)}; "
                                        f"{digest.num_rows} rows were planned")
                if line.strip():
                    h.update(line)
                    lines.append(line)
            if h.hexdigest() != digest.blocks[k].digest:
                raise changed(name, f"rows {lo}-{hi - 1} differ from the planned bytes")
            for i, line in enumerate(lines):
                if lo + i >= start:
                    yield lo + i, line
        for line in f:
            if line.strip():
                raise changed(name, f"it has rows beyond the {digest.num_rows} planned")


def flatten_openai_request(obj: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """{custom_id, method, url, body{messages|prompt, ...}} -> a flat row, or (row, error)."""
    body = obj.get("body")
    flat: dict[str, Any] = {"custom_id": obj.get("custom_id"), "method": obj.get("method"),
                            "url": obj.get("url")}
    if not isinstance(body, dict):
        return flat, "OpenAI batch line has no `body` object"
    if "messages" in body:
        flat["messages"] = body["messages"]
    elif "prompt" in body:
        flat["prompt"] = body["prompt"]
    for key in OPENAI_OVERRIDES:
        if key in body:
            flat[key] = body[key]
    if "max_completion_tokens" in body and "max_tokens" not in body:
        flat["max_tokens"] = body["max_completion_tokens"]
    if body.get("response_format") is not None:  # structured output (jobs/preprocess reads it)
        flat["response_format"] = body["response_format"]
    return flat, None
