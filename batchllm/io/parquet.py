"""Parquet shards: stream row groups, each checked against its planned digest before it is read,
and re-check the row groups of rows about to be committed."""
from __future__ import annotations

from pathlib import Path
from typing import IO, Iterator

import pyarrow as pa

from batchllm.io.digests import FileDigest, changed, footer_digest, range_digest
from batchllm.io.filesystems import open_binary, parquet_source

BATCH_ROWS = 1024


def _open(path: Path, name: str) -> IO[bytes]:
    try:
        return open_binary(path)
    except OSError as e:
        raise changed(name, f"it cannot be opened: {e.strerror or e}") from None


def iter_parquet_batches(path: Path, name: str, start: int, columns: list[str] | None,
                         digest: FileDigest | None) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Row groups from the one holding `start` on (earlier ones are not read); with a digest, the
    footer and each row group's bytes are checked before its rows are read."""
    import pyarrow.parquet as pq

    raw = _open(path, name) if digest is not None else None
    try:
        try:
            pf = pq.ParquetFile(parquet_source(path))
        except (pa.ArrowInvalid, OSError) as e:
            raise changed(name, f"it is no longer a readable Parquet file: {e}") from None
        if raw is not None and footer_digest(raw) != digest.footer:
            raise changed(name, "its Parquet footer differs from the planned one")
        offset = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset + n <= start:
                offset += n
                continue
            if raw is not None:
                b = digest.blocks[g]
                if range_digest(raw, b.offset, b.end) != b.digest:
                    raise changed(name, f"row group {g} (rows {offset}-{offset + n - 1}) "
                                      "differs from the planned bytes")
            batches = pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[g], columns=columns)
            while True:
                try:
                    batch = next(batches, None)
                except (pa.ArrowInvalid, OSError) as e:  # it was whole when planned
                    raise changed(name, f"row group {g} cannot be read: {e}") from None
                if batch is None:
                    break
                if offset + batch.num_rows > start:
                    lo = max(0, start - offset)
                    yield offset + lo, batch.slice(lo)
                offset += batch.num_rows
    finally:
        if raw is not None:
            raw.close()


def verify_row_groups(path: Path, name: str, digest: FileDigest, lo: int, hi: int) -> None:
    """The footer and the row groups holding rows [lo, hi) still have their planned bytes."""
    try:
        with open_binary(path) as f:
            if footer_digest(f) != digest.footer:
                raise changed(name, "its Parquet footer differs from the planned one")
            for k in range(max(0, digest.block_of(lo)), digest.block_of(max(lo, hi - 1)) + 1):
                b = digest.blocks[k]
                if range_digest(f, b.offset, b.end) != b.digest:
                    raise changed(name, f"row group {k} differs from the planned bytes")
    except OSError as e:
        raise changed(name, f"it cannot be read: {e.strerror or e}") from None
