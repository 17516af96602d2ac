"""Leases on an output location: one run at a time writes there.

    local folder   an exclusive fcntl.flock on `.lock` (the kernel drops it when its holder dies,
                   so a lock left by a killed run is stale by construction)
    object store   no locks: a `.lease` object naming its holder (token, host, pid) and its last
                   heartbeat, rewritten every HEARTBEAT_S. Another run is refused while the lease
                   is live; it is stale once its heartbeat is older than LEASE_EXPIRY_S, or at
                   once when its holder ran on this host and that process is gone; `take_over`
                   takes a live-looking one (its holder's machine died). Taking a lease writes it,
                   waits SETTLE_S and reads it back: of two runs starting at the same moment, the
                   last writer keeps it and the other is refused. A holder whose lease was taken
                   over sees it at its next heartbeat or write (writes check the lease first) and
                   stops writing.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from batchllm.io.filesystems import StorageError
from batchllm.io.writers import remove_temp_files

LOCK = ".lock"
LEASE = ".lease"
LEASE_EXPIRY_S = 120.0
HEARTBEAT_S = 15.0
SETTLE_S = 1.0


class StorageBusy(StorageError):
    """Another run holds the location's lock or lease."""


class FlockLease:
    """output.path/.lock held with flock; entering also removes leftover temporary files of
    interrupted writes in `subfolders` (`removed`) and notes a stale lock's pid (`stale_pid`)."""

    def __init__(self, folder: Path, subfolders: tuple[str, ...] = ()) -> None:
        self.folder, self.subfolders = folder, subfolders
        self._fd: int | None = None
        self.removed: list[Path] = []
        self.stale_pid: int | None = None

    @property
    def stale(self) -> str | None:
        return (f"a stale lock left by pid {self.stale_pid} (that run is gone)"
                if self.stale_pid is not None else None)

    def __enter__(self) -> "FlockLease":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageError(f"cannot use output folder {self.folder}: {e.strerror or e} "
                               "(check that it is writable, or choose another output.path)"
                               ) from None
        holder = _read_pid(self._fd)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            who = f" (pid {holder})" if holder else ""
            raise StorageBusy(f"output folder {self.folder} is in use by another batchllm "
                              f"run{who}: its lock {self.folder / LOCK} is held; wait for that "
                              "run to finish or stop it first") from None
        if holder and holder != os.getpid():
            self.stale_pid = holder
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, str(os.getpid()).encode(), 0)
        except OSError:
            pass  # the pid is only informative (e.g. the disk is full); the flock is what counts
        for sub in (self.folder, *(self.folder / s for s in self.subfolders)):
            if sub.exists():
                self.removed += remove_temp_files(sub)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


class ObjectLease:
    """The `.lease` object of an object-store location (see the module doc). `read()` and
    `write(data)` read and write the lease object; `where` names it in messages."""

    def __init__(self, read: Callable[[], bytes | None], write: Callable[[bytes], None],
                 delete: Callable[[], None], where: str, take_over: bool = False) -> None:
        self._read, self._write, self._delete = read, write, delete
        self.where, self.take_over = where, take_over
        self.token = uuid.uuid4().hex
        self.stale: str | None = None  # whose lease was taken over, in words
        self.removed: list[Path] = []  # object stores leave no temporary files
        self.lost: str | None = None  # set when another run took the lease over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict[str, Any] | None:
        try:
            raw = self._read()
            return json.loads(raw) if raw else None
        except ValueError:
            return None  # a lease cut short or garbled holds nothing

    def __enter__(self) -> "ObjectLease":
        old = self.holder()
        if old is not None and old.get("token") != self.token:
            age = time.time() - float(old.get("heartbeat", 0))
            who = f"host {old.get('host')}, pid {old.get('pid')}"
            gone_here = old.get("host") == socket.gethostname() and not _alive(old.get("pid"))
            if age < LEASE_EXPIRY_S and not gone_here and not self.take_over:
                raise StorageBusy(
                    f"output {self.where} is in use by another batchllm run ({who}, last "
                    f"heartbeat {age:.0f} s ago): its lease object is live. Wait for that run to "
                    "finish or stop it; if it is gone (its machine died), rerun with --take-over, "
                    f"or wait {LEASE_EXPIRY_S - age:.0f} s for the lease to expire")
            state = "gone" if gone_here or age >= LEASE_EXPIRY_S else "taken over by --take-over"
            self.stale = f"the lease of {who} (last heartbeat {age:.0f} s ago; {state})"
        self._beat()
        time.sleep(SETTLE_S)
        now = self.holder()
        if now is None or now.get("token") != self.token:
            who = f"host {now.get('host')}, pid {now.get('pid')}" if now else "another run"
            raise StorageBusy(f"output {self.where}: {who} took its lease at the same moment; "
                              "only one run may write there (rerun when it is done)")
        self._thread = threading.Thread(target=self._heartbeat, name="batchllm-lease",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self.lost is None and (self.holder() or {}).get("token") == self.token:
                self._delete()
        except OSError:
            pass  # it expires by itself

    def check(self) -> None:
        """Raise StorageBusy when this run no longer holds the lease (before a write)."""
        now = self.holder()
        if now is None or now.get("token") != self.token:
            who = f"host {now.get('host')}, pid {now.get('pid')}" if now else "nobody"
            self.lost = self.lost or who
            raise StorageBusy(f"output {self.where}: this run's lease was taken over (now held "
                              f"by {who}); it stops writing there")

    def _beat(self) -> None:
        record = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                  "heartbeat": time.time(), "expires_after_s": LEASE_EXPIRY_S}
        try:
            self._write(json.dumps(record).encode())
        except OSError as e:
            raise StorageError(f"output {self.where}: cannot write its lease object: {e}") from None

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.check()
                self._beat()
            except StorageBusy:
                return  # writes now fail with the reason
            except OSError:
                pass  # a missed beat; the next one may get through


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True
