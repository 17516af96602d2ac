"""finalize: committed chunks -> one Arrow file per input shard, rows in input order.

With output.format openai-batch, also one OpenAI batch output JSONL per shard.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchllm.io.schema import output_schema
from batchllm.io.writers import WriteFailed, inside, read_arrow, safe_stem, write_arrow_atomic, \
    write_text_atomic
from batchllm.jobs.checkpoint import CHUNKS, FINAL, read_job_record
from batchllm.jobs.errors import JobError, OutputWriteError
from batchllm.jobs.plan import parse_chunk_name, plan_units


def finalize(folder: str | Path) -> list[Path]:
    """Write final/<NNNNN>-<shard stem>.arrow per shard; refuses while rows are missing."""
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
    for i, shard in enumerate(shards):
        tables = [_read_chunk(p) for u in units if u.shard == i for p in by_unit.get(u.index, [])]
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
        table = table.sort_by(keys)
        # The name comes from the input file name (recorded in job.json): keep it a plain name
        # inside final/, whatever the input was called ('../../etc/x' -> '00000-x.arrow').
        stem = safe_stem(shard["name"]) if shard["name"] != "<memory>" else "input"
        path = inside(folder / FINAL, f"{i:05d}-{stem}.arrow")
        try:
            write_arrow_atomic(path, table)
            written.append(path)
            if record.get("output_format") == "openai-batch":
                lines = openai_lines(table, record["details"]["model"])
                jpath = inside(folder / FINAL, f"{i:05d}-{stem}.openai.jsonl")
                write_text_atomic(jpath, "".join(json.dumps(x) + "\n" for x in lines))
                written.append(jpath)
        except WriteFailed as e:
            raise OutputWriteError(str(e.strerror or e)) from None
    return written


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
    schema = output_schema(keep, top_logprobs=bool(sampling.get("logprobs")),
                           samples=int(sampling.get("n") or 1) > 1)
    return schema.empty_table()


def openai_lines(table: pa.Table, model: str) -> list[dict[str, Any]]:
    """OpenAI batch output lines: id, custom_id, response {status_code, request_id, body}, error."""
    lines = []
    rows = table.to_pylist()
    by_id: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        by_id.setdefault((r["input_file"], r["input_row"]), []).append(r)
    for (_, input_row), samples in by_id.items():
        first = samples[0]
        request_id = f"req-{input_row}"
        line: dict[str, Any] = {"id": f"batch_req_{first['id']}", "custom_id": first["id"]}
        if first["error"] is not None or first["finish_reason"] in ("error", "skipped"):
            line["response"] = None
            line["error"] = {"code": "skipped" if first["finish_reason"] == "skipped"
                             else "invalid_request", "message": first["error"] or "skipped"}
            lines.append(line)
            continue
        chat = "chat" in str(first.get("url") or "/chat/completions")
        choices = []
        for s in samples:
            choice: dict[str, Any] = {"index": s.get("sample_index") or 0,
                                      "finish_reason": s["finish_reason"]}
            if chat:
                choice["message"] = {"role": "assistant", "content": s["text"]}
            else:
                choice["text"] = s["text"]
            choices.append(choice)
        completion = sum(s["num_output_tokens"] or 0 for s in samples)
        body = {"id": request_id, "object": "chat.completion" if chat else "text_completion",
                "model": model, "choices": choices,
                "usage": {"prompt_tokens": first["num_prompt_tokens"],
                          "completion_tokens": completion,
                          "total_tokens": (first["num_prompt_tokens"] or 0) + completion}}
        line["response"] = {"status_code": 200, "request_id": request_id, "body": body}
        line["error"] = None
        lines.append(line)
    return lines
