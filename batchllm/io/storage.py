"""Where a job's output lives: a local folder or an object-store prefix, with the operations the
job runner needs (list, read, write atomically, exists, delete, move, lease).

Names are '/'-separated paths relative to the location ("job.json", "chunks/unit-...arrow").

    LocalStorage    write = temporary name, fsync, rename, fsync the folder (io/writers.py)
    ObjectStorage   write = the whole object built in memory and put with one call, at a
                    deterministic key: it appears complete or not at all (there is no rename);
                    a run holding the lease checks it before each write, so a run whose lease was
                    taken over stops writing
Both are picklable (replica processes and Ray actors write their own chunks).
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Any, Callable, Mapping

import pyarrow as pa
import pyarrow.fs as pafs

from batchllm.io.filesystems import StorageError, check_bucket, explain, filesystem_for, is_uri
from batchllm.io.leases import LEASE, FlockLease, ObjectLease, StorageBusy
from batchllm.io.writers import WriteFailed, read_arrow, write_arrow_atomic, write_atomic

__all__ = ["Storage", "LocalStorage", "ObjectStorage", "open_storage", "StorageError",
           "StorageBusy", "is_uri"]


class Storage(ABC):
    """A job's output location."""

    uri: str  # the folder path or the object-store URI, for messages

    def where(self, name: str = "") -> str:
        return f"{self.uri.rstrip('/')}/{name}" if name else self.uri

    @abstractmethod
    def list(self, sub: str = "") -> list[str]:
        """Names of the files directly inside `sub`, sorted ([] when it does not exist)."""

    @abstractmethod
    def read(self, name: str) -> bytes:
        """Raises FileNotFoundError when missing, OSError otherwise."""

    @abstractmethod
    def read_arrow(self, name: str, columns: list[str] | None = None,
                   missing_ok: bool = False) -> pa.Table:
        """An Arrow IPC file (only `columns` read; with missing_ok those it has); raises
        pa.ArrowInvalid / OSError when corrupt, KeyError for a missing column."""

    @abstractmethod
    def write(self, name: str, data: bytes) -> int:
        """Atomically: the whole file appears, or nothing. Raises WriteFailed (says what to do)."""

    def write_with(self, name: str, write: Callable[[IO[bytes]], None]) -> int:
        """Atomically, what `write(file)` writes (built in memory, then one write())."""
        buf = io.BytesIO()
        write(buf)
        return self.write(name, buf.getvalue())

    def write_arrow(self, name: str, table: pa.Table) -> int:
        def write(f: IO[bytes]) -> None:
            with pa.ipc.new_file(f, table.schema) as w:
                w.write_table(table)

        return self.write_with(name, write)

    def write_text(self, name: str, text: str) -> int:
        return self.write(name, text.encode("utf-8"))

    @abstractmethod
    def mtime(self, name: str) -> float:
        """When the file was written (Unix seconds; 0 when unknown)."""

    def location(self, name: str) -> "Path | str":
        """What to show a user for a file: its local path, or its URI."""
        return self.where(name)

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove a file if it is there."""

    @abstractmethod
    def delete_tree(self, sub: str) -> None:
        """Remove everything under `sub`."""

    @abstractmethod
    def move(self, src: str, dst: str) -> None:
        """Rename (local) or copy then delete (object store): `src` is gone afterwards."""

    @abstractmethod
    def make_dir(self, sub: str) -> None: ...

    @abstractmethod
    def lease(self, take_over: bool = False) -> FlockLease | ObjectLease:
        """The context manager that keeps other runs out while this one writes here."""

    def check(self) -> None:
        """The location can be reached (bucket, credentials); raises StorageError."""

    def local_path(self) -> Path | None:
        return None


class LocalStorage(Storage):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.uri = str(self.root)

    def _path(self, name: str) -> Path:
        return self.root / name if name else self.root

    def list(self, sub: str = "") -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self._path(sub)) if e.is_file())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def read(self, name: str) -> bytes:
        return self._path(name).read_bytes()

    def read_arrow(self, name: str, columns: list[str] | None = None,
                   missing_ok: bool = False) -> pa.Table:
        if columns is not None and missing_ok:
            table = read_arrow(self._path(name))  # memory-mapped: unread columns cost nothing
            return table.select([c for c in columns if c in table.column_names])
        return read_arrow(self._path(name), columns)

    def write(self, name: str, data: bytes) -> int:
        return write_atomic(self._path(name), lambda f: f.write(data))

    def write_with(self, name: str, write: Callable[[IO[bytes]], None]) -> int:
        return write_atomic(self._path(name), write)  # streamed, not built in memory

    def write_arrow(self, name: str, table: pa.Table) -> int:
        return write_arrow_atomic(self._path(name), table)

    def mtime(self, name: str) -> float:
        try:
            return self._path(name).stat().st_mtime
        except OSError:
            return 0.0

    def location(self, name: str) -> Path:
        return self._path(name)

    def exists(self, name: str) -> bool:
        return self._path(name).exists()

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def delete_tree(self, sub: str) -> None:
        shutil.rmtree(self._path(sub), ignore_errors=True)

    def move(self, src: str, dst: str) -> None:
        self._path(src).rename(self._path(dst))

    def make_dir(self, sub: str) -> None:
        self._path(sub).mkdir(parents=True, exist_ok=True)

    def lease(self, take_over: bool = False) -> FlockLease:
        return FlockLease(self.root, ("chunks", "final"))  # a flock needs no take-over

    def local_path(self) -> Path:
        return self.root

    def __repr__(self) -> str:
        return f"LocalStorage({self.uri!r})"


class ObjectStorage(Storage):
    """A prefix `base` (bucket/key...) in `fs`; `uri` is how the user wrote it."""

    def __init__(self, fs: pafs.FileSystem, base: str, uri: str) -> None:
        self.fs, self.base, self.uri = fs, base.strip("/"), uri.rstrip("/")
        self.fence: str | None = None  # the token of the lease this run holds

    def _key(self, name: str) -> str:
        return posixpath.join(self.base, name) if name else self.base

    def list(self, sub: str = "") -> list[str]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self._key(sub), allow_not_found=True))
        except OSError as e:
            raise StorageError(explain(e, self.where(sub))) from None
        return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File)

    def read(self, name: str) -> bytes:
        key = self._key(name)
        try:
            with self.fs.open_input_stream(key) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as e:
            if self.fs.get_file_info(key).type == pafs.FileType.NotFound:
                raise FileNotFoundError(self.where(name)) from None
            raise StorageError(explain(e, self.where(name))) from None

    def read_arrow(self, name: str, columns: list[str] | None = None,
                   missing_ok: bool = False) -> pa.Table:
        """Network and permission errors are StorageError (a bad object is pa.ArrowInvalid)."""
        try:
            with self.fs.open_input_file(self._key(name)) as f:  # ranged reads of what is needed
                reader = pa.ipc.open_file(f)
                if columns is None:
                    return reader.read_all()
                if missing_ok:
                    columns = [c for c in columns if c in reader.schema.names]
                fields = [reader.schema.get_field_index(c) for c in columns]
                if -1 in fields:
                    raise KeyError(f"{self.where(name)} has no column "
                                   f"{columns[fields.index(-1)]!r}")
                picked = pa.ipc.open_file(f, options=pa.ipc.IpcReadOptions(included_fields=fields))
                return picked.read_all().select(columns)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise StorageError(explain(e, self.where(name))) from None

    def write(self, name: str, data: bytes) -> int:
        self._check_fence(name)
        try:
            with self.fs.open_output_stream(self._key(name)) as f:
                f.write(data)
        except OSError as e:
            raise WriteFailed(0, f"cannot write {self.where(name)}: {explain(e, self.uri)}; "
                              "rerun the same command to resume") from None
        return len(data)

    def _check_fence(self, name: str) -> None:
        if self.fence is None or name == LEASE:
            return
        try:
            holder = json.loads(self.read(LEASE))
        except (OSError, ValueError):
            holder = {}
        if holder.get("token") != self.fence:
            who = f"host {holder.get('host')}, pid {holder.get('pid')}" if holder else "nobody"
            raise WriteFailed(0, f"cannot write {self.where(name)}: this run's lease on "
                              f"{self.uri} was taken over (now held by {who}); it stops writing")

    def exists(self, name: str) -> bool:
        try:
            return self.fs.get_file_info(self._key(name)).type == pafs.FileType.File
        except OSError as e:
            raise StorageError(explain(e, self.where(name))) from None

    def mtime(self, name: str) -> float:
        try:
            return (self.fs.get_file_info(self._key(name)).mtime_ns or 0) / 1e9
        except OSError:
            return 0.0

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self._key(name))
        except FileNotFoundError:
            pass

    def delete_tree(self, sub: str) -> None:
        key = self._key(sub)
        if self.fs.get_file_info(key).type == pafs.FileType.Directory:
            self.fs.delete_dir_contents(key, missing_dir_ok=True)

    def move(self, src: str, dst: str) -> None:
        self.fs.copy_file(self._key(src), self._key(dst))
        self.fs.delete_file(self._key(src))

    def make_dir(self, sub: str) -> None:
        pass  # prefixes exist by their objects

    def lease(self, take_over: bool = False) -> ObjectLease:
        def read() -> bytes | None:
            try:
                return self.read(LEASE)
            except FileNotFoundError:
                return None

        lease = ObjectLease(read, lambda data: self.write(LEASE, data),
                            lambda: self.delete(LEASE), self.uri, take_over)
        self.fence = lease.token  # set before the storage is handed to any replica
        return lease

    def check(self) -> None:
        check_bucket(self.fs, self.base, f"output.path {self.uri!r}")

    def __repr__(self) -> str:
        return f"ObjectStorage({self.uri!r})"


def open_storage(path: "str | os.PathLike[str] | Storage",
                 options: Mapping[str, Any] | None = None) -> Storage:
    """The Storage for output.path (a folder, or a URI with output.storage_options)."""
    if isinstance(path, Storage):
        return path
    text = os.fspath(path)
    if not is_uri(text):
        return LocalStorage(Path(text[7:] if text.startswith("file://") else text))
    fs, base = filesystem_for(text, options, "output")
    return ObjectStorage(fs, base, text)
