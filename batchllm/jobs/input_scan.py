"""One pass over the input's id and kept columns before the run (pre-flight): ids given twice, and
each kept column's type over every row (JSONL declares none, and a column may change type after
its first rows).

Only what is needed is read: nothing when no id column is checked and no JSONL column is kept;
Parquet and in-memory inputs read just the id column (their types are declared). Ids are held
as 8-byte hashes, so memory stays at 8 bytes a row.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from batchllm.io.filesystems import open_binary
from batchllm.io.readers import InputRow, Shard, input_schema, iter_rows
from batchllm.io.schema import infer_type, widen

ARROW_FORMATS = ("parquet", "arrow", "dataset")
BATCH = 1024


@dataclass(slots=True)
class DuplicateId:
    value: str
    first: tuple[Shard, int]  # (shard, row)
    second: tuple[Shard, int]

    def describe(self) -> str:
        def where(shard: Shard, row: int) -> str:
            line = _line_number(shard.path, row) if shard.format in ("jsonl", "openai-batch") \
                and shard.path is not None else None
            return f"row {row}{f' (line {line})' if line else ''} of {shard.name}"

        shown = self.value if len(self.value) <= 60 else self.value[:57] + "..."
        return (f"id {ascii(shown)} is given twice: at {where(*self.first)} and at "
                f"{where(*self.second)}")


@dataclass(slots=True)
class InputScan:
    kept_types: dict[str, pa.DataType]
    duplicate: DuplicateId | None


def scan_inputs(shards: list[Shard], id_column: str | None, keep: list[str]) -> InputScan:
    """Kept column types over every shard, and the first id given twice (when id_column is set)."""
    hashes, types = array("q"), {c: pa.null() for c in keep}
    offsets = []
    for shard in shards:
        offsets.append(len(hashes))
        declared = shard.format in ARROW_FORMATS
        if declared:
            schema = input_schema(shard)
            for c in keep:
                if c in schema.names:
                    types[c] = widen(types[c], schema.field(c).type)
        if id_column is None and (declared or not keep):
            continue
        columns = [id_column] if declared and id_column else None
        pending: dict[str, list[Any]] = {c: [] for c in ([] if declared else keep)}
        ids = hashes if id_column else None
        for r in _rows(shard, columns):
            data = r.data or {}
            if ids is not None:
                v = data.get(id_column)
                ids.append(0 if v is None else (hash(str(v)) or 1))
            for c, values in pending.items():
                if c in data:
                    values.append(data[c])
                    if len(values) >= BATCH:
                        types[c] = widen(types[c], infer_type(values))
                        values.clear()
        for c, values in pending.items():
            if values:
                types[c] = widen(types[c], infer_type(values))
    dup = _first_duplicate(hashes, offsets, shards, id_column) if id_column else None
    return InputScan(types, dup)


def _rows(shard: Shard, columns: list[str] | None) -> Iterator[InputRow]:
    return iter_rows(shard, columns=columns, verify=False)


def _first_duplicate(hashes: array, offsets: list[int], shards: list[Shard],
                     id_column: str) -> DuplicateId | None:
    """The earliest row whose id an earlier row already had (null ids are never duplicates)."""
    h = np.frombuffer(hashes, dtype=np.int64) if len(hashes) else np.zeros(0, np.int64)
    order = np.argsort(h, kind="stable")  # equal hashes keep their row order
    sh = h[order]
    same = (sh[1:] == sh[:-1]) & (sh[1:] != 0)
    while same.any():
        i = int(np.flatnonzero(same)[np.argmin(order[1:][same])])  # the earliest repeat
        j = i
        while j > 0 and sh[j - 1] == sh[i]:
            j -= 1
        first, second = _locate(int(order[j]), offsets), _locate(int(order[i + 1]), offsets)
        a, b = _id_at(shards, first, id_column), _id_at(shards, second, id_column)
        if a == b:
            return DuplicateId(a, (shards[first[0]], first[1]), (shards[second[0]], second[1]))
        same[i] = False  # two ids with one hash (vanishingly rare): not a duplicate
    return None


def _locate(position: int, offsets: list[int]) -> tuple[int, int]:
    shard = int(np.searchsorted(np.asarray(offsets), position, side="right")) - 1
    return shard, position - offsets[shard]


def _id_at(shards: list[Shard], where: tuple[int, int], id_column: str) -> str:
    shard, row = where
    r = next(iter_rows(shards[shard], start=row, verify=False), None)
    return str((r.data or {}).get(id_column)) if r is not None else ""


def _line_number(path: Path, row: int) -> int | None:
    """1-based line of a JSONL row (blank lines are not rows)."""
    seen = -1
    with open_binary(path) as f:  # a local file or an object-store one
        for number, line in enumerate(f, 1):
            if line.strip():
                seen += 1
                if seen == row:
                    return number
    return None
