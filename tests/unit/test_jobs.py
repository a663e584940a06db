"""A job's one lifecycle, without processes: the transition table and the ``Jobs`` table's operations."""

from __future__ import annotations

import itertools

import pytest

from hub.config import PoolConfig
from hub.errors import PoolBusy
from hub.protocol import AudioRef
from hub.supervisor.jobs import (
    TRANSITIONS,
    Job,
    JobKind,
    Jobs,
    JobState,
    JobStateError,
    check_transition,
    session_overdue,
)

pytestmark = pytest.mark.timeout(10)

S = JobState
ALLOWED = {
    (S.NEW, S.QUEUED), (S.NEW, S.RUNNING),
    (S.QUEUED, S.RUNNING), (S.QUEUED, S.DONE),
    (S.RUNNING, S.CLOSING), (S.RUNNING, S.ABANDONED), (S.RUNNING, S.QUEUED), (S.RUNNING, S.DONE),
    (S.CLOSING, S.ABANDONED), (S.CLOSING, S.QUEUED), (S.CLOSING, S.DONE),
    (S.ABANDONED, S.DONE),
    (S.NEW, S.SPLIT), (S.SPLIT, S.DONE),
}  # fmt: skip


@pytest.mark.parametrize(("old", "new"), list(itertools.product(JobState, JobState)))
def test_the_transition_table_allows_exactly_the_lifecycle(old: JobState, new: JobState) -> None:
    if (old, new) in ALLOWED:
        check_transition(old, new)
    else:
        with pytest.raises(JobStateError, match=f"from {old.value} to {new.value}"):
            check_transition(old, new)


def test_every_state_is_in_the_table_and_done_is_the_end() -> None:
    assert set(TRANSITIONS) == set(JobState)
    assert not TRANSITIONS[JobState.DONE]
    assert all(JobState.NEW not in targets for targets in TRANSITIONS.values())


def job(
    jobs: Jobs, kind: JobKind = JobKind.REQUEST, client: bytes = b"c", request_id: str = "1", provider: str = "p"
) -> Job:
    has_client = kind.has_client
    return Job(
        id=jobs.new_id(kind), kind=kind, client=client if has_client else b"", request_id=request_id if has_client else "",
        provider=provider, audio=AudioRef(16000), payload=None, options={}, stream=False, received_at=0.0,
        acquire_deadline=1.0, client_timeout=None,
    )  # fmt: skip


def table(limit: int = 2) -> Jobs:
    jobs = Jobs()
    jobs.add_provider("p", limit)
    return jobs


def test_ids_name_the_kind_for_a_reader_and_never_repeat() -> None:
    jobs = table()
    ids = [jobs.new_id(kind) for kind in JobKind]
    assert [i[0] for i in ids] == ["j", "s", "h", "w", "c", "p"] and len(set(ids)) == 6


def test_a_queued_job_runs_then_is_done_and_leaves_the_table() -> None:
    jobs = table()
    a = job(jobs)
    jobs.place(a, queued=True)
    assert (a.state, jobs.queued("p"), jobs.of_request(b"c", "1"), jobs.in_flight) == (S.QUEUED, 1, a, 1)
    jobs.start(a, "p-1")
    assert (a.state, a.worker, a.attempts, jobs.queued("p")) == (S.RUNNING, "p-1", 1, 0)
    assert jobs.on_workers() == [a] and jobs.get(a.id) is a
    jobs.finish(a)
    assert a.state is S.DONE and jobs.get(a.id) is None and jobs.of_request(b"c", "1") is None and jobs.in_flight == 0


def test_a_full_queue_refuses_and_the_job_is_not_taken() -> None:
    jobs = table(limit=1)
    jobs.place(job(jobs, request_id="1"), queued=True)
    refused = job(jobs, request_id="2")
    with pytest.raises(PoolBusy) as busy:
        jobs.place(refused, queued=True)
    assert busy.value.request_id == "2"
    assert refused.state is S.NEW and jobs.of_request(b"c", "2") is None and jobs.queued("p") == 1


def test_a_lost_job_is_retried_first_in_line() -> None:
    jobs = table()
    first, waiting = job(jobs, request_id="1"), job(jobs, request_id="2")
    jobs.place(first, queued=False)
    jobs.start(first, "p-1")
    jobs.place(waiting, queued=True)
    jobs.requeue(first)
    assert first.state is S.QUEUED and first.worker is None
    assert jobs.waiting("p") == [first, waiting] and jobs.next_waiting("p") is first
    jobs.start(first, "p-2")
    assert first.attempts == 2 and jobs.waiting("p") == [waiting]


def test_an_abandoned_job_ends_on_its_worker_and_no_client_waits_for_it() -> None:
    jobs = table()
    a = job(jobs)
    jobs.place(a, queued=False)
    jobs.start(a, "p-1")
    assert a.client_waits
    jobs.abandon(a)
    assert a.state is S.ABANDONED and not a.client_waits
    assert jobs.of_request(b"c", "1") is None and jobs.in_flight == 0 and jobs.get(a.id) is a  # still on its worker
    with pytest.raises(JobStateError):
        jobs.requeue(a)  # nobody waits for it: it is never retried
    jobs.finish(a)
    assert jobs.get(a.id) is None


