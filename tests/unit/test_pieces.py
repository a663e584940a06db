"""A split request's parts as jobs (hub/supervisor/pieces.py), without processes: the farm's calls are
plain callables and time is a number."""

from __future__ import annotations

from typing import Any

import pytest

from hub.config import PoolConfig
from hub.errors import HubError, InferenceFailed, WorkerCrashed
from hub.protocol import AudioRef, Message, MsgType
from hub.supervisor.jobs import Job, JobKind, Jobs, JobState
from hub.supervisor.metrics import Metrics
from hub.supervisor.pieces import Pieces, wants_split

S = 16000
POOL = PoolConfig(split_over_seconds=60, split_piece_seconds=30)


class Farm:
    """What the farm does for ``Pieces``: place (every job queued), answer, fail, stream."""

    def __init__(self) -> None:
        self.jobs = Jobs()
        self.jobs.add_provider("p", 4)
        self.answers: list[dict[str, Any]] = []
        self.errors: list[HubError] = []
        self.segments: list[dict[str, Any]] = []
        self.called_back: list[str] = []  # the jobs given up on their workers
        self.pieces = Pieces(self.jobs, Metrics(), self.place, self.fail, self.answer, self.segment, self.abandon)

    def place(self, job: Job, now: float) -> None:
        self.jobs.place(job, queued=True)

    def fail(self, job: Job, error: HubError, now: float) -> None:
        self.errors.append(error)
        self.jobs.finish(job)

    def answer(self, job: Job, body: dict[str, Any], now: float) -> None:
        self.answers.append(body)
        self.jobs.finish(job)

    def segment(self, job: Job, body: dict[str, Any]) -> None:
        self.segments.append(body)

    def abandon(self, job: Job) -> None:
        self.called_back.append(job.id)
        self.jobs.abandon(job)

    def run(self, worker: str) -> Job:
        job = self.jobs.next_waiting("p")
        assert job is not None
        self.jobs.start(job, worker)
        self.pieces.started(job, 5.0)
        return job


