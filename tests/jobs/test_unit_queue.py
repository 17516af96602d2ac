"""UnitQueue: exact assignments, the reserve-one-unit-per-loading-replica rule, requeue of a dead
replica's units with their fresh committed state, and when replicas are told to stop."""
from __future__ import annotations

import pytest

from batchllm.jobs.checkpoint import UnitState
from batchllm.jobs.executors.messages import AssignUnit, NoUnit, Stop
from batchllm.jobs.executors.queue import WAIT, UnitQueue


def states(*units: int) -> dict[int, UnitState]:
    return {u: UnitState(next_chunk=u) for u in units}  # next_chunk tells the states apart


def queue(units: int, replicas: int) -> UnitQueue:
    return UnitQueue(range(units), states(*range(units)), replicas)


def unit(answer: object) -> int:
    assert isinstance(answer, AssignUnit), answer
    return answer.unit


def test_units_go_out_in_plan_order_with_their_committed_state() -> None:
    s = states(0, 1, 2, 3)
    s[2] = UnitState(done_rows={10, 11}, next_chunk=1)
    q = UnitQueue([1, 2, 3], s, replicas=1)  # unit 0 is complete: not in todo
    first = q.want(0, block=True)
    assert first == AssignUnit(1, s[1])
    assert q.want(0, block=False) == AssignUnit(2, s[2])  # a prefetch takes a unit when free
    assert q.holding(0) == [1, 2] and q.pending() == [3]
    assert q.left == 3 and not q.finished


def test_one_unit_is_kept_back_for_each_replica_still_loading() -> None:
    q = queue(3, replicas=3)
    assert unit(q.want(0, block=True)) == 0  # 3 pending, 2 kept back for replicas 1 and 2
    assert q.want(0, block=False) == NoUnit()  # prefetch: the other two are reserved
    assert q.want(0, block=True) is WAIT  # idle: waits rather than taking a reserved unit
    assert q.wake() == []
    assert unit(q.want(1, block=True)) == 1  # replica 2 still loading: one kept back
    assert q.wake() == []  # the last unit is still replica 2's
    assert unit(q.want(2, block=True)) == 2
    assert q.wake() == []  # replica 0 keeps waiting: units are held by live replicas
    assert [q.holding(r) for r in range(3)] == [[0], [1], [2]]


def test_a_replica_that_dies_while_loading_frees_its_reserved_unit() -> None:
    q = queue(1, replicas=2)
    assert q.want(0, block=True) is WAIT  # the one unit is kept for replica 1
    assert q.gone(1, {}) == []
    assert q.wake() == [(0, AssignUnit(0, states(0)[0]))]
    assert q.wake() == []  # answered once


def test_replicas_stop_once_every_unit_is_done() -> None:
    q = queue(2, replicas=1)
    assert unit(q.want(0, block=True)) == 0
    assert unit(q.want(0, block=False)) == 1
    q.done(0, 0)
    assert q.want(0, block=False) == NoUnit() and not q.finished
    q.done(0, 1)
    assert q.finished and q.left == 0
    assert q.want(0, block=True) == Stop()
    assert q.completed(0) == [0, 1]


def test_an_idle_replica_waits_while_another_holds_a_unit_then_stops() -> None:
    q = queue(2, replicas=2)
    assert unit(q.want(0, block=True)) == 0  # one pending beyond replica 1's reservation
    assert unit(q.want(1, block=True)) == 1
    q.done(1, 1)
    assert q.want(1, block=True) is WAIT  # unit 0 comes back if replica 0 dies
    assert q.wake() == []
    q.done(0, 0)
    assert q.wake() == [(1, Stop())]
    assert q.want(0, block=True) == Stop()


def test_a_waiting_replica_takes_the_unit_of_a_replica_that_died() -> None:
    q = queue(2, replicas=2)
    assert unit(q.want(0, block=True)) == 0
    assert unit(q.want(1, block=True)) == 1
    q.done(1, 1)
    assert q.want(1, block=True) is WAIT
    fresh = UnitState(done_rows={0, 1, 2}, next_chunk=2)
    assert q.gone(0, {0: fresh}) == [0]
    assert q.wake() == [(1, AssignUnit(0, fresh))]  # resumed from what is committed
    q.done(1, 0)
    assert q.finished and q.completed(1) == [1, 0] and q.completed(0) == []


