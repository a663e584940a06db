"""The supervisor core on a fake clock, with no process and no socket: LRU placement, POOL_BUSY, ACQUIRE_TIMEOUT,
retries after a crash, deadlines, health checks, scaling, and live sessions' placement and resume. The same paths
with real processes are in tests/integration (test_farm.py, test_sessions.py, test_resume.py)."""

from __future__ import annotations

import pytest

from hub.protocol import MsgType
from hub.supervisor.jobs import JobKind
from hub.supervisor.pool import WorkerState
from tests.unit.core_rig import Rig


def echo(**pool: object) -> dict[str, object]:
    return {"type": "echo", "pool": {"min_size": 1, "max_size": 2, **pool}}


def test_workers_start_and_get_ready() -> None:
    rig = Rig({"echo": echo(min_size=2, max_size=3)})
    assert rig.start() == ["echo-1", "echo-2"]
    assert all(rig.state(w) is WorkerState.IDLE for w in ("echo-1", "echo-2"))
    assert rig.workforce.ready and rig.workforce.sizes == {"echo": 2}


def test_jobs_go_to_the_least_recently_used_idle_worker() -> None:
    rig = Rig({"echo": echo(min_size=3, max_size=3)})
    rig.start()
    order = []
    for _ in range(6):
        request = rig.transcribe()
        order.append(rig.job_of(request)[0])
        rig.finish(request)
    assert order == ["echo-1", "echo-2", "echo-3", "echo-1", "echo-2", "echo-3"]
    assert [rig.answers(f"r{i}")[-1][0] for i in range(1, 7)] == [MsgType.RESULT] * 6


def test_pool_busy_when_the_queue_is_full_and_the_queue_drains_in_order() -> None:
    rig = Rig({"echo": echo(min_size=1, max_size=1, max_queue=2)})
    rig.start()
    running, first, second, refused = (rig.transcribe() for _ in range(4))
    assert rig.error_of(refused) == "POOL_BUSY"
    assert rig.farm.jobs.queued("echo") == 2
    rig.finish(running)
    assert rig.job_of(first)[0] == "echo-1" and rig.farm.jobs.queued("echo") == 1
    rig.finish(first)
    rig.finish(second)
    assert [rig.error_of(r) for r in (running, first, second)] == [None, None, None]


def test_a_queued_job_fails_with_acquire_timeout_after_its_wait() -> None:
    rig = Rig({"echo": echo(min_size=1, max_size=1, acquire_timeout=5)})
    rig.start()
    rig.transcribe()
    waiting = rig.transcribe()
    rig.tick(4.9)
    assert rig.error_of(waiting) is None
    rig.tick(0.2)
    assert rig.error_of(waiting) == "ACQUIRE_TIMEOUT"
    assert "no echo worker became free within 5.1 s" in rig.answers(waiting)[-1][1]["message"]


def test_the_clients_timeout_bounds_the_queue_wait() -> None:
    rig = Rig({"echo": echo(min_size=1, max_size=1, acquire_timeout=30)})
    rig.start()
    rig.transcribe()
    waiting = rig.transcribe(timeout=2.0)
    rig.tick(2.1)
    assert rig.error_of(waiting) == "ACQUIRE_TIMEOUT"


def test_a_job_on_a_crashed_worker_is_retried_once_then_fails() -> None:
    rig = Rig({"echo": echo(min_size=2, max_size=2, retry_on_crash=1)})
    rig.start()
    request = rig.transcribe()
    first, _ = rig.job_of(request)
    rig.die(first)
    rig.tick()
    second, _ = rig.job_of(request)
    assert second != first and rig.error_of(request) is None
    rig.die(second)
    rig.tick()
    assert rig.error_of(request) == "WORKER_CRASHED"


def test_a_crashed_worker_is_replaced_to_keep_the_floor() -> None:
    rig = Rig({"echo": echo(min_size=2, max_size=2)})
    rig.start()
    rig.die("echo-1")
    rig.tick()
    assert sorted(rig.workforce.pools["echo"].workers) == ["echo-2", "echo-3"]
    assert rig.state("echo-3") is WorkerState.STARTING


