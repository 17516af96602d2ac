"""The output location as the truth: job fingerprint, committed chunks, lock or lease, leftovers.

Layout of output.path (a folder, or a prefix on an object store: io/storage.py):
    job.json            fingerprint + the details it was made from + the shard list; written
                        first (it is what refuses another job), never changed by a resume
    .lock / .lease      held while a run is writing (a flock on a disk; a lease object with a
                        heartbeat on an object store, which has no locks)
    chunks/unit-NNNNNN-chunk-NNNNN[-last].arrow   committed rows, each file atomic (renamed
                        into place on a disk, one put of the whole object on a store); a unit is
                        complete once its `-last` chunk, written after its others, is there
    summary.json        figures of the committed rows and of the last run (written last)
    final/              after finalize: one file per input shard, in input order
Resume trusts only the committed chunk files (whole and readable). Each chunk records the content digest of the input
file its rows were read from (schema metadata `batchllm.input_content`); a chunk whose digest is
not the job's is set aside and its rows redone.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchllm.io.leases import LOCK  # noqa: F401 - the lock file's name, for callers
from batchllm.io.readers import Shard
from batchllm.io.storage import Storage, StorageError, open_storage
from batchllm.io.writers import WriteFailed
from batchllm.jobs.errors import OutputFolderError
from batchllm.jobs.plan import WorkUnit, parse_chunk_name
from batchllm.jobs.spec import OUTPUT_AFFECTING_ENGINE_KEYS, JobSpec

JOB_FILE = "job.json"
CHUNKS = "chunks"
FINAL = "final"
SUMMARY = "summary.json"


CONTENT_KEY = b"batchllm.input_content"


def job_details(spec: JobSpec, shards: list[Shard]) -> dict[str, Any]:
    """What makes two runs the same job: model, inputs (rows, size and content digest, not their
    mtime: a byte-identical copy is the same input), columns, sampling, ..."""
    inp = spec.input
    return {
        "model": spec.model,
        "tokenizer": spec.tokenizer,
        "inputs": [{"file": s.name, "format": s.format, "rows": s.num_rows, "size": s.size,
                    "content": s.content_hash} for s in shards],
        "columns": {"prompt": inp.prompt_column, "messages": inp.messages_column,
                    "token_ids": inp.token_ids_column, "id": inp.id_column,
                    "system_prompt": inp.system_prompt,
                    # only when set: jobs without it keep the fingerprint they had before
                    **({"structured_output": inp.structured_output_column}
                       if inp.structured_output_column else {}),
                    # what prompt-column rows become (auto: the template when the model has one)
                    **({"chat_template": inp.chat_template} if inp.column_kind == "prompt"
                       else {}),
                    **({"openai_model_mismatch": inp.openai_model_mismatch}
                       if inp.openai_model_mismatch != "error" else {})},
        "output": {"keep_columns": list(spec.output.keep_columns),
                   "unit_rows": spec.output.unit_rows},
        "sampling": {k: v for k, v in sorted(spec.sampling.items())},
        "engine": {k: spec.engine[k] for k in OUTPUT_AFFECTING_ENGINE_KEYS if k in spec.engine},
        "limits": {"prompt_too_long": spec.limits.prompt_too_long},
    }


def fingerprint(details: dict[str, Any]) -> str:
    blob = json.dumps(details, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def describe_difference(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """The first difference between two detail dicts, in words."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return describe_difference(old.get(key), new.get(key), f"{prefix}{key}.")
    if isinstance(old, list) and isinstance(new, list) and prefix == "inputs.":
        old_names = [o.get("file") for o in old]
        new_names = [n.get("file") for n in new]
        gone = [f for f in old_names if f not in new_names]
        added = [f for f in new_names if f not in old_names]
        if gone or added:
            parts = ([f"input shard(s) vanished: {', '.join(map(str, gone))}"] if gone else []) + (
                [f"new input shard(s): {', '.join(map(str, added))}"] if added else [])
            return "; ".join(parts)
        if len(old) != len(new):
            return f"the input has {len(new)} shard(s), the folder's job had {len(old)}"
        for o, n in zip(old, new):
            if o != n:
                what = [k for k in ("file", "format", "rows", "size", "content")
                        if o.get(k) != n.get(k)]
                return (f"input shard {o.get('file')} changed ({', '.join(what)}: "
                        + "; ".join(f"{o.get(k)} -> {n.get(k)}" for k in what) + ")")
    return f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


def claim_folder(folder: "Storage | Path", details: dict[str, Any], shards: list[Shard], *,
                 overwrite: bool, output_format: str = "arrow") -> bool:
    """Record this job in `folder` or check it is the job already there; True if resuming."""
    store = open_storage(folder)
    try:
        return _claim(store, details, shards, overwrite, output_format)
    except StorageError as e:
        raise OutputFolderError(str(e)) from None


def _claim(store: Storage, details: dict[str, Any], shards: list[Shard], overwrite: bool,
           output_format: str) -> bool:
    fp = fingerprint(details)
    if store.exists(JOB_FILE) and not overwrite:
        try:
            old = json.loads(store.read(JOB_FILE))
        except (OSError, ValueError) as e:
            raise OutputFolderError(f"{store.where(JOB_FILE)}: unreadable ({e}); use --overwrite "
                                    "to start over") from None
        if old.get("fingerprint") != fp:
            why = describe_difference(old.get("details", {}), details)
            raise OutputFolderError(
                f"output folder {store.uri} holds a different job ({why}). Use another "
                "output.path, or --overwrite to discard its results and start again.")
        return any(n.endswith(".arrow") for n in store.list(CHUNKS))
    if overwrite:
        for name in (CHUNKS, FINAL):
            store.delete_tree(name)
        for name in (JOB_FILE, SUMMARY):
            store.delete(name)
    store.make_dir(CHUNKS)
    record = {"fingerprint": fp, "details": details, "output_format": output_format,
              "shards": [{"name": s.name, "rows": s.num_rows} for s in shards]}
    try:
        store.write_text(JOB_FILE, json.dumps(record, indent=2, default=str))
    except WriteFailed as e:
        raise OutputFolderError(str(e)) from None
    return False


def read_job_record(folder: "Storage | Path | str") -> dict[str, Any]:
    """job.json, checked for the keys readers of a folder rely on."""
    store = open_storage(folder)
    path = store.where(JOB_FILE)
    try:
        record = json.loads(store.read(JOB_FILE))
    except FileNotFoundError:
        raise OutputFolderError(f"{store.uri} is not a batchllm output folder (no {JOB_FILE})"
                                ) from None
    except NotADirectoryError:
        raise OutputFolderError(f"{store.uri} is not a folder") from None
    except (OSError, ValueError) as e:
        raise OutputFolderError(f"{path}: unreadable: {e}") from None
    try:
        shards = record["shards"]
        ok = (all(isinstance(s["name"], str) and isinstance(s["rows"], int) for s in shards)
              and isinstance(record["details"]["output"]["unit_rows"], int))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise OutputFolderError(f"{path}: not a batchllm job record (shards / details missing or "
                                "malformed); rerun the job with --overwrite to rebuild the folder")
    return record


def chunk_metadata(shard: Shard) -> dict[bytes, bytes]:
    """Schema metadata a chunk of `shard`'s rows is written with: the input's content digest."""
    return {CONTENT_KEY: (shard.content_hash or "").encode()}


@dataclass(slots=True)
class UnitState:
    """What is committed for one unit."""

    done_rows: set[int] = field(default_factory=set)
    files: list[str] = field(default_factory=list)  # chunk names under chunks/
    next_chunk: int = 0
    complete: bool = False


@dataclass(slots=True)
class Committed:
    units: dict[int, UnitState]
    corrupt: list[str]  # "<chunk name>: <why>" for each chunk set aside as corrupt

    def rows_done(self, units: list[WorkUnit]) -> int:
        return sum(u.num_rows if self.units[u.index].complete else len(self.units[u.index].done_rows)
                   for u in units)


def _chunk_problem(store: Storage, name: str, unit: WorkUnit, seen: set[int],
                   content: str | None) -> tuple[str | None, list[int]]:
    """Why a chunk cannot be trusted (None if it can), and its input rows. `content`: the digest
    of the input its rows must have been read from (None: not known, not checked)."""
    try:
        table = store.read_arrow(f"{CHUNKS}/{name}", ["input_row"])
        table.validate(full=True)
        rows = table.column(0).to_pylist()
    except StorageError as e:  # the store could not be read (not the chunk's fault)
        raise OutputFolderError(f"cannot read committed chunk {store.where(CHUNKS + '/' + name)}: "
                                f"{e}; rerun the same command to resume") from None
    except (pa.ArrowInvalid, OSError, KeyError) as e:
        return f"unreadable ({str(e).splitlines()[0][:120]})", []
    recorded = (table.schema.metadata or {}).get(CONTENT_KEY, b"").decode(errors="replace")
    if content and recorded != content:
        return (f"its rows were read from another version of the input (content "
                f"{recorded or 'not recorded'}, the job's is {content})"), []
    if not rows:
        return "holds no rows", []
    if any(r is None or not unit.start <= r < unit.stop for r in rows):
        return f"holds rows outside its unit's range [{unit.start}, {unit.stop})", []
    if seen & set(rows):
        return "repeats rows already committed by another chunk", []
    return None, rows


def scan_committed(folder: "Storage | Path", units: list[WorkUnit]) -> Committed:
    """Read chunk names and their `input_row` column; set corrupt chunks aside (renamed
    `*.corrupt-<pid>`, never read again) so that their rows are redone. A chunk is corrupt when it
    is unreadable, holds rows outside its unit or already committed, or was read from an input
    whose content digest is not the one job.json records."""
    store = open_storage(folder)
    states = {u.index: UnitState() for u in units}
    corrupt: list[str] = []
    contents = _recorded_contents(store)
    try:
        names = [n for n in store.list(CHUNKS) if n.endswith(".arrow")]
    except StorageError as e:
        raise OutputFolderError(str(e)) from None
    for name in names:
        parsed = parse_chunk_name(name)
        if parsed is None or parsed[0] not in states:
            continue
        unit, chunk, last = parsed
        st = states[unit]
        why, rows = _chunk_problem(store, name, units[unit], st.done_rows,
                                   contents.get(units[unit].shard))
        if why is not None:
            corrupt.append(f"{name}: {why}")
            try:
                store.move(f"{CHUNKS}/{name}", f"{CHUNKS}/{name}.corrupt-{os.getpid()}")
            except OSError as e:
                raise OutputFolderError(f"chunk {store.where(CHUNKS + '/' + name)} is corrupt "
                                        f"({why}) and cannot be set aside: {e.strerror or e}; "
                                        "move it away and rerun") from None
            continue
        st.files.append(name)
        st.next_chunk = max(st.next_chunk, chunk + 1)
        st.complete = st.complete or last
        st.done_rows.update(rows)
    for u in units:
        st = states[u.index]
        if st.complete and len(st.done_rows) < u.num_rows:
            st.complete = False  # its last chunk is there but an earlier one was set aside
        if not st.complete and len(st.done_rows) >= u.num_rows:
            st.complete = True
    return Committed(states, corrupt)


def _recorded_contents(store: Storage) -> dict[int, str]:
    """Shard index -> the content digest job.json records for it (the job's truth)."""
    try:
        inputs = json.loads(store.read(JOB_FILE))["details"]["inputs"]
        return {i: s["content"] for i, s in enumerate(inputs) if s.get("content")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


class FolderLock:
    """The lease of an output location: an exclusive flock on a folder's `.lock` (the kernel drops
    it when its holder dies, so a lock left by a killed run is stale by construction), or a lease
    object with a heartbeat on an object store (io/leases.py). A second run is refused. Entering
    also removes a folder's temporary files of interrupted writes (`removed`); `stale` says whose
    stale lock or lease was taken over (`stale_pid` for a folder's)."""

    def __init__(self, folder: "Storage | Path", take_over: bool = False) -> None:
        self.store = open_storage(folder)
        self._lease = self.store.lease(take_over)
        self.removed: list[Path] = []
        self.stale: str | None = None
        self.stale_pid: int | None = None

    def __enter__(self) -> "FolderLock":
        try:
            self._lease.__enter__()
        except StorageError as e:
            raise OutputFolderError(str(e)) from None
        self.removed, self.stale = list(self._lease.removed), self._lease.stale
        self.stale_pid = getattr(self._lease, "stale_pid", None)
        return self

    def __exit__(self, *exc: object) -> None:
        self._lease.__exit__(*exc)
