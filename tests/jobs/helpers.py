"""Shared helpers for job tests: write inputs, build job dicts, read a job's committed rows."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchllm.io.writers import read_arrow


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def job(input_path: Path | str, out: Path, **sections: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"model": "smollm2-135m", "input": {"path": str(input_path)},
                         "output": {"path": str(out)}, "sampling": {"max_tokens": 3,
                                                                    "temperature": 0.0}}
    for key, value in sections.items():
        d[key] = {**d.get(key, {}), **value} if isinstance(value, dict) else value
    return d


def committed(out: Path) -> pa.Table:
    """Every committed row, sorted by (input_file, input_row, sample_index)."""
    tables = [read_arrow(p) for p in sorted((out / "chunks").glob("*.arrow"))]
    t = pa.concat_tables(tables)
    keys = [("input_file", "ascending"), ("input_row", "ascending")]
    if "sample_index" in t.column_names:
        keys.append(("sample_index", "ascending"))
    return t.sort_by(keys)