def test_a_job_past_its_deadline_fails_and_its_worker_is_recycled_then_killed() -> None:
    rig = Rig({"echo": echo(min_size=1, max_size=1, job_timeout=10, job_timeout_per_audio_second=0)})
    rig.start()
    request = rig.transcribe()
    rig.run(9.9)
    assert rig.error_of(request) is None
    rig.run(0.2, step=0.2)
    assert rig.error_of(request) == "JOB_TIMEOUT"
    assert rig.state("echo-1") is WorkerState.UNHEALTHY
    assert rig.io.procs["echo-1"].signals == ["TERM"]
    rig.tick(3.1)  # KILL_GRACE later, still running: SIGKILL
    assert rig.io.procs["echo-1"].signals == ["TERM", "KILL"]


def test_a_silent_worker_loses_its_job_to_a_retry() -> None:
    rig = Rig({"echo": echo(min_size=2, max_size=2)}, heartbeat_timeout=5)
    rig.start()
    request = rig.transcribe()
    stuck, _ = rig.job_of(request)
    for _ in range(6):  # every worker but the stuck one keeps beating
        rig.t += 1.0
        for worker_id in rig.workforce.pools["echo"].workers:
            if worker_id != stuck:
                rig.from_worker(worker_id + ".hb", MsgType.HEARTBEAT, worker_id, {"busy": 0.0})
        rig.tick()
    assert rig.state(stuck) is WorkerState.UNHEALTHY
    assert rig.job_of(request)[0] != stuck and rig.error_of(request) is None


def test_health_checks_run_on_idle_workers_and_a_failed_one_recycles() -> None:
    rig = Rig({"echo": echo(min_size=2, max_size=2, health_check_interval=10)})
    rig.start()
    rig.run(10.5)
    checks = [
        (w, m)
        for w, m in rig.jobs_sent()
        if rig.farm.jobs.get(m.id) is not None and rig.farm.jobs.get(m.id).kind is JobKind.HEALTH
    ]
    assert {w for w, _ in checks} == {"echo-1", "echo-2"}
    (good, good_msg), (bad, bad_msg) = checks
    rig.from_worker(good, MsgType.RESULT, good_msg.id, {"text": "hello"})
    rig.from_worker(bad, MsgType.RESULT, bad_msg.id, {"text": ""})
    assert rig.state(good) is WorkerState.IDLE
    assert rig.state(bad) is WorkerState.UNHEALTHY


def test_no_health_check_while_jobs_wait() -> None:
    rig = Rig({"echo": echo(min_size=1, max_size=1, health_check_interval=10, acquire_timeout=60)})
    rig.start()
    rig.transcribe()
    rig.transcribe()
    rig.run(11)
    assert not [
        m
        for _, m in rig.jobs_sent()
        if rig.farm.jobs.get(m.id) is not None and rig.farm.jobs.get(m.id).kind is JobKind.HEALTH
    ]


def test_the_pool_grows_while_jobs_wait_and_shrinks_when_idle() -> None:
    rig = Rig({"echo": echo(min_size=1, max_size=3, idle_timeout=20)})
    rig.start()
    for _ in range(4):
        rig.transcribe()
    rig.tick(1)
    assert rig.workforce.pools["echo"].size == 3
    for worker_id in rig.start():
        assert rig.state(worker_id) is WorkerState.BUSY  # each took a queued job at once
    for request in ("r1", "r2", "r3"):
        rig.finish(request)
    rig.finish("r4")
    rig.run(33)
    assert rig.workforce.pools["echo"].size == 1


def test_scale_sets_the_floor_within_bounds() -> None:
    rig = Rig({"echo": echo(min_size=1, max_size=3)})
    rig.start()
    assert rig.workforce.scale("echo", 3, rig.t) == {"provider": "echo", "size": 3}
    rig.tick()
    assert rig.workforce.pools["echo"].size == 3
    with pytest.raises(Exception, match="outside"):
        rig.workforce.scale("echo", 4, rig.t)


def test_sessions_spread_by_load_and_respect_the_limit() -> None:
    rig = Rig({"echo": echo(min_size=2, max_size=2, sessions_per_worker=2, max_sessions=4)})
    rig.start()
    sessions = [rig.open_session() for _ in range(5)]
    homes = [rig.job_of(s)[0] for s in sessions[:4]]
    assert sorted(homes) == ["echo-1", "echo-1", "echo-2", "echo-2"]
    assert rig.error_of(sessions[4]) == "POOL_BUSY"
    opened = [b for t, b in rig.answers(sessions[0]) if t is MsgType.REPLY]
    assert opened and opened[0]["worker"] == homes[0] and opened[0]["resumed"] == 0


