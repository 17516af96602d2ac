"""Input shards: find them, count and digest their rows, and stream their rows in record batches.

Formats: JSONL (one object per line, read line by line), Parquet (pyarrow iter_batches), the
OpenAI batch format (JSONL with custom_id / body, flattened here to the generic row shape), and
in-memory pyarrow Tables / datasets.Datasets. Rows of a file leave `iter_rows` only after the
bytes of their block match the digest taken when the job was planned (io/digests.py), so a file
rewritten during a run raises InputChanged instead of feeding the job a second version. No
engine knowledge here.
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

from batchllm.io.digests import FileDigest, changed, digest_jsonl, digest_parquet
from batchllm.io.filesystems import (RemoteFile, StorageError, file_identity, find_remote_files,
                                     is_uri, parquet_source)
from batchllm.io.jsonl import jsonl_lines, verified_jsonl_lines
from batchllm.io.openai_batch import flatten_openai_request
from batchllm.io.parquet import iter_parquet_batches, verify_row_groups

SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
BATCH_ROWS = 1024


class InputError(ValueError):
    """An input file is missing, unreadable or of an unknown format; the message names it."""


@dataclass(slots=True)
class Shard:
    index: int
    name: str  # the `input_file` value of its output rows
    format: str  # jsonl | parquet | openai-batch | arrow (in memory)
    num_rows: int
    path: Path | RemoteFile | None = None  # None: in memory (RemoteFile: on an object store)
    size: int = 0
    mtime_ns: int = 0
    data: Any = None  # the in-memory table / dataset
    content_hash: str | None = None  # files: blake2b of their bytes; in memory: of the table
    digest: FileDigest | None = None  # files: the row blocks the readers check
    identity: tuple[int, int, int, int] | None = None  # (size, mtime_ns, ctime_ns, inode) planned


@dataclass(slots=True)
class InputRow:
    shard: int
    row: int  # index within the shard (blank JSONL lines are not rows)
    data: dict[str, Any] | None  # None when the row could not be read
    error: str | None = None
    line: int | None = None  # JSONL: its 1-based line number in the file (blank lines count)


def row_place(name: str, row: int, line: int | None) -> str:
    """Where a row is, as an editor shows it: 'line 7 of a.jsonl' (JSONL), 'row 3 of b.parquet'
    (Parquet and in-memory inputs: the 0-based `input_row`)."""
    return f"line {line} of {name}" if line is not None else f"row {row} of {name}"


def find_input_files(path: str, storage_options: dict[str, Any] | None = None
                     ) -> list[Path] | list[RemoteFile]:
    """A file, a glob or a folder (or an object, glob or prefix on an object store: s3://...)
    -> files in a stable (sorted) order."""
    if is_uri(path):
        try:
            return find_remote_files(path, storage_options, tuple(SUFFIX_FORMATS))
        except StorageError as e:
            raise InputError(str(e)) from None
    if path.startswith("file://"):
        path = path[len("file://"):]
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


def detect_format(path: Path | RemoteFile, requested: str | None) -> str:
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


def open_shards(paths: list[Path] | list[RemoteFile], requested_format: str | None) -> list[Shard]:
    """Shards of the files, each counted and digested (one read of every file)."""
    shards = []
    for i, p in enumerate(paths):
        try:
            ident = file_identity(p)
            fmt = detect_format(p, requested_format)
            digest = digest_file(p, fmt)
        except OSError as e:
            raise InputError(f"{p}: cannot read: {e.strerror or e}") from None
        shards.append(Shard(index=i, name=str(p), format=fmt, num_rows=digest.num_rows, path=p,
                            size=ident[0], mtime_ns=ident[1],
                            content_hash=digest.content, digest=digest, identity=ident))
    return shards


def identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes whenever a file's bytes do (ctime cannot be set back by anyone)."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


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


def digest_file(path: Path | RemoteFile, fmt: str) -> FileDigest:
    """Row count, content digest and row blocks of one input file."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            metadata = pq.ParquetFile(parquet_source(path)).metadata
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"{path}: not a readable Parquet file: {e}") from None
        return digest_parquet(path, metadata)
    return digest_jsonl(path)


