"""Content digests of input files: the whole file (part of the job's fingerprint) and its blocks of
rows, which the readers check before any row of a block leaves them.

    JSONL     blocks of up to BLOCK_ROWS rows (fewer when their lines pass BLOCK_BYTES); a block's
              digest covers its rows' lines, byte for byte (blank lines are not rows)
    Parquet   one block per row group (the bytes of its column chunks), and the footer

So a file rewritten during a run is noticed at the next block read, and rows of the new version
never reach the engine. blake2b from hashlib: no extra dependency, ~1 GB/s.
"""
from __future__ import annotations

import hashlib
import os
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from batchllm.io.filesystems import open_binary

BLOCK_ROWS = 256
BLOCK_BYTES = 4 << 20
_READ = 1 << 20


class InputChanged(ValueError):
    """An input file's bytes are no longer the ones the job was planned with."""


@dataclass(frozen=True, slots=True)
class Block:
    first_row: int
    offset: int  # JSONL: where the first row's line starts; Parquet: where the row group starts
    end: int  # Parquet: where the row group's bytes end (JSONL: 0, the rows say where it ends)
    digest: str
    first_line: int = 0  # JSONL: the 1-based line number of its first row (blank lines count)


@dataclass(slots=True)
class FileDigest:
    num_rows: int
    content: str  # of the whole file
    blocks: list[Block] = field(default_factory=list)
    footer: str | None = None  # Parquet only
    _starts: list[int] = field(default_factory=list)

    def block_of(self, row: int) -> int:
        """Index of the block holding `row` (-1 when there are no blocks)."""
        if len(self._starts) != len(self.blocks):
            self._starts = [b.first_row for b in self.blocks]
        return bisect_right(self._starts, row) - 1

    def rows_of(self, k: int) -> tuple[int, int]:
        stop = self.blocks[k + 1].first_row if k + 1 < len(self.blocks) else self.num_rows
        return self.blocks[k].first_row, stop


def _hasher(size: int = 8) -> "hashlib.blake2b":
    return hashlib.blake2b(digest_size=size)


def digest_jsonl(path: Path) -> FileDigest:
    """Rows (non-blank lines), the file's digest and its row blocks, in one pass."""
    whole, block = _hasher(16), _hasher()
    blocks: list[Block] = []
    rows = offset = in_block = block_bytes = 0
    start = start_line = 0
    with open_binary(path) as f:
        for number, line in enumerate(f, 1):
            whole.update(line)
            if line.strip():
                if in_block and (in_block >= BLOCK_ROWS or block_bytes >= BLOCK_BYTES):
                    blocks.append(Block(rows - in_block, start, 0, block.hexdigest(), start_line))
                    block, in_block, block_bytes = _hasher(), 0, 0
                if not in_block:
                    start, start_line = offset, number
                block.update(line)
                in_block += 1
                block_bytes += len(line)
                rows += 1
            offset += len(line)
    if in_block:
        blocks.append(Block(rows - in_block, start, 0, block.hexdigest(), start_line))
    return FileDigest(rows, whole.hexdigest(), blocks)


def row_group_range(rg) -> tuple[int, int]:  # rg: pyarrow.parquet.RowGroupMetaData
    """[start, end) of a row group's column chunks in the file."""
    lo, hi = None, 0
    for i in range(rg.num_columns):
        c = rg.column(i)
        start = c.data_page_offset
        if c.has_dictionary_page and c.dictionary_page_offset is not None:
            start = min(start, c.dictionary_page_offset)
        lo = start if lo is None else min(lo, start)
        hi = max(hi, start + c.total_compressed_size)
    return lo or 0, hi


def digest_parquet(path: Path, metadata) -> FileDigest:  # metadata: pyarrow.parquet.FileMetaData
    """The file's digest, one block per row group and the footer's digest."""
    with open_binary(path) as f:
        whole = hashlib.file_digest(f, lambda: _hasher(16)).hexdigest()
        blocks, first = [], 0
        for g in range(metadata.num_row_groups):
            rg = metadata.row_group(g)
            lo, hi = row_group_range(rg)
            blocks.append(Block(first, lo, hi, range_digest(f, lo, hi)))
            first += rg.num_rows
        footer = footer_digest(f)
    return FileDigest(metadata.num_rows, whole, blocks, footer)


def range_digest(f: IO[bytes], start: int, end: int) -> str:
    """Digest of bytes [start, end) of an open file (short if the file is shorter)."""
    h = _hasher()
    f.seek(start)
    left = end - start
    while left > 0:
        data = f.read(min(_READ, left))
        if not data:
            h.update(b"\0short")  # a file cut short never matches the planned bytes
            break
        h.update(data)
        left -= len(data)
    return h.hexdigest()


def footer_digest(f: IO[bytes]) -> str:
    """Digest of a Parquet file's footer (metadata, its length and the magic bytes)."""
    size = f.seek(0, os.SEEK_END)
    if size < 8:
        return range_digest(f, 0, size)
    f.seek(size - 8)
    length = int.from_bytes(f.read(4), "little")
    return range_digest(f, max(0, size - 8 - length), size)


def changed(name: str, what: str) -> InputChanged:
    return InputChanged(f"input shard {name} changed during the run ({what}); results would mix "
                        "two versions of it, so rows read from it after the change are not "
                        "committed. Restore it and rerun to resume, or rerun with --overwrite to "
                        "start over.")