def test_a_session_closes_and_counts_while_its_client_waits() -> None:
    jobs = table()
    s = job(jobs, JobKind.SESSION)
    jobs.place(s, queued=False)
    jobs.start(s, "p-1")
    assert jobs.sessions("p") == 1
    jobs.close(s)
    jobs.requeue(s)  # its worker died while it flushed: it moves on, and is told to close again there
    jobs.start(s, "p-2")
    jobs.close(s)
    assert s.state is S.CLOSING and s.attempts == 2
    jobs.finish(s)
    assert jobs.sessions("p") == 0


def test_jobs_without_a_client_are_never_indexed_by_request() -> None:
    jobs = table()
    check = job(jobs, JobKind.HEALTH)
    jobs.place(check, queued=False)
    jobs.start(check, "p-1")
    assert not check.client_waits and jobs.in_flight == 0 and jobs.on_workers() == [check]
    jobs.finish(check)
    assert jobs.on_workers() == []


def test_an_expired_job_stays_queued_until_it_is_finished() -> None:
    jobs = table()
    a = job(jobs)
    jobs.place(a, queued=True)
    assert jobs.expired("p", now=0.5) == [] and jobs.expired("p", now=1.0) == [a]
    jobs.finish(a)
    assert jobs.queued("p") == 0 and jobs.expired("p", now=2.0) == []


def test_a_session_is_overdue_when_idle_or_open_too_long_and_says_which_limit() -> None:
    limits = PoolConfig(session_idle_timeout=30.0, max_session_seconds=600.0)
    session = job(table(), JobKind.SESSION)
    session.started_at, session.last_activity = 100.0, 650.0
    assert session_overdue(limits, session, 680.0) == ""
    assert "no audio for 31 s (pool.session_idle_timeout=30)" in session_overdue(limits, session, 681.0)
    session.last_activity = 699.0
    assert session_overdue(limits, session, 700.5) == "open longer than pool.max_session_seconds=600"


def split_request(jobs: Jobs, request_id: str, pieces: int) -> tuple[Job, list[Job]]:
    """A request taken in as split, and ``pieces`` PIECE jobs of it."""
    owner = job(jobs, request_id=request_id)
    jobs.split(owner)
    parts = []
    for index in range(pieces):
        part = job(jobs, JobKind.PIECE)
        part.owner, part.index = owner.id, index
        parts.append(part)
    return owner, parts


def test_a_short_request_goes_before_the_queued_pieces_of_a_long_one() -> None:
    jobs = table(limit=2)
    owner, parts = split_request(jobs, "long", 5)
    assert owner.state is S.SPLIT and jobs.of_request(b"c", "long") is owner and jobs.in_flight == 1
    for part in parts:
        jobs.place(part, queued=True)
    jobs.start(parts[0], "p-1")
    jobs.start(parts[1], "p-2")
    assert jobs.pieces("p") == 2 and jobs.next_waiting("p") is parts[2]  # nobody else waits: the pieces, in order
    short = job(jobs, request_id="short")
    jobs.place(short, queued=True)  # three pieces wait, yet the queue (limit 2) counts one request
    assert jobs.next_waiting("p") is short  # it has no job on a worker, the long request two
    jobs.start(short, "p-3")
    assert jobs.next_waiting("p") is parts[2]
    assert jobs.owned(owner.id) == parts


def test_two_long_requests_take_turns_and_the_bound_counts_requests() -> None:
    jobs = table(limit=2)
    _, a = split_request(jobs, "a", 3)
    _, b = split_request(jobs, "b", 3)
    for part in a + b:
        jobs.place(part, queued=True)
    started = []
    for worker in ("p-1", "p-2", "p-3", "p-4"):
        nxt = jobs.next_waiting("p")
        assert nxt is not None
        jobs.start(nxt, worker)
        started.append(nxt)
    assert started == [a[0], b[0], a[1], b[1]]
    with pytest.raises(PoolBusy, match="2 requests waiting"):
        jobs.place(job(jobs, request_id="third"), queued=True)


def test_on_one_worker_a_short_request_goes_between_two_pieces() -> None:
    """One worker: a piece ends, and the long request has no job on a worker, like the short one; the short one
    goes next, because the long request's turn was more recent."""
    jobs = table(limit=4)
    _, parts = split_request(jobs, "long", 3)
    for part in parts:
        jobs.place(part, queued=True)
    jobs.start(parts[0], "p-1")
    short = job(jobs, request_id="short")
    jobs.place(short, queued=True)
    jobs.finish(parts[0])
    assert jobs.next_waiting("p") is short
    jobs.start(short, "p-1")
    jobs.finish(short)
    assert jobs.next_waiting("p") is parts[1]
