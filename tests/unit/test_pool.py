from hub.config import ProviderConfig
from hub.supervisor.pool import ProviderPool, WorkerHandle, WorkerState
from hub.supervisor.process import backoff, describe_exit
from tests.unit.core_rig import FakeProc


def handle(pool: ProviderPool, n: int, proc: FakeProc) -> WorkerHandle:
    h = WorkerHandle(f"p-{n}", "p", proc, None, started_at=0.0)
    pool.add(h)
    return h


def test_idle_queue_is_least_recently_used_first() -> None:
    proc = FakeProc(pid=1, code=0)
    pool = ProviderPool(ProviderConfig(name="p", type="echo"))
    a, b, c = (handle(pool, n, proc) for n in range(3))
    for t, h in enumerate((b, a, c)):
        pool.set_state(h, WorkerState.IDLE, float(t))
    assert pool.take_idle() is b
    pool.set_state(b, WorkerState.BUSY, 5.0)
    pool.set_state(b, WorkerState.IDLE, 6.0)
    assert [pool.take_idle(), pool.take_idle(), pool.take_idle(), pool.take_idle()] == [a, c, b, None]
    pool.set_state(a, WorkerState.UNHEALTHY, 7.0)
    assert pool.size == 2 and pool.counts()[WorkerState.UNHEALTHY] == 1 and "p-0" not in pool.idle


def test_exit_codes_and_backoff() -> None:
    assert "load its model" in describe_exit(4) and "SIGKILL" in describe_exit(-9)
    assert [backoff(n) for n in (1, 2, 3, 7, 20)] == [1.0, 2.0, 4.0, 60.0, 60.0]


def test_a_replacement_takes_over_the_slot_and_counts_a_restart() -> None:
    proc = FakeProc(pid=1, code=0)
    pool = ProviderPool(ProviderConfig(name="p", type="echo"))
    assert [pool.take_slot(), pool.take_slot()] == [(0, 0), (1, 0)]
    a = WorkerHandle("p-1", "p", proc, None, started_at=0.0, slot=0)
    b = WorkerHandle("p-2", "p", proc, None, started_at=0.0, slot=1)
    pool.add(a)
    pool.add(b)
    pool.set_state(a, WorkerState.UNHEALTHY, 1.0)  # recycled: its slot is free at once, one restart more
    assert pool.take_slot() == (0, 1)
    pool.set_state(b, WorkerState.DRAINING, 1.0)  # retired on purpose: no restart counted
    pool.remove(b)
    assert pool.take_slot() == (1, 0) and pool.take_slot() == (2, 0)