def iter_rows(shard: Shard, start: int = 0, columns: list[str] | None = None,
              verify: bool = True) -> Iterator[InputRow]:
    """Rows of a shard from row `start` on, streamed in record batches (bounded memory).

    Rows of a file come out only after their block's bytes match the planned digest (raises
    InputChanged otherwise); `verify=False` reads without checking (pre-flight sampling).
    `columns` limits what Arrow formats read (JSONL lines are parsed whole)."""
    digest = shard.digest if verify else None
    if shard.format in ("jsonl", "openai-batch"):
        assert shard.path is not None
        lines = (verified_jsonl_lines(shard.path, shard.name, digest, start) if digest is not None
                 else jsonl_lines(shard.path, start))
        for row, number, line in lines:
            r = _parse_line(line, shard.path.name, shard.index, row, number)
            if shard.format == "openai-batch" and r.data is not None:
                r.data, r.error = flatten_openai_request(r.data)
            yield r
        return
    for offset, batch in _iter_arrow_batches(shard, start, columns, digest):
        for i, row in enumerate(batch.to_pylist()):
            yield InputRow(shard=shard.index, row=offset + i, data=row)


def check_shard_unchanged(shard: Shard) -> None:
    """Before rows of a Parquet shard are committed: if the file was touched since it was planned,
    its footer and every row group must still have the planned bytes (rows waiting to be
    committed may come from any row group read so far; JSONL rows were checked line by line when
    read). Raises InputChanged. A touch with the same bytes costs one read of the file."""
    if shard.format != "parquet" or shard.path is None or shard.digest is None:
        return
    try:
        now = file_identity(shard.path)
    except OSError as e:
        raise changed(shard.name, f"it cannot be read: {e.strerror or e}") from None
    if now == shard.identity:
        return
    verify_row_groups(shard.path, shard.name, shard.digest, 0, shard.num_rows)
    shard.identity = now  # touched, same bytes: no need to look again until it is touched again


def input_columns(shard: Shard, sample_rows: int = 100) -> set[str]:
    """Column names of a shard (for JSONL / OpenAI batch: keys seen in its first rows)."""
    if shard.format == "parquet":
        import pyarrow.parquet as pq

        return set(pq.ParquetFile(parquet_source(shard.path)).schema_arrow.names)
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

        return pq.ParquetFile(parquet_source(shard.path)).schema_arrow
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


def _parse_line(line: bytes, name: str, shard: int, row: int, number: int) -> InputRow:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        return InputRow(shard, row, None, f"malformed JSON line (line {number} of {name}): {why}",
                        number)
    if not isinstance(obj, dict):
        return InputRow(shard, row, None, f"line is JSON but not an object (line {number} of "
                                          f"{name})", number)
    return InputRow(shard, row, obj, line=number)


def _iter_jsonl_objects(path: Path | RemoteFile, start: int = 0, shard: int = 0,
                        limit: int | None = None) -> Iterator[InputRow]:
    """Parsed rows from `start` on (at most `limit`), unchecked: pre-flight sampling."""
    for row, number, line in jsonl_lines(path, start, limit):
        yield _parse_line(line, path.name, shard, row, number)


def _iter_arrow_batches(shard: Shard, start: int, columns: list[str] | None = None,
                        digest: FileDigest | None = None) -> Iterator[tuple[int, pa.RecordBatch]]:
    offset = 0
    if shard.format == "parquet":
        assert shard.path is not None
        yield from iter_parquet_batches(shard.path, shard.name, start, columns, digest)
        return
    if shard.format == "arrow":
        data = shard.data.select(columns) if columns else shard.data
        batches = data.to_batches(max_chunksize=BATCH_ROWS)
    else:
        data = shard.data.select_columns(columns) if columns else shard.data
        batches = data.with_format("arrow").iter(batch_size=BATCH_ROWS)  # pa.Tables
    for batch in batches:
        n = batch.num_rows
        if offset + n <= start:
            offset += n
            continue
        lo = max(0, start - offset)
        yield offset + lo, batch.slice(lo)
        offset += n