def test_a_session_resumes_on_another_worker_from_its_last_final() -> None:
    rig = Rig({"echo": echo(min_size=2, max_size=2, sessions_per_worker=1, retry_on_crash=1)})
    rig.start()
    session = rig.open_session()
    first, job_id = rig.job_of(session)
    rig.stream(session, 2.0)
    rig.from_worker(first, MsgType.SEGMENT, job_id, {"text": "hello", "start": 0.0, "end": 1.0, "keep": 16000})
    rig.die(first)
    rig.tick()
    second, _ = rig.job_of(session)
    assert second != first
    job = rig.farm.jobs.of_request(b"client-1", session)
    assert job is not None and job.resume is not None and job.resume.start == 16000
    assert [f["text"] for f in job.resume.finals] == ["hello"]
    reopen = [m for w, m in rig.jobs_sent(second)]
    assert reopen and reopen[0].body["resume"] == job.resume.to_dict()  # the new worker's open carries the resume
    audio = [m for w, m in rig.io.sent if w == second and m.type is MsgType.STREAM_DATA]
    assert audio and len(audio[0].payload or b"") == 16000 * 4  # the second after the last final word
    reopened = [b for t, b in rig.answers(session) if t is MsgType.REPLY]
    assert reopened[-1] == {"session": job_id, "worker": second, "resumed": 1}


def test_an_idle_session_is_closed_and_a_stuck_flush_fails_alone() -> None:
    rig = Rig({"echo": echo(min_size=1, max_size=1, session_idle_timeout=5, job_timeout=10)})
    rig.start()
    session = rig.open_session()
    worker, job_id = rig.job_of(session)
    rig.run(5.5)
    closes = [m for w, m in rig.io.sent if m.type is MsgType.STREAM_CLOSE and m.id == job_id]
    assert closes and "idle" in closes[0].body.get("reason", "")
    rig.run(10.5)
    assert rig.error_of(session) == "JOB_TIMEOUT"
    assert rig.state(worker) is WorkerState.IDLE  # the worker serves on


def test_a_shutdown_closes_every_live_session_with_its_reason() -> None:
    """Stopping, the hub asks each session's worker to flush and answer at once: a session whose client went
    quiet would otherwise hold the drain until its idle timeout."""
    rig = Rig({"echo": echo(min_size=2, max_size=2, session_idle_timeout=30)})
    rig.start()
    sessions = [rig.open_session(), rig.open_session()]
    rig.farm.begin_shutdown()
    rig.sessions.close_all("the hub is shutting down", rig.t)
    for session in sessions:
        worker, job_id = rig.job_of(session)
        closes = [m for w, m in rig.io.sent if m.type is MsgType.STREAM_CLOSE and m.id == job_id and w == worker]
        assert [m.body for m in closes] == [{"reason": "the hub is shutting down"}]
    rig.sessions.close_all("the hub is shutting down", rig.t)  # a second signal: nothing is closed twice
    assert len([m for _, m in rig.io.sent if m.type is MsgType.STREAM_CLOSE]) == 2


def test_a_cancelled_queued_job_never_reaches_a_worker() -> None:
    rig = Rig({"echo": echo(min_size=1, max_size=1)})
    rig.start()
    running = rig.transcribe()
    queued = rig.transcribe()
    rig.farm.cancel(b"client-1", queued, rig.t)
    rig.finish(running)
    assert len(rig.jobs_sent()) == 1 and rig.state("echo-1") is WorkerState.IDLE


def test_an_unreachable_worker_is_recycled_and_the_job_retried() -> None:
    rig = Rig({"echo": echo(min_size=2, max_size=2)})
    rig.start()
    rig.io.unreachable.add("echo-1")
    request = rig.transcribe()
    assert rig.state("echo-1") is WorkerState.UNHEALTHY
    rig.tick()  # the retried job waits in the queue for the next pass
    assert rig.job_of(request)[0] == "echo-2" and rig.error_of(request) is None