def request(farm: Farm, seconds: int, shm: str | None = "asrhub_x_1_ab", stream: bool = False) -> Job:
    samples = seconds * S
    payload = None if shm else bytes(range(256)) * (samples * 4 // 256)
    job = Job(
        id=farm.jobs.new_id(JobKind.REQUEST), kind=JobKind.REQUEST, client=b"c", request_id="r1", provider="p",
        audio=AudioRef(samples, shm), payload=payload, options={"language": "en"}, stream=stream, received_at=0.0,
        acquire_deadline=30.0, client_timeout=100.0,
    )  # fmt: skip
    farm.pieces.start(job, POOL, 0.0)
    return job


def piece_msg(start: int, end: int, speech: bool = True, cut: str = "pause") -> dict[str, Any]:
    return {"start": start * S, "end": end * S, "speech": speech, "cut": cut}


def result(text: str) -> Message:
    return Message(
        MsgType.RESULT, "x", {"text": text, "segments": [{"start": 0.5, "end": 1.0, "text": text}], "language": "en"}
    )


def test_only_long_requests_that_allow_it_split() -> None:
    assert wants_split(61 * S, POOL, True) and not wants_split(60 * S, POOL, True)
    assert not wants_split(600 * S, POOL, False) and not wants_split(600 * S, PoolConfig(split_over_seconds=0), True)


def test_a_plan_queues_its_pieces_at_offsets_of_the_one_segment_and_the_answer_is_stitched() -> None:
    farm = Farm()
    owner = request(farm, 80)
    plan = farm.run("w1")
    assert plan.kind is JobKind.PLAN and plan.job_body()["plan"] == {"piece": 30 * S} and owner.started_at == 5.0
    farm.pieces.on_segment(plan, piece_msg(0, 28), 6.0)
    farm.pieces.on_segment(plan, piece_msg(28, 55, speech=False), 6.0)  # silence: never decoded
    farm.pieces.on_segment(plan, piece_msg(55, 80, cut="end"), 6.0)
    first, last = farm.run("w2"), farm.run("w3")
    assert [p.job_body()["audio"] for p in (first, last)] == [
        {"samples": 28 * S, "shm": "asrhub_x_1_ab"},
        {"samples": 25 * S, "shm": "asrhub_x_1_ab", "offset": 55 * S},
    ]
    assert first.options == {"language": "en"} and first.payload is None
    farm.pieces.on_answer(plan, Message(MsgType.RESULT, plan.id, {"pieces": 3}), "w1", 7.0)
    farm.pieces.on_answer(last, result("last"), "w3", 8.0)
    assert not farm.answers
    farm.pieces.on_answer(first, result("first"), "w2", 9.0)
    (body,) = farm.answers
    assert [(s["start"], s["text"]) for s in body["segments"]] == [(0.5, "first"), (55.5, "last")]
    assert body["text"] == "first last" and body["duration"] == 80.0 and body["worker"] == "w2,w3"
    assert farm.jobs.in_flight == 0 and farm.jobs.get(owner.id) is None and not farm.jobs.owned(owner.id)


def test_an_inline_request_s_pieces_carry_their_slice_of_the_payload() -> None:
    farm = Farm()
    owner = request(farm, 70, shm=None)
    plan = farm.run("w1")
    farm.pieces.on_segment(plan, piece_msg(0, 30), 1.0)
    piece = farm.run("w2")
    assert piece.job_body()["audio"] == {"samples": 30 * S, "shm": None}
    assert piece.payload == (owner.payload or b"")[: 30 * S * 4]


def test_a_piece_that_fails_for_good_fails_the_request_and_drops_its_other_parts() -> None:
    farm = Farm()
    owner = request(farm, 100)
    plan = farm.run("w1")
    for start, end in ((0, 30), (30, 60), (60, 90)):
        farm.pieces.on_segment(plan, piece_msg(start, end), 1.0)
    a, b = farm.run("w2"), farm.run("w3")
    error = InferenceFailed("the model broke")
    farm.pieces.on_answer(a, Message(MsgType.ERROR, a.id, error.to_dict()), "w2", 2.0)
    assert [type(e) for e in farm.errors] == [InferenceFailed] and farm.errors[0].message == "the model broke"
    assert b.state is JobState.ABANDONED and plan.state is JobState.ABANDONED and farm.jobs.queued("p") == 0
    farm.pieces.on_answer(b, result("late"), "w3", 3.0)  # an abandoned piece's answer goes nowhere
    assert not farm.answers and owner.state is JobState.DONE and farm.jobs.get(b.id) is None


def test_a_retried_piece_is_wanted_and_a_lost_one_fails_the_request() -> None:
    farm = Farm()
    request(farm, 70)
    plan = farm.run("w1")
    farm.pieces.on_segment(plan, piece_msg(0, 30), 1.0)
    piece = farm.run("w2")
    assert farm.pieces.wanted(piece)
    farm.pieces.retrying(plan)
    farm.jobs.requeue(plan)
    again = farm.run("w3")
    assert again is plan
    farm.pieces.on_segment(plan, piece_msg(0, 30), 2.0)  # the retried plan's first piece is known: not queued twice
    assert farm.jobs.queued("p") == 0
    farm.pieces.failed(piece, WorkerCrashed("worker w2 died"), 3.0)
    assert [e.code for e in farm.errors] == ["WORKER_CRASHED"] and not farm.pieces.wanted(plan)


def test_a_cancel_drops_queued_parts_and_abandons_running_ones() -> None:
    farm = Farm()
    owner = request(farm, 100)
    plan = farm.run("w1")
    for start, end in ((0, 30), (30, 60)):
        farm.pieces.on_segment(plan, piece_msg(start, end), 1.0)
    running = farm.run("w2")
    farm.pieces.cancel(owner)
    assert running.state is JobState.ABANDONED and farm.jobs.queued("p") == 0 and farm.jobs.in_flight == 0
    assert farm.called_back == [plan.id, running.id]  # called back from their workers (they may be held there)
    assert not farm.pieces.wanted(running)


def test_a_broken_plan_fails_the_request_with_an_internal_error() -> None:
    farm = Farm()
    request(farm, 70)
    plan = farm.run("w1")
    farm.pieces.on_segment(plan, piece_msg(5, 30), 1.0)  # does not start at 0
    assert [e.code for e in farm.errors] == ["INTERNAL_ERROR"]


@pytest.mark.parametrize("stream", [True, False])
def test_streamed_segments_reach_the_client_in_time_order(stream: bool) -> None:
    farm = Farm()
    request(farm, 70, stream=stream)
    plan = farm.run("w1")
    farm.pieces.on_segment(plan, piece_msg(0, 30), 1.0)
    farm.pieces.on_segment(plan, piece_msg(30, 70, cut="end"), 1.0)
    a, b = farm.run("w2"), farm.run("w3")
    assert a.stream is stream and plan.stream is False
    farm.pieces.on_segment(b, {"start": 0.0, "end": 1.0, "text": "b"}, 2.0)
    farm.pieces.on_segment(a, {"start": 0.0, "end": 1.0, "text": "a"}, 2.0)
    farm.pieces.on_answer(a, result("a"), "w2", 3.0)
    assert [s["text"] for s in farm.segments] == (["a", "b"] if stream else [])


def test_pieces_that_expire_together_fail_their_request_once() -> None:
    farm = Farm()
    request(farm, 100)
    plan = farm.run("w1")
    for start, end in ((0, 30), (30, 60), (60, 100)):
        farm.pieces.on_segment(plan, piece_msg(start, end), 1.0)
    expired = farm.jobs.expired("p", 1000.0)  # the client's deadline: every queued piece at once
    assert len(expired) == 3
    for part in expired:
        farm.pieces.failed(part, WorkerCrashed("gone"), 1000.0)
    assert len(farm.errors) == 1 and farm.jobs.queued("p") == 0 and farm.jobs.in_flight == 0
