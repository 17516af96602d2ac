"""finalize: committed chunks -> one file per input shard, rows in input order.

Arrow (IPC file format, what pyarrow.ipc.open_file, pyarrow.feather, polars.read_ipc and duckdb
read; not HF `Dataset.from_file`, which reads only the IPC stream format), Parquet (any reader,
HF datasets included), or both. With output.format openai-batch, also one OpenAI batch output
JSONL per shard.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batchllm.io.openai_batch import CREATED, openai_lines
from batchllm.io.schema import output_schema
from batchllm.io.storage import Storage, StorageError, open_storage
from batchllm.io.writers import WriteFailed, inside, safe_stem
from batchllm.jobs.checkpoint import CHUNKS, FINAL, read_job_record
from batchllm.jobs.errors import JobError, OutputWriteError
from batchllm.jobs.plan import parse_chunk_name, plan_units


FINAL_FORMATS = ("arrow", "parquet", "both")


def finalize(folder: "str | Path | Storage", final_format: str = "arrow") -> list[Path | str]:
    """Write final/<NNNNN>-<shard stem>.arrow (and / or .parquet: `final_format` arrow | parquet |
    both) per shard; refuses while rows are missing. Returns the files (paths, or URIs of objects).
    `folder` may be a URI (credentials from the store's environment variables)."""
    if final_format not in FINAL_FORMATS:
        raise JobError(f"cannot finalize: format {final_format!r} is not one of "
                       f"{', '.join(FINAL_FORMATS)}")
    try:
        return _finalize(open_storage(folder), final_format)
    except StorageError as e:
        raise OutputWriteError(str(e)) from None


def _finalize(folder: Storage, final_format: str) -> list[Path | str]:
    record = read_job_record(folder)
    shards = record["shards"]
    details = record["details"]
    units = plan_units([s["rows"] for s in shards], details["output"]["unit_rows"])
    by_unit: dict[int, list[str]] = {}
    for name in folder.list(CHUNKS):
        parsed = parse_chunk_name(name)
        if parsed is not None:
            by_unit.setdefault(parsed[0], []).append(f"{CHUNKS}/{name}")
    try:
        folder.make_dir(FINAL)
    except OSError as e:
        raise OutputWriteError(f"cannot create {folder.where(FINAL)}: {e.strerror or e}") from None
    written = []
    empty = None  # the schema of an empty shard's file: any chunk's (all chunks share it)
    openai = record.get("output_format") == "openai-batch"
    for i, shard in enumerate(shards):
        paths = [p for u in units if u.shard == i for p in by_unit.get(u.index, [])]
        tables = [_read_chunk(folder, p) for p in paths]
        created = [r for p, t in zip(paths, tables) for r in [int(folder.mtime(p))] * t.num_rows] \
            if openai else []
        table = pa.concat_tables(tables) if tables else None
        got = len(set(table["input_row"].to_pylist())) if table is not None else 0
        if got != shard["rows"]:
            raise JobError(f"cannot finalize {folder.uri}: shard {shard['name']} has {got} of "
                           f"{shard['rows']} rows committed; rerun the job to finish it first")
        if table is None:
            empty = _empty_table(folder, details) if empty is None else empty
            table = empty
        keys = [("input_row", "ascending")]
        if "sample_index" in table.column_names:
            keys.append(("sample_index", "ascending"))
        if created:  # OpenAI's `created`: when the row's chunk was committed (Unix seconds)
            table = table.append_column(CREATED, pa.array(created, pa.int64()))
        table = table.sort_by(keys)
        # The name comes from the input file name (recorded in job.json): keep it a plain name
        # inside final/, whatever the input was called ('../../etc/x' -> '00000-x.arrow').
        stem = safe_stem(shard["name"]) if shard["name"] != "<memory>" else "input"
        try:
            lines = openai_lines(table.to_pylist(), record["details"]["model"]) if openai else []
            if created:
                table = table.drop_columns([CREATED])
            for suffix in (("arrow", "parquet") if final_format == "both" else (final_format,)):
                name = _final_name(f"{i:05d}-{stem}.{suffix}")
                if suffix == "arrow":
                    folder.write_arrow(name, table)
                else:
                    folder.write_with(name, lambda f, t=table: pq.write_table(t, f))
                written.append(folder.location(name))
            if openai:
                name = _final_name(f"{i:05d}-{stem}.openai.jsonl")
                folder.write_text(name, "".join(json.dumps(x) + "\n" for x in lines))
                written.append(folder.location(name))
        except WriteFailed as e:
            raise OutputWriteError(str(e.strerror or e)) from None
    return written


def _final_name(name: str) -> str:
    """final/<name>, refusing a name that would land elsewhere."""
    return f"{FINAL}/{inside(Path(FINAL), name).name}"


def _read_chunk(folder: Storage, name: str) -> pa.Table:
    try:
        return folder.read_arrow(name)
    except StorageError:
        raise
    except (pa.ArrowInvalid, OSError) as e:
        raise JobError(f"cannot finalize: chunk {folder.where(name)} is unreadable ({str(e).splitlines()[0]}); "
                       "rerun the job: it sets damaged chunks aside and redoes their rows") from None


def _empty_table(folder: Storage, details: dict[str, Any]) -> pa.Table:
    """No rows: the schema of any committed chunk, else the job's (kept columns as text)."""
    for name in folder.list(CHUNKS):
        if name.endswith(".arrow"):
            return _read_chunk(folder, f"{CHUNKS}/{name}").slice(0, 0)
    sampling = details.get("sampling") or {}
    keep = [pa.field(c, pa.string()) for c in (details.get("output") or {}).get("keep_columns", [])]
    openai = any(s.get("format") == "openai-batch" for s in details.get("inputs") or [])
    schema = output_schema(keep, top_logprobs=bool(sampling.get("logprobs")),
                           samples=int(sampling.get("n") or 1) > 1, openai=openai)
    return schema.empty_table()
