"""The messages between an executor's driver and its engine replicas (picklable dataclasses).

    replica ─► driver: WantUnit(block), UnitDone(unit), Progress(figures),
                       Finished(figures) | Stopped(figures) | Failed(figures, error_class, message)
    driver ─► replica: AssignUnit(unit, state) | NoUnit() | Stop()   (the answer to a WantUnit)

A replica asks for a unit whenever its rows run out; `block` is False while it still has rows in
flight (it only prefetches and takes NoUnit for an answer), True when it is idle and would rather
wait. `figures` are the replica's own RunFigures so far; the last of a replica's messages is one
of Finished, Stopped or Failed, unless it died.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from batchllm.jobs.checkpoint import UnitState
from batchllm.jobs.executor import RunFigures


@dataclass(frozen=True, slots=True)
class WantUnit:
    """The replica's rows ran out (block=False: it still has rows in flight, just prefetching)."""

    block: bool


@dataclass(frozen=True, slots=True)
class UnitDone:
    """The unit's last chunk is committed."""

    unit: int


@dataclass(frozen=True, slots=True)
class Progress:
    figures: RunFigures


@dataclass(frozen=True, slots=True)
class Finished:
    """Told to stop with no work left; every unit it was given is complete."""

    figures: RunFigures


@dataclass(frozen=True, slots=True)
class Stopped:
    """Stopped by a signal after committing its finished rows."""

    figures: RunFigures


@dataclass(frozen=True, slots=True)
class Failed:
    """Raised `error_class` (a JobError subclass name, or any exception's) with `message`."""

    figures: RunFigures
    error_class: str
    message: str


@dataclass(frozen=True, slots=True)
class AssignUnit:
    """Work on `unit`; `state` is what is committed of it (its rows done, its next chunk)."""

    unit: int
    state: UnitState


@dataclass(frozen=True, slots=True)
class NoUnit:
    """Nothing for a prefetch now; ask again when idle."""


@dataclass(frozen=True, slots=True)
class Stop:
    """No more work (or the job is stopping): finish what is in flight, commit, report, exit."""


ToDriver = Union[WantUnit, UnitDone, Progress, Finished, Stopped, Failed]
ToReplica = Union[AssignUnit, NoUnit, Stop]
