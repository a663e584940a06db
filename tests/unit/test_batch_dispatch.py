"""The supervisor's side of batching on a fake clock (``core_rig``): a worker counts as free while it holds
fewer than ``pool.max_batch`` jobs, a crash retries every job it held (each once against ``retry_on_crash``),
a cancelled held job is called back from its worker, deadlines still hold, and the batches a worker reports
reach the status and the batch-size histogram."""

from __future__ import annotations

from hub.protocol import MsgType
from hub.supervisor.metrics import PrometheusCollector
from hub.supervisor.pool import WorkerState
from hub.supervisor.views import worker_status
from tests.unit.core_rig import Rig


def echo(**pool: object) -> dict[str, object]:
    return {"type": "echo", "pool": {"min_size": 2, "max_size": 2, "max_batch": 3, **pool}}


def test_jobs_fill_idle_workers_first_then_the_least_loaded_until_each_holds_max_batch() -> None:
    rig = Rig({"echo": echo()})
    rig.start()
    placed = [rig.job_of(rig.transcribe())[0] for _ in range(6)]
    assert placed == ["echo-1", "echo-2", "echo-1", "echo-2", "echo-1", "echo-2"]
    assert all(rig.state(w) is WorkerState.BUSY for w in ("echo-1", "echo-2"))
    waiting = rig.transcribe()
    assert rig.farm.jobs.queued("echo") == 1  # both hold max_batch: the seventh waits
    rig.finish("r1")  # one job of echo-1's batch answered: it has room again
    assert rig.job_of(waiting)[0] == "echo-1"


def test_max_batch_1_keeps_one_job_per_worker() -> None:
    rig = Rig({"echo": echo(max_batch=1)})
    rig.start()
    assert [rig.job_of(rig.transcribe())[0] for _ in range(2)] == ["echo-1", "echo-2"]
    rig.transcribe()
    assert rig.farm.jobs.queued("echo") == 1


def test_a_crash_retries_every_job_of_its_batch_each_counted_once() -> None:
    rig = Rig({"echo": echo(min_size=2, max_size=2, max_batch=2, retry_on_crash=1)})
    rig.start()
    first, second, other = rig.transcribe(), rig.transcribe(), rig.transcribe()
    assert rig.job_of(first)[0] == rig.job_of(other)[0] == "echo-1" and rig.job_of(second)[0] == "echo-2"
    rig.die("echo-1")
    rig.tick()
    assert rig.job_of(first)[0] == "echo-2"  # the oldest retried first, on the worker with room ...
    assert rig.farm.jobs.queued("echo") == 1 and rig.error_of(other) is None  # ... the other waits for room
    assert rig.start() == ["echo-3"]  # the replacement
    assert rig.job_of(other)[0] == "echo-3"
    rig.die("echo-2")
    rig.tick()
    assert rig.error_of(first) == "WORKER_CRASHED"  # its one retry is spent
    assert rig.error_of(second) is None and rig.job_of(second)[0] == "echo-3"  # its first crash: retried


def test_a_cancelled_held_job_is_called_back_from_its_worker_and_its_answer_dropped() -> None:
    rig = Rig({"echo": echo(min_size=1, max_size=1)})
    rig.start()
    running, held = rig.transcribe(), rig.transcribe()
    worker, job_id = rig.job_of(held)
    rig.farm.cancel(b"client-1", held, rig.t)
    assert (worker, job_id) in [(w, m.id) for w, m in rig.io.sent if m.type is MsgType.CANCEL]
    rig.from_worker(
        worker, MsgType.ERROR, job_id, {"code": "JOB_TIMEOUT", "message": "cancelled before its batch started"}
    )
    assert rig.answers(held) == []  # the client gave up: nothing more goes to it
    handle = rig.workforce.worker(worker)
    assert handle is not None and len(handle.jobs) == 1 and handle.consecutive_failures == 0
    rig.finish(running)
    assert rig.state(worker) is WorkerState.IDLE


def test_an_overdue_job_fails_and_the_others_of_its_worker_are_retried_elsewhere() -> None:
    rig = Rig({"echo": echo(min_size=1, max_size=1, job_timeout=10, job_timeout_per_audio_second=0)})
    rig.start()
    slow = rig.transcribe()
    rig.run(5)
    late = rig.transcribe()  # joins echo-1's batch 5 s later: its deadline is 5 s after the first's
    assert rig.job_of(late)[0] == "echo-1"
    rig.run(5.1, step=0.1)
    assert rig.error_of(slow) == "JOB_TIMEOUT" and rig.error_of(late) is None
    assert rig.state("echo-1") is WorkerState.UNHEALTHY
    rig.die("echo-1", code=-15)
    rig.tick()
    assert rig.start() == ["echo-2"]
    assert rig.job_of(late)[0] == "echo-2" and rig.error_of(late) is None  # lost with its worker, retried


def test_batches_reach_the_status_and_the_batch_size_histogram() -> None:
    rig = Rig({"echo": echo()})
    rig.start()
    requests = [rig.transcribe() for _ in range(5)]
    jobs = [rig.job_of(r) for r in requests]
    handle = rig.workforce.worker("echo-1")
    assert handle is not None and worker_status(handle, rig.t, "").jobs_held == 3
    rig.from_worker("echo-1", MsgType.BATCH, "echo-1", {"jobs": [j for w, j in jobs if w == "echo-1"]})
    rig.from_worker("echo-2", MsgType.BATCH, "echo-2", {"jobs": [j for w, j in jobs if w == "echo-2"][:1]})
    assert rig.metrics.summary("echo", rig.t, 2).mean_batch == 2.0  # (3 + 1) jobs in 2 passes
    families = {f.name: f for f in PrometheusCollector(rig.metrics).collect()}
    counts = {s.labels.get("le"): s.value for s in families["asr_hub_batch_size"].samples if s.name.endswith("_bucket")}
    assert counts["+Inf"] == 2 and min(v for le, v in counts.items() if le != "+Inf") == 1  # one pass of 1, one of 3
    rig.run(61)
    assert rig.metrics.summary("echo", rig.t, 2).mean_batch is None  # the window forgot them
