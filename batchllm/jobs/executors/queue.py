"""UnitQueue: which work unit goes to which engine replica (pure: no I/O, no processes, no clock).

The driver of a multi-replica executor feeds it what the replicas say and sends what it answers:

    want(r, block) ─► AssignUnit(unit, state) | NoUnit() | Stop() | WAIT (answered by wake())
    done(r, unit)      a unit's last chunk is committed
    gone(r, fresh)     replica r ended; the units it held go back to the front of the queue, with
                       `fresh` (what is committed of them, read by the caller from the chunks, the
                       truth) as their state; a held unit found complete counts as done
    stop()             the job is stopping: every want, and every replica waiting, gets Stop
    wake()             answers for the replicas left waiting, once something changed

Units go out in plan order, one holder at a time. Until a replica first asks for work (its engine
is loaded), one unit is kept back for it, so the replica that loads first cannot take every unit
of a short job (or of a job's tail) before the others could start. An idle replica (block=True)
with nothing to take waits rather than stopping while another replica holds a unit, since that
unit comes back if its holder dies.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Union

from batchllm.jobs.checkpoint import UnitState
from batchllm.jobs.executors.messages import AssignUnit, NoUnit, Stop


@dataclass(frozen=True, slots=True)
class Wait:
    """No answer yet: the replica is answered by a later wake()."""


WAIT = Wait()
Answer = Union[AssignUnit, NoUnit, Stop, Wait]


@dataclass(slots=True)
class _Replica:
    holding: set[int] = field(default_factory=set)  # handed out, not complete yet
    completed: list[int] = field(default_factory=list)  # in the order they completed
    asked: bool = False  # has asked for work at least once (its engine is loaded)
    waiting: bool = False  # asked while idle and got no answer yet
    gone: bool = False


class UnitQueue:
    """The work units of one run and the replicas (0 .. replicas - 1) that take them."""

    def __init__(self, todo: Iterable[int], states: Mapping[int, UnitState], replicas: int) -> None:
        """`todo`: the incomplete units, in the order to hand them out; `states`: what is
        committed of each (sent along with the unit)."""
        if replicas < 1:
            raise ValueError(f"a unit queue needs at least one replica, got {replicas}")
        self._pending: deque[int] = deque(todo)
        self._states = {u: states[u] for u in self._pending}
        self._todo = len(self._pending)
        self._done: set[int] = set()
        self._replicas = [_Replica() for _ in range(replicas)]
        self.stopping = False

    # -- what the replicas say ----------------------------------------------------------------

    def want(self, replica: int, block: bool) -> Answer:
        """Replica `replica` ran out of rows; block=False: it still has rows in flight."""
        r = self._live(replica)
        r.asked = True
        if self.stopping:
            return Stop()
        if len(self._pending) > self._reserved(r):
            return self._assign(r)
        if not block:
            return NoUnit()  # a prefetch: the rest is kept for replicas still loading
        if self.finished:
            return Stop()
        r.waiting = True  # a unit may yet come: from a loading replica that dies, or a holder
        return WAIT

    def done(self, replica: int, unit: int) -> None:
        """The replica committed the last chunk of `unit`."""
        r = self._live(replica)
        assert unit in r.holding, f"replica {replica} reported unit {unit} done but does not hold it"
        r.holding.discard(unit)
        r.completed.append(unit)
        self._done.add(unit)

    def gone(self, replica: int, fresh: Mapping[int, UnitState]) -> list[int]:
        """Replica `replica` ended. Its held units (each must be in `fresh`) are done if `fresh`
        says so, else back at the front of the queue in plan order; returns the latter."""
        r = self._replicas[replica]
        if r.gone:
            return []
        r.gone, r.waiting = True, False
        back = []
        for unit in sorted(r.holding):
            self._states[unit] = fresh[unit]
            if fresh[unit].complete:
                r.completed.append(unit)
                self._done.add(unit)
            else:
                back.append(unit)
        r.holding.clear()
        self._pending.extendleft(reversed(back))
        return back

    def stop(self) -> None:
        """Hand out nothing more; waiting replicas get Stop from the next wake()."""
        self.stopping = True

    def wake(self) -> list[tuple[int, AssignUnit | Stop]]:
        """Answers for waiting replicas that can now be answered, in replica order."""
        answers: list[tuple[int, AssignUnit | Stop]] = []
        for i, r in enumerate(self._replicas):
            if not r.waiting or r.gone:
                continue
            if not self.stopping and len(self._pending) > self._reserved(r):
                r.waiting = False
                answers.append((i, self._assign(r)))
            elif self.stopping or self.finished:
                r.waiting = False
                answers.append((i, Stop()))
        return answers

    # -- what the driver reads ----------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """Every unit of the run is complete."""
        return len(self._done) >= self._todo

    @property
    def left(self) -> int:
        """Units not complete yet (queued or held)."""
        return self._todo - len(self._done)

    @property
    def all_gone(self) -> bool:
        return all(r.gone for r in self._replicas)

    def holding(self, replica: int) -> list[int]:
        return sorted(self._replicas[replica].holding)

    def completed(self, replica: int) -> list[int]:
        return list(self._replicas[replica].completed)

    def pending(self) -> list[int]:
        """Units waiting to be handed out, in the order they will go."""
        return list(self._pending)

    # -- inside -------------------------------------------------------------------------------

    def _live(self, replica: int) -> _Replica:
        r = self._replicas[replica]
        assert not r.gone, f"replica {replica} spoke after it was reported gone"
        return r

    def _reserved(self, r: _Replica) -> int:
        """Units kept back for the other live replicas still loading their engines: one each."""
        return sum(1 for x in self._replicas if x is not r and not x.asked and not x.gone)

    def _assign(self, r: _Replica) -> AssignUnit:
        unit = self._pending.popleft()
        r.holding.add(unit)
        return AssignUnit(unit, self._states[unit])
