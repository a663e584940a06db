"""The scheduling decisions for live sessions, without processes: where a session or a one-shot job goes,
whose turn it is inside a worker, and how sessions size the pool."""

from __future__ import annotations

import pytest

from hub.config import SINGLE_INSTANCE, PoolConfig
from hub.supervisor.assignment import (
    ONE_SHOT_DUTY,
    WorkerLoad,
    one_shot_home,
    session_home,
)
from hub.supervisor.scaling import PoolSnapshot, decide, floor_size
from workers.turns import JOB, next_turn

pytestmark = pytest.mark.timeout(30)


def test_a_session_goes_to_the_least_loaded_worker_with_room() -> None:
    workers = [WorkerLoad("a", 2, 0, 0.4), WorkerLoad("b", 1, 1, 0.1), WorkerLoad("c", 1, 0, 0.3)]
    assert session_home(workers, 4) == "b"  # the lowest measured duty (issue 27), not the fewest sessions
    workers = [WorkerLoad("a", 1, 1, 0.2), WorkerLoad("b", 2, 0, 0.2), WorkerLoad("c", 1, 0, 0.2)]
    assert session_home(workers, 4) == "c"  # equal duty: the one without a job, then the fewest sessions
    assert session_home([WorkerLoad("a", 1, 0, 0.9), WorkerLoad("b", 1, 0, 0.2)], 4) == "b"
    assert session_home([WorkerLoad("a", 4, 0, 0.0), WorkerLoad("b", 3, 0, 0.9)], 4) == "b"
    assert session_home([WorkerLoad("a", 4, 0, 0.0)], 4) is None and session_home([], 4) is None


def test_a_one_shot_job_takes_a_session_worker_only_when_it_has_time() -> None:
    pool = PoolConfig()
    busy = WorkerLoad("a", 3, 0, ONE_SHOT_DUTY + 0.1)
    calm = WorkerLoad("b", 1, 0, 0.2)
    calmer_but_busy = WorkerLoad("c", 1, 1, 0.0)
    assert one_shot_home([busy, calm, calmer_but_busy], pool) == "b"
    assert one_shot_home([busy, calmer_but_busy], pool) is None
    assert one_shot_home([WorkerLoad("d", 0, 0, 0.0)], pool) is None  # free workers come from the idle queue
    assert one_shot_home([calm], SINGLE_INSTANCE) is None  # rollback: one worker, one job at a time


def test_the_oldest_due_session_decodes_first_and_jobs_wait_their_turn() -> None:
    assert next_turn({}, None) is None
    assert next_turn({"s1": 5.0, "s2": 3.0}, None) == "s2"
    assert next_turn({"s1": 5.0}, 4.0) == JOB
    assert next_turn({"s1": 4.0}, 4.0) == "s1"  # a tie goes to the listener waiting in real time


def test_no_session_waits_for_more_than_one_decode_of_each_other() -> None:
    """The worst case: a worker so loaded that every session is due again as soon as it was decoded, one of
    them ten times slower than the others, and a stream of one-shot jobs. Simulated through ``next_turn``:
    between two decodes of a session, each other session (and the job queue) gets at most one turn."""
    cost = {"slow": 1.0, "a": 0.1, "b": 0.1, JOB: 0.5}
    due = {"slow": 0.0, "a": 0.01, "b": 0.02}
    job_since: float | None = 0.005
    now, order = 0.0, []
    while now < 60:
        turn = next_turn(due, job_since)
        assert turn is not None
        order.append(turn)
        now += cost[turn]
        if turn == JOB:
            job_since = now  # the next job arrived meanwhile
        else:
            due[turn] = now
    for name in cost:
        at = [i for i, t in enumerate(order) if t == name]
        assert len(at) > 10, f"{name!r} starved"
        for first, second in zip(at, at[1:], strict=False):
            between = order[first + 1 : second]
            assert all(between.count(other) <= 1 for other in cost), (name, between)


def test_sessions_keep_the_workers_their_load_needs_plus_one() -> None:
    pool = PoolConfig(min_size=1, max_size=4, sessions_per_worker=4)
    assert floor_size(PoolSnapshot(live=1, starting=0, queued=0), pool) == 1
    assert floor_size(PoolSnapshot(live=1, starting=0, queued=0, sessions=1), pool) == 2
    assert floor_size(PoolSnapshot(live=2, starting=0, queued=0, sessions=5), pool) == 3
    assert floor_size(PoolSnapshot(live=4, starting=0, queued=0, sessions=16), pool) == 4  # never past max_size
    grown = decide(PoolSnapshot(live=1, starting=0, queued=0, sessions=4), pool, now=0.0)
    assert grown.spawn == 1
    kept = decide(PoolSnapshot(live=2, starting=0, queued=0, sessions=1, idle_since=(("w2", 0.0),)), pool, now=1e6)
    assert kept.retire == ()  # the free worker beside the sessions stays, however long idle


def test_with_batching_a_job_joins_the_busy_worker_holding_the_fewest_jobs() -> None:
    pool = PoolConfig(max_batch=4)
    two, one, full = WorkerLoad("two", 0, 2, 0.0), WorkerLoad("one", 0, 1, 0.0), WorkerLoad("full", 0, 4, 0.0)
    assert one_shot_home([two, one, full], pool) == "one"  # by load: the batch that starts soonest
    assert one_shot_home([two, full], pool) == "two"
    assert one_shot_home([full], pool) is None  # B jobs held: not free
    assert one_shot_home([two, WorkerLoad("tie", 0, 2, 0.0)], pool) == "two"  # a tie keeps the pool's order
    session_worker = WorkerLoad("s", 1, 0, 0.1)
    assert one_shot_home([session_worker, WorkerLoad("three", 0, 3, 0.0)], pool) == "three"  # session-free first
    assert one_shot_home([session_worker], pool) == "s"
    assert one_shot_home([WorkerLoad("s", 1, 1, ONE_SHOT_DUTY + 0.1)], pool) is None  # its sessions need the time
    assert one_shot_home([one], PoolConfig(max_batch=1)) is None  # max_batch 1: one job per worker, as before
