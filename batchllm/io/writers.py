"""Atomic writes: a file appears under its final name complete (tmp name, fsync, rename, fsync dir).

Temporary files start with '.tmp-' and never end in '.arrow', so a reader that lists '*.arrow'
sees only committed files, and leftovers from a crash are recognisable and removable.
"""
from __future__ import annotations

import errno
import fnmatch
import os
import re
from pathlib import Path
from typing import Callable, IO

import pyarrow as pa

TMP_PREFIX = ".tmp-"


class WriteFailed(OSError):
    """Writing an output file failed; the message says which file and why, and what to do."""


def _explain(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on the device; free some space and rerun the same command to resume"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied; make the output folder writable and rerun to resume"
    if e.errno == errno.EROFS:
        return "the file system is read-only; choose another output.path or remount, then rerun"
    if e.errno == errno.EFBIG:
        return ("file too large for this process's file-size limit (ulimit -f) or the file "
                "system; raise the limit or lower output.chunk_rows, then rerun to resume")
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded; free some space and rerun the same command to resume"
    return f"{e.strerror or e}; rerun the same command to resume"


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open folders; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def inside(folder: Path, name: str) -> Path:
    """folder/name, refusing a name that would land outside `folder` ('../x', '/etc/x', 'a/b')."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"refusing output file name {name!r}: it must be a plain file name "
                         f"inside {folder}")
    return folder / name


def safe_stem(name: str) -> str:
    """A file-name-safe stem of an input file name (letters, digits, '.', '_', '-' only)."""
    stem = Path(name.replace("\\", "/")).stem if name else ""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".")
    return cleaned or "input"


def _injected_fault(path: Path) -> OSError | None:
    """Test hook: BATCHLLM_FAULT_ENOSPC=<glob> makes writes of matching file names fail with ENOSPC
    from this real write path (used only where a small file system cannot be mounted)."""
    pattern = os.environ.get("BATCHLLM_FAULT_ENOSPC")
    if pattern and fnmatch.fnmatch(path.name, pattern):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> int:
    """Write `path` through `write(file)` atomically; returns its size in bytes."""
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            fault = _injected_fault(path)
            if fault is not None:
                raise fault
            f.flush()
            os.fsync(f.fileno())
        size = tmp.stat().st_size
        os.replace(tmp, path)
        fsync_dir(path.parent)
        return size
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise WriteFailed(e.errno or 0, f"cannot write {path}: {_explain(e)}") from None


def write_arrow_atomic(path: Path, table: pa.Table) -> int:
    """One Arrow IPC file, committed atomically."""
    def write(f: IO[bytes]) -> None:
        with pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)

    return write_atomic(path, write)


def write_text_atomic(path: Path, text: str) -> int:
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def read_arrow(path: Path, columns: list[str] | None = None) -> pa.Table:
    """Read a committed Arrow IPC file (memory-mapped); raises pa.ArrowInvalid / OSError if corrupt."""
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    return table.select(columns) if columns is not None else table


def remove_temp_files(folder: Path) -> list[Path]:
    """Delete leftover temporary files of interrupted writes; returns what was removed."""
    removed = []
    for p in folder.glob(f"{TMP_PREFIX}*"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed
