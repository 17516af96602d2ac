"""The output folder as the truth: job fingerprint, committed chunks, lock, leftovers.

Layout of output.path:
    job.json            fingerprint + the details it was made from + the shard list
    .lock               held (fcntl.flock) while a run is writing
    chunks/unit-NNNNNN-chunk-NNNNN[-last].arrow   committed rows, each file atomic
    summary.json        figures of the committed rows and of the last run
    final/              after finalize: one file per input shard, in input order
Resume trusts only the committed chunk files. Each chunk records the content digest of the input
file its rows were read from (schema metadata `batchllm.input_content`); a chunk whose digest is
not the job's is set aside and its rows redone.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from batchllm.io.readers import Shard
from batchllm.io.writers import WriteFailed, read_arrow, remove_temp_files, write_text_atomic
from batchllm.jobs.errors import OutputFolderError
from batchllm.jobs.plan import WorkUnit, parse_chunk_name
from batchllm.jobs.spec import OUTPUT_AFFECTING_ENGINE_KEYS, JobSpec

JOB_FILE = "job.json"
CHUNKS = "chunks"
FINAL = "final"
SUMMARY = "summary.json"
LOCK = ".lock"


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


def claim_folder(folder: Path, details: dict[str, Any], shards: list[Shard], *,
                 overwrite: bool, output_format: str = "arrow") -> bool:
    """Record this job in `folder` or check it is the job already there; True if resuming."""
    job_file = folder / JOB_FILE
    fp = fingerprint(details)
    if job_file.exists() and not overwrite:
        try:
            old = json.loads(job_file.read_text())
        except (OSError, ValueError) as e:
            raise OutputFolderError(f"{job_file}: unreadable ({e}); use --overwrite to start over"
                                    ) from None
        if old.get("fingerprint") != fp:
            why = describe_difference(old.get("details", {}), details)
            raise OutputFolderError(
                f"output folder {folder} holds a different job ({why}). Use another output.path, "
                "or --overwrite to discard its results and start again.")
        return any((folder / CHUNKS).glob("*.arrow"))
    if overwrite:
        for name in (CHUNKS, FINAL):
            shutil.rmtree(folder / name, ignore_errors=True)
        for name in (JOB_FILE, SUMMARY):
            (folder / name).unlink(missing_ok=True)
    (folder / CHUNKS).mkdir(parents=True, exist_ok=True)
    record = {"fingerprint": fp, "details": details, "output_format": output_format,
              "shards": [{"name": s.name, "rows": s.num_rows} for s in shards]}
    try:
        write_text_atomic(job_file, json.dumps(record, indent=2, default=str))
    except WriteFailed as e:
        raise OutputFolderError(str(e)) from None
    return False


def read_job_record(folder: Path) -> dict[str, Any]:
    """job.json, checked for the keys readers of a folder rely on."""
    path = folder / JOB_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise OutputFolderError(f"{folder} is not a batchllm output folder (no {JOB_FILE})") from None
    except NotADirectoryError:
        raise OutputFolderError(f"{folder} is not a folder") from None
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
    files: list[Path] = field(default_factory=list)
    next_chunk: int = 0
    complete: bool = False


@dataclass(slots=True)
class Committed:
    units: dict[int, UnitState]
    corrupt: list[str]  # "<chunk name>: <why>" for each chunk set aside as corrupt

    def rows_done(self, units: list[WorkUnit]) -> int:
        return sum(u.num_rows if self.units[u.index].complete else len(self.units[u.index].done_rows)
                   for u in units)


def _chunk_problem(path: Path, unit: WorkUnit, seen: set[int],
                   content: str | None) -> tuple[str | None, list[int]]:
    """Why a chunk cannot be trusted (None if it can), and its input rows. `content`: the digest
    of the input its rows must have been read from (None: not known, not checked)."""
    try:
        table = read_arrow(path, ["input_row"])
        table.validate(full=True)
        rows = table.column(0).to_pylist()
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


def scan_committed(folder: Path, units: list[WorkUnit]) -> Committed:
    """Read chunk names and their `input_row` column; set corrupt chunks aside (renamed
    `*.corrupt-<pid>`, never read again) so that their rows are redone. A chunk is corrupt when it
    is unreadable, holds rows outside its unit or already committed, or was read from an input
    whose content digest is not the one job.json records."""
    states = {u.index: UnitState() for u in units}
    corrupt: list[str] = []
    contents = _recorded_contents(folder)
    chunk_dir = folder / CHUNKS
    for path in sorted(chunk_dir.glob("*.arrow")) if chunk_dir.exists() else []:
        parsed = parse_chunk_name(path.name)
        if parsed is None or parsed[0] not in states:
            continue
        unit, chunk, last = parsed
        st = states[unit]
        why, rows = _chunk_problem(path, units[unit], st.done_rows,
                                   contents.get(units[unit].shard))
        if why is not None:
            corrupt.append(f"{path.name}: {why}")
            aside = path.with_name(f"{path.name}.corrupt-{os.getpid()}")
            try:
                path.rename(aside)
            except OSError as e:
                raise OutputFolderError(f"chunk {path} is corrupt ({why}) and cannot be set aside: "
                                        f"{e.strerror or e}; move it away and rerun") from None
            continue
        st.files.append(path)
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


def _recorded_contents(folder: Path) -> dict[int, str]:
    """Shard index -> the content digest job.json records for it (the job's truth)."""
    try:
        inputs = json.loads((folder / JOB_FILE).read_text())["details"]["inputs"]
        return {i: s["content"] for i, s in enumerate(inputs) if s.get("content")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


class FolderLock:
    """An exclusive fcntl.flock on output.path/.lock: a second run on the folder is refused.

    The kernel drops a flock when its holder dies, so a lock file left by a killed run is stale
    by construction: the next run takes it (and reports that it did). Entering also removes the
    temporary files of interrupted writes; `removed` lists them.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd: int | None = None
        self.removed: list[Path] = []
        self.stale_pid: int | None = None  # the pid a stale lock file named, if any

    def __enter__(self) -> "FolderLock":
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputFolderError(f"cannot use output folder {self.folder}: {e.strerror or e} "
                                    "(check that it is writable, or choose another output.path)"
                                    ) from None
        holder = _read_pid(self._fd)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            self._fd = None
            who = f" (pid {holder})" if holder else ""
            raise OutputFolderError(f"output folder {self.folder} is in use by another batchllm "
                                    f"run{who}: its lock {self.folder / LOCK} is held; wait for "
                                    "that run to finish or stop it first") from None
        if holder and holder != os.getpid():
            self.stale_pid = holder
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, str(os.getpid()).encode(), 0)
        except OSError:
            pass  # the pid is only informative (e.g. the disk is full); the flock is what counts
        for sub in (self.folder, self.folder / CHUNKS, self.folder / FINAL):
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
