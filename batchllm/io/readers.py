"""Input shards: find them, count their rows, and stream their rows in record batches.

Formats: JSONL (one object per line, read line by line), Parquet (pyarrow iter_batches), the
OpenAI batch format (JSONL with custom_id / body, flattened here to the generic row shape), and
in-memory pyarrow Tables / datasets.Datasets. No engine knowledge here.
"""
from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
OPENAI_OVERRIDES = ("max_tokens", "temperature", "top_p", "seed", "stop")
BATCH_ROWS = 1024


class InputError(ValueError):
    """An input file is missing, unreadable or of an unknown format; the message names it."""


@dataclass(slots=True)
class Shard:
    index: int
    name: str  # the `input_file` value of its output rows
    format: str  # jsonl | parquet | openai-batch | arrow (in memory)
    num_rows: int
    path: Path | None = None  # None: in memory
    size: int = 0
    mtime_ns: int = 0
    data: Any = None  # the in-memory table / dataset
    content_hash: str | None = None  # in-memory inputs only


@dataclass(slots=True)
class InputRow:
    shard: int
    row: int  # index within the shard (blank JSONL lines are not rows)
    data: dict[str, Any] | None  # None when the row could not be read
    error: str | None = None


def find_input_files(path: str) -> list[Path]:
    """A file, a glob or a folder -> files in a stable (sorted) order."""
    if any(ch in path for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(path, recursive=True) if Path(p).is_file())
        if not files:
            raise InputError(f"input.path {path!r}: the pattern matches no file")
        return files
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in SUFFIX_FORMATS)
        if not files:
            raise InputError(f"input.path {path!r}: the folder holds no .jsonl / .parquet file")
        return files
    if not p.exists():
        raise InputError(f"input.path {path!r}: no such file or folder")
    return [p]


def detect_format(path: Path, requested: str | None) -> str:
    if requested is not None:
        return requested
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; set "
                         "input.format to jsonl, parquet or openai-batch")
    if fmt == "jsonl":
        first = next((r for r in _iter_jsonl_objects(path, limit=1) if r.data is not None), None)
        if first is not None and "custom_id" in first.data and "body" in first.data:
            return "openai-batch"
    return fmt


def open_shards(paths: list[Path], requested_format: str | None) -> list[Shard]:
    shards = []
    for i, p in enumerate(paths):
        try:
            st = p.stat()
            fmt = detect_format(p, requested_format)
            n = count_rows(p, fmt)
        except OSError as e:
            raise InputError(f"{p}: cannot read: {e.strerror or e}") from None
        shards.append(Shard(index=i, name=str(p), format=fmt, num_rows=n, path=p,
                            size=st.st_size, mtime_ns=st.st_mtime_ns))
    return shards


def memory_shard(data: Any) -> Shard:
    """A pyarrow.Table or datasets.Dataset as one shard named '<memory>'."""
    if isinstance(data, pa.Table):
        h = hashlib.sha256()
        for batch in data.to_batches():
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, batch.schema) as w:
                w.write_batch(batch)
            h.update(sink.getvalue().to_pybytes())
        return Shard(index=0, name="<memory>", format="arrow", num_rows=data.num_rows, data=data,
                     content_hash=h.hexdigest())
    if hasattr(data, "with_format") and hasattr(data, "num_rows"):  # datasets.Dataset
        fp = getattr(data, "_fingerprint", None) or str(data.num_rows)
        return Shard(index=0, name="<memory>", format="dataset", num_rows=data.num_rows, data=data,
                     content_hash=f"dataset:{fp}")
    raise InputError(f"input: expected a path, a pyarrow.Table or a datasets.Dataset, got "
                     f"{type(data).__name__}")


def count_rows(path: Path, fmt: str) -> int:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{path}: not a readable Parquet file: {e}") from None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def iter_rows(shard: Shard, start: int = 0) -> Iterator[InputRow]:
    """Rows of a shard from row `start` on, streamed in record batches (bounded memory)."""
    if shard.format in ("jsonl", "openai-batch"):
        assert shard.path is not None
        for r in _iter_jsonl_objects(shard.path, start=start, shard=shard.index):
            if shard.format == "openai-batch" and r.data is not None:
                r.data, r.error = flatten_openai_request(r.data)
            yield r
        return
    for offset, batch in _iter_arrow_batches(shard, start):
        for i, row in enumerate(batch.to_pylist()):
            yield InputRow(shard=shard.index, row=offset + i, data=row)


def input_columns(shard: Shard, sample_rows: int = 100) -> set[str]:
    """Column names of a shard (for JSONL / OpenAI batch: keys seen in its first rows)."""
    if shard.format == "parquet":
        import pyarrow.parquet as pq

        return set(pq.ParquetFile(shard.path).schema_arrow.names)
    if shard.format == "arrow":
        return set(shard.data.column_names)
    if shard.format == "dataset":
        return set(shard.data.column_names)
    cols: set[str] = set()
    for i, r in enumerate(iter_rows(shard)):
        if i >= sample_rows:
            break
        if r.data is not None:
            cols.update(r.data)
    return cols


def input_schema(shard: Shard, sample_rows: int = 1000) -> pa.Schema:
    """Arrow types of a shard's columns (JSONL: inferred from its first rows)."""
    if shard.format == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(shard.path).schema_arrow
    if shard.format == "arrow":
        return shard.data.schema
    if shard.format == "dataset":
        return shard.data.features.arrow_schema
    rows = []
    for i, r in enumerate(iter_rows(shard)):
        if i >= sample_rows:
            break
        if r.data is not None:
            rows.append(r.data)
    try:
        return pa.Table.from_pylist(rows).schema if rows else pa.schema([])
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        keys = sorted({k for r in rows for k in r})
        return pa.schema([pa.field(k, pa.string()) for k in keys])


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
    return flat, None


def _iter_jsonl_objects(path: Path, start: int = 0, shard: int = 0,
                        limit: int | None = None) -> Iterator[InputRow]:
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
            try:
                obj = json.loads(line)
            except (ValueError, UnicodeDecodeError) as e:
                yield InputRow(shard, row, None, f"malformed JSON line ({path.name}, row {row}): {e}")
                continue
            if not isinstance(obj, dict):
                yield InputRow(shard, row, None,
                               f"line is JSON but not an object ({path.name}, row {row})")
                continue
            yield InputRow(shard, row, obj)


def _iter_arrow_batches(shard: Shard, start: int) -> Iterator[tuple[int, pa.RecordBatch]]:
    offset = 0
    if shard.format == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(shard.path)
        # Skip whole row groups before `start` without reading them.
        groups, seen = [], 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if seen + n > start:
                groups.append(g)
            else:
                offset += n
            seen += n
        batches = pf.iter_batches(batch_size=BATCH_ROWS, row_groups=groups) if groups else iter(())
    elif shard.format == "arrow":
        batches = shard.data.to_batches(max_chunksize=BATCH_ROWS)
    else:
        batches = shard.data.with_format("arrow").iter(batch_size=BATCH_ROWS)  # pa.Tables
    for batch in batches:
        n = batch.num_rows
        if offset + n <= start:
            offset += n
            continue
        lo = max(0, start - offset)
        yield offset + lo, batch.slice(lo)
        offset += n


def file_identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