def test_a_replica_dying_while_holding_two_units_requeues_the_unfinished_one_first() -> None:
    q = queue(5, replicas=2)
    assert unit(q.want(0, block=True)) == 0
    assert unit(q.want(1, block=True)) == 1
    assert unit(q.want(0, block=False)) == 2  # replica 0 prefetched: holds 0 and 2
    assert q.pending() == [3, 4]
    partial = UnitState(done_rows={5}, next_chunk=1)
    complete = UnitState(done_rows=set(range(6)), next_chunk=3, complete=True)
    # The chunks say unit 2 was completed (its UnitDone was lost with the replica), unit 0 not.
    assert q.gone(0, {0: partial, 2: complete}) == [0]
    assert q.pending() == [0, 3, 4]  # ahead of the units never handed out
    assert q.completed(0) == [2] and q.holding(0) == []
    assert q.left == 4  # 0, 1, 3, 4
    assert q.want(1, block=False) == AssignUnit(0, partial)


def test_requeued_units_keep_plan_order_ahead_of_the_rest() -> None:
    q = queue(6, replicas=2)
    assert unit(q.want(0, block=True)) == 0
    assert unit(q.want(1, block=True)) == 1
    assert unit(q.want(0, block=False)) == 2
    assert unit(q.want(1, block=False)) == 3
    assert unit(q.want(1, block=False)) == 4
    q.done(1, 1)
    fresh = states(3, 4)
    assert q.gone(1, fresh) == [3, 4]
    assert q.pending() == [3, 4, 5]
    assert [unit(q.want(0, block=False)) for _ in range(3)] == [3, 4, 5]


def test_stopping_hands_out_nothing_and_stops_waiting_replicas() -> None:
    q = queue(3, replicas=2)
    assert unit(q.want(0, block=True)) == 0
    assert unit(q.want(0, block=False)) == 1
    assert q.want(1, block=True) == AssignUnit(2, states(2)[2])
    q.done(0, 0)
    q.done(1, 2)
    assert q.want(1, block=True) is WAIT  # unit 1 is still held by replica 0
    q.stop()
    assert q.wake() == [(1, Stop())]
    assert q.want(0, block=False) == Stop()  # even a prefetch is told to stop
    assert q.stopping and not q.finished and q.left == 1


def test_stop_before_any_unit_goes_out_answers_stop_with_work_pending() -> None:
    q = queue(4, replicas=2)
    q.stop()
    assert q.want(0, block=True) == Stop() and q.want(1, block=False) == Stop()
    assert q.pending() == [0, 1, 2, 3]


def test_every_replica_gone_with_work_left() -> None:
    q = queue(3, replicas=2)
    assert unit(q.want(0, block=True)) == 0
    assert unit(q.want(1, block=True)) == 1
    q.done(1, 1)
    assert not q.all_gone
    assert q.gone(1, {}) == []
    assert q.gone(0, states(0)) == [0]
    assert q.all_gone and not q.finished and q.left == 2
    assert q.pending() == [0, 2]
    assert q.wake() == []
    assert q.gone(0, {}) == []  # reported twice: nothing changes


def test_a_gone_replica_is_never_answered_again() -> None:
    q = queue(2, replicas=2)
    assert unit(q.want(0, block=True)) == 0
    assert unit(q.want(1, block=True)) == 1
    q.done(1, 1)
    assert q.want(1, block=True) is WAIT
    assert q.gone(1, {}) == []
    q.done(0, 0)
    assert q.wake() == []  # replica 1 was waiting but is gone
    assert q.finished


def test_a_queue_needs_a_replica() -> None:
    with pytest.raises(ValueError, match="at least one replica"):
        UnitQueue([0], states(0), replicas=0)
