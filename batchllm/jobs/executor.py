"""The streaming loop: rows in with backpressure, finished rows out, committed in atomic chunks.

    read rows ─► prepare ─► engine.add_request   (while in flight < ~3 × max_num_seqs)
    engine.step() ─► output rows ─► unit buffers ─► chunk files (every chunk_rows rows, every
                                                   commit_interval_s, and when a unit completes)

Input rows arrive already checked against the bytes the job was planned with (the reader checks
each block before its rows leave it); a Parquet file touched during the run has the row groups
of a chunk's rows checked again before the chunk is committed. Either way a changed input stops
the run with nothing read from the new version committed, and each chunk records the content
digest of the input its rows came from.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa

from batchllm.core.outputs import RequestOutput
from batchllm.io.digests import InputChanged
from batchllm.io.readers import InputRow, Shard, check_shard_unchanged, iter_rows
from batchllm.io.schema import rows_to_table
from batchllm.io.storage import Storage, open_storage
from batchllm.io.writers import WriteFailed
from batchllm.jobs.checkpoint import CHUNKS, Committed, chunk_metadata
from batchllm.jobs.engine_api import EngineLike
from batchllm.jobs.errors import EngineFailed, JobInputError, JobInterrupted, OutputWriteError
from batchllm.jobs.plan import WorkUnit, chunk_name
from batchllm.jobs.preprocess import Prepared, Preprocessor
from batchllm.jobs.records import output_rows

IN_FLIGHT_PER_SEQ = 3  # requests kept in the engine per max_num_seqs slot


@dataclass(slots=True)
class StopSignal:
    """Set by a signal handler (or a test); the loop stops admitting and commits what is done."""

    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None


@dataclass(slots=True)
class RunFigures:
    """What this run did (committed totals come from the chunk files, see summary.py)."""

    rows: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    elapsed_s: float = 0.0
    engine_stats: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _OpenUnit:
    unit: WorkUnit
    pending: int  # rows neither committed nor buffered yet
    next_chunk: int
    buffer: list[dict[str, Any]] = field(default_factory=list)
    buffered_rows: int = 0
    last_commit: float = field(default_factory=time.monotonic)


class JobExecutor:
    def __init__(self, *, shards: list[Shard], units: list[WorkUnit], committed: Committed,
                 engine: EngineLike, prep: Preprocessor, schema: pa.Schema,
                 folder: "Storage | Path", chunk_rows: int, commit_interval_s: float, max_num_seqs: int,
                 stop: StopSignal | None = None,
                 on_progress: Callable[[RunFigures, int], None] | None = None,
                 unit_source: Callable[[], int | None] | None = None,
                 on_unit_complete: Callable[[int], None] | None = None) -> None:
        """`unit_source` (data-parallel workers): called whenever the rows run out, it returns the
        next unit to work on (its committed state already in `committed.units`) or None when
        there is none; without it every incomplete unit of `units` is worked on, in order.
        `on_unit_complete(unit)` is called once a unit's last chunk is committed."""
        self.shards, self.units, self.committed = shards, units, committed
        self.engine, self.prep, self.schema = engine, prep, schema
        self.storage = open_storage(folder)  # a folder, or an object-store prefix
        self.chunk_rows, self.commit_interval_s = chunk_rows, commit_interval_s
        self.max_in_flight = max(1, IN_FLIGHT_PER_SEQ * max_num_seqs)
        self.stop = stop or StopSignal()
        self.on_progress = on_progress or (lambda figures, in_flight: None)
        self.unit_source = unit_source
        self.on_unit_complete = on_unit_complete or (lambda unit: None)
        self.samples = prep.base_params.n > 1
        self.top_logprobs = bool(prep.base_params.logprobs)
        self.open: dict[int, _OpenUnit] = {}
        self.in_flight: dict[str, Prepared] = {}
        self.figures = RunFigures()

    def run(self) -> RunFigures:
        start = time.monotonic()
        rows = self._pending_rows()
        exhausted = False
        try:
            while True:
                if self.stop.requested:
                    self._interrupt()
                admitted = 0
                while not exhausted and len(self.in_flight) < self.max_in_flight \
                        and admitted < self.max_in_flight:
                    item = next(rows, None)
                    if item is None:
                        exhausted = True
                        break
                    self._admit(*item)
                    admitted += 1
                busy = self.engine.has_unfinished_requests()
                if not busy and self.in_flight:
                    raise RuntimeError(f"the engine reports no unfinished requests, but "
                                       f"{len(self.in_flight)} are in flight")
                if busy:
                    for out in self._step():
                        self._finish(self.in_flight.pop(out.request_id), out)
                self._commit_due()
                self.figures.elapsed_s = time.monotonic() - start
                self.on_progress(self.figures, len(self.in_flight))
                if exhausted and not busy and not self.in_flight:
                    break
        except (JobInterrupted, OutputWriteError):
            self._abort_in_flight()
            raise
        except InputChanged as e:  # nothing more is committed: finished rows are redone later
            self._abort_in_flight()
            raise JobInputError(str(e)) from None
        except BaseException:
            self._abort_in_flight()
            self._commit_all()  # keep what is finished, then let the failure through
            raise
        finally:
            self.figures.elapsed_s = time.monotonic() - start
            try:
                self.figures.engine_stats = dict(self.engine.stats())
            except Exception:
                pass  # a broken engine's figures are not worth hiding the real error
        if self.open:
            short = ", ".join(f"unit {u}: {ou.pending} row(s)" for u, ou in sorted(self.open.items()))
            raise JobInputError(f"the input had fewer rows than planned ({short} never read); an "
                                "input shard changed during the run. Rerun to see which.")
        return self.figures

    def _step(self) -> list[RequestOutput]:
        try:
            return self.engine.step()
        except Exception as e:
            raise EngineFailed(f"the engine failed during a step with {len(self.in_flight)} "
                               f"request(s) in flight: {type(e).__name__}: {e}") from e

    def _abort_in_flight(self) -> None:
        for rid in list(self.in_flight):
            try:
                self.engine.abort_request(rid)
            except Exception:
                pass  # leaving: an engine that cannot abort is not reused by this run
        self.in_flight.clear()

    def _pending_rows(self) -> Iterator[tuple[int, InputRow]]:
        """(unit index, row) for every row not committed yet, in plan order, one pass per shard."""
        if self.unit_source is not None:
            yield from self._fed_rows(self.unit_source)
            return
        todo = [u for u in self.units if not self.committed.units[u.index].complete]
        i = 0
        while i < len(todo):
            shard = todo[i].shard
            group = [u for u in todo[i:] if u.shard == shard]
            i += len(group)
            by_row = iter(group)
            unit = next(by_row)
            for r in iter_rows(self.shards[shard], start=group[0].start):
                while r.row >= unit.stop:
                    unit = next(by_row, None)
                    if unit is None:
                        break
                if unit is None:
                    break
                if r.row < unit.start or r.row in self.committed.units[unit.index].done_rows:
                    continue
                yield unit.index, r

    def _fed_rows(self, source: Callable[[], int | None]) -> Iterator[tuple[int, InputRow]]:
        """Rows of the units `source` hands out, one unit at a time. A reader stays open while the
        next unit lies further on in the same shard (a worker's units mostly ascend)."""
        reader: Iterator[InputRow] = iter(())
        shard, ahead = -1, None  # the reader's shard and its next row (None: exhausted)
        while (index := source()) is not None:
            unit = self.units[index]
            done = self.committed.units[index].done_rows
            if shard != unit.shard or ahead is None or ahead.row > unit.start:
                reader, shard = iter_rows(self.shards[unit.shard], start=unit.start), unit.shard
                ahead = next(reader, None)
            expected, given = unit.num_rows - len(done), 0
            while ahead is not None and ahead.row < unit.stop:
                r, ahead = ahead, next(reader, None)
                if r.row >= unit.start and r.row not in done:
                    given += 1
                    yield index, r
            if given < expected:
                raise JobInputError(f"the input had fewer rows than planned (unit {index}: "
                                    f"{expected - given} row(s) never read); an input shard "
                                    "changed during the run. Rerun to see which.")

    def _open(self, unit_index: int) -> _OpenUnit:
        ou = self.open.get(unit_index)
        if ou is None:
            unit = self.units[unit_index]
            st = self.committed.units[unit_index]
            ou = _OpenUnit(unit, unit.num_rows - len(st.done_rows), st.next_chunk)
            self.open[unit_index] = ou
        return ou

    def _admit(self, unit_index: int, row: InputRow) -> None:
        self._open(unit_index)
        p = self.prep.prepare(unit_index, row)
        if p.settled:
            self._finish(p, None)
            return
        try:
            self.engine.add_request(p.request_id, p.prompt_ids, p.params)
        except (ValueError, TypeError) as e:  # the engine refused this row: an error row
            p.error = f"{p.where}: the engine refused the request: {e}"
            self._finish(p, None)
            return
        self.in_flight[p.request_id] = p

    def _finish(self, p: Prepared, out: RequestOutput | None) -> None:
        ou = self.open[p.unit]
        rows = output_rows(p, out, samples=self.samples, top_logprobs=self.top_logprobs)
        ou.buffer.extend(rows)
        ou.buffered_rows += 1
        ou.pending -= 1
        f = self.figures
        f.rows += 1
        f.errors += any(r.get("error") for r in rows)
        f.prompt_tokens += rows[0].get("num_prompt_tokens") or 0
        f.output_tokens += sum(r.get("num_output_tokens") or 0 for r in rows)

    def _commit_due(self) -> None:
        now = time.monotonic()
        for ou in list(self.open.values()):
            if ou.pending == 0:
                self._commit(ou, last=True)
            elif ou.buffered_rows >= self.chunk_rows or (
                    ou.buffer and now - ou.last_commit >= self.commit_interval_s):
                self._commit(ou, last=False)

    def _commit(self, ou: _OpenUnit, last: bool) -> None:
        rows = sorted(ou.buffer, key=lambda r: (r["input_row"], r.get("sample_index") or 0))
        shard = self.shards[ou.unit.shard]
        check_shard_unchanged(shard)
        table = rows_to_table(rows, self.schema).replace_schema_metadata(chunk_metadata(shard))
        name = f"{CHUNKS}/{chunk_name(ou.unit.index, ou.next_chunk, last)}"
        try:
            self.storage.write_arrow(name, table)  # atomic: whole, or not there
        except WriteFailed as e:
            raise OutputWriteError(f"{e.strerror or e} (rows committed so far are intact)") from None
        ou.next_chunk += 1
        ou.buffer, ou.buffered_rows, ou.last_commit = [], 0, time.monotonic()
        if last:
            del self.open[ou.unit.index]
            self.on_unit_complete(ou.unit.index)

    def _commit_all(self) -> None:
        for ou in list(self.open.values()):
            if ou.buffer or ou.pending == 0:
                try:
                    self._commit(ou, last=ou.pending == 0)
                except (OutputWriteError, InputChanged):
                    return  # what is committed stays; the rest is redone by the next run

    def _interrupt(self) -> None:
        self._abort_in_flight()
        self._commit_all()
        signum = self.stop.signum or 2
        raise JobInterrupted(f"stopped by signal {signum}; finished rows are committed. Rerun the "
                             "same command to resume.", signum)

