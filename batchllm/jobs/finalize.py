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
from batchllm.io.writers import WriteFailed, inside, read_arrow, safe_stem, write_arrow_atomic, \
    write_atomic, write_text_atomic
from batchllm.jobs.checkpoint import CHUNKS, FINAL, read_job_record
from batchllm.jobs.errors import JobError, OutputWriteError
from batchllm.jobs.plan import parse_chunk_name, plan_units


FINAL_FORMATS = ("arrow", "parquet", "both")


def finalize(folder: str | Path, final_format: str = "arrow") -> list[Path]:
    """Write final/<NNNNN>-<shard stem>.arrow (and / or .parquet: `final_format` arrow | parquet |
    both) per shard; refuses while rows are missing."""
    if final_format not in FINAL_FORMATS:
        raise JobError(f"cannot finalize: format {final_format!r} is not one of "
                       f"{', '.join(FINAL_FORMATS)}")
    folder = Path(folder)
    record = read_job_record(folder)
    shards = record["shards"]
    details = record["details"]
    units = plan_units([s["rows"] for s in shards], details["output"]["unit_rows"])
    by_unit: dict[int, list[Path]] = {}
    for path in sorted((folder / CHUNKS).glob("*.arrow")):
        parsed = parse_chunk_name(path.name)
        if parsed is not None:
            by_unit.setdefault(parsed[0], []).append(path)
    try:
        (folder / FINAL).mkdir(exist_ok=True)
    except OSError as e:
        raise OutputWriteError(f"cannot create {folder / FINAL}: {e.strerror or e}") from None
    written = []
    empty = None  # the schema of an empty shard's file: any chunk's (all chunks share it)
    openai = record.get("output_format") == "openai-batch"
    for i, shard in enumerate(shards):
        paths = [p for u in units if u.shard == i for p in by_unit.get(u.index, [])]
        tables = [_read_chunk(p) for p in paths]
        created = [r for p, t in zip(paths, tables) for r in [_mtime(p)] * t.num_rows] \
            if openai else []
        table = pa.concat_tables(tables) if tables else None
        got = len(set(table["input_row"].to_pylist())) if table is not None else 0
        if got != shard["rows"]:
            raise JobError(f"cannot finalize {folder}: shard {shard['name']} has {got} of "
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
                path = inside(folder / FINAL, f"{i:05d}-{stem}.{suffix}")
                if suffix == "arrow":
                    write_arrow_atomic(path, table)
                else:
                    write_atomic(path, lambda f, t=table: pq.write_table(t, f))
                written.append(path)
            if openai:
                jpath = inside(folder / FINAL, f"{i:05d}-{stem}.openai.jsonl")
                write_text_atomic(jpath, "".join(json.dumps(x) + "\n" for x in lines))
                written.append(jpath)
        except WriteFailed as e:
            raise OutputWriteError(str(e.strerror or e)) from None
    return written


def _mtime(path: Path) -> int:
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0


def _read_chunk(path: Path) -> pa.Table:
    try:
        return read_arrow(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise JobError(f"cannot finalize: chunk {path} is unreadable ({str(e).splitlines()[0]}); "
                       "rerun the job: it sets damaged chunks aside and redoes their rows") from None


def _empty_table(folder: Path, details: dict[str, Any]) -> pa.Table:
    """No rows: the schema of any committed chunk, else the job's (kept columns as text)."""
    for path in sorted((folder / CHUNKS).glob("*.arrow")):
        return _read_chunk(path).slice(0, 0)
    sampling = details.get("sampling") or {}
    keep = [pa.field(c, pa.string()) for c in (details.get("output") or {}).get("keep_columns", [])]
    openai = any(s.get("format") == "openai-batch" for s in details.get("inputs") or [])
    schema = output_schema(keep, top_logprobs=bool(sampling.get("logprobs")),
                           samples=int(sampling.get("n") or 1) > 1, openai=openai)
    return schema.empty_table()
