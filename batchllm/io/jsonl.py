"""JSONL lines: the rows of a file (non-blank lines) with their line numbers, read plain or a
checked block at a time."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

from batchllm.io.digests import FileDigest, changed
from batchllm.io.filesystems import open_binary


def jsonl_lines(path: Path, start: int = 0,
                limit: int | None = None) -> Iterator[tuple[int, int, bytes]]:
    """(row, 1-based line number, line) from row `start` on, at most `limit` rows; not checked
    against any digest."""
    row = -1
    with open_binary(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row += 1
            if row < start:
                continue
            if limit is not None and row >= start + limit:
                return
            yield row, number, line


def verified_jsonl_lines(path: Path, name: str, digest: FileDigest,
                         start: int = 0) -> Iterator[tuple[int, int, bytes]]:
    """(row, 1-based line number, line) from row `start` on, a block at a time: a block's lines
    are read and checked against its planned digest before any of them is yielded (raises
    InputChanged). Reading starts at the byte offset of the block holding `start`."""
    try:
        f = open_binary(path)
    except OSError as e:
        raise changed(name, f"it cannot be opened: {e.strerror or e}") from None
    with f:
        k0 = max(0, digest.block_of(start))
        f.seek(digest.blocks[k0].offset if digest.blocks else 0)
        number = (digest.blocks[k0].first_line - 1) if digest.blocks else 0  # lines read so far
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
                number += 1
                if line.strip():
                    h.update(line)
                    lines.append((number, line))
            if h.hexdigest() != digest.blocks[k].digest:
                raise changed(name, f"rows {lo}-{hi - 1} differ from the planned bytes")
            for i, (line_number, line) in enumerate(lines):
                if lo + i >= start:
                    yield lo + i, line_number, line
        for line in f:
            if line.strip():
                raise changed(name, f"it has rows beyond the {digest.num_rows} planned")
