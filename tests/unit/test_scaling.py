from hub.config import PoolConfig
from hub.supervisor.scaling import PoolSnapshot, decide

POOL = PoolConfig(min_size=1, max_size=4, idle_timeout=60.0)


def snap(live: int, starting: int = 0, queued: int = 0, idle: tuple = ()) -> PoolSnapshot:
    return PoolSnapshot(live=live, starting=starting, queued=queued, idle_since=idle)


def test_starts_min_size_from_nothing() -> None:
    assert decide(snap(0), POOL, now=0.0).spawn == 1


def test_grows_while_jobs_wait_but_counts_workers_already_starting() -> None:
    assert decide(snap(1, queued=2), POOL, 0.0).spawn == 2
    assert decide(snap(3, starting=2, queued=2), POOL, 0.0).spawn == 0
    assert decide(snap(2, starting=1, queued=2), POOL, 0.0).spawn == 1


def test_never_above_max_size_and_says_why() -> None:
    d = decide(snap(4, queued=10), POOL, 0.0)
    assert d.spawn == 0 and "max_size (4)" in d.held_back
    d = decide(snap(3, queued=10), POOL, 0.0)
    assert d.spawn == 1 and d.held_back
    assert decide(snap(1, queued=0), POOL, 0.0).held_back == ""


def test_retires_only_workers_idle_past_the_timeout_down_to_min() -> None:
    idle = (("w1", 0.0), ("w2", 30.0), ("w3", 50.0))
    assert decide(snap(3, idle=idle), POOL, now=59.0).retire == ()
    assert decide(snap(3, idle=idle), POOL, now=60.0).retire == ("w1",)
    assert decide(snap(3, idle=idle), POOL, now=500.0).retire == ("w1", "w2")  # min_size 1 stays


def test_no_retirement_while_jobs_wait() -> None:
    assert decide(snap(3, queued=1, idle=(("w1", 0.0),)), POOL, now=500.0).retire == ()


def test_size_set_at_run_time_is_the_floor_within_min_and_max() -> None:
    assert decide(PoolSnapshot(live=1, starting=0, queued=0, floor=3), POOL, 0.0).spawn == 2
    assert decide(PoolSnapshot(live=1, starting=0, queued=0, floor=9), POOL, 0.0).spawn == 3  # clamped to max 4
    idle = (("w1", 0.0), ("w2", 0.0), ("w3", 0.0))
    assert decide(PoolSnapshot(live=3, starting=0, queued=0, idle_since=idle, floor=2), POOL, 500.0).retire == ("w1",)


def test_idle_workers_above_a_lowered_max_size_retire_at_once() -> None:
    idle = (("w1", 99.0), ("w2", 99.0), ("w3", 99.0))
    small = PoolConfig(min_size=1, max_size=1, idle_timeout=60.0)
    assert decide(PoolSnapshot(live=3, starting=0, queued=0, idle_since=idle), small, 100.0).retire == ("w1", "w2")


def test_memory_cap_holds_growth_back_and_says_why() -> None:
    capped = PoolConfig(min_size=1, max_size=4, max_memory_mb=500.0)
    d = decide(PoolSnapshot(live=2, starting=0, queued=5, memory_mb=400.0, worker_mb=180.0), capped, 0.0)
    assert d.spawn == 0 and "memory cap" in d.held_back and "max_memory_mb=500" in d.held_back
    d = decide(PoolSnapshot(live=1, starting=0, queued=5, memory_mb=180.0, worker_mb=180.0), capped, 0.0)
    assert d.spawn == 1 and "memory cap" in d.held_back
    # the memory is not known before the first worker runs: min_size is always honoured
    assert decide(PoolSnapshot(live=0, starting=0, queued=0), capped, 0.0).spawn == 1
