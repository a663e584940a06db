"""A long request split across the pool, in the supervisor core on a fake clock (``tests/unit/core_rig.py``):
its plan on one worker, its pieces on every worker, a piece retried after a crash, the client's deadline."""

from __future__ import annotations

import itertools
from typing import Any

from hub.protocol import SAMPLE_RATE, Message, MsgType
from tests.unit.core_rig import Rig

S = SAMPLE_RATE


def echo(**pool: object) -> dict[str, object]:
    return {
        "type": "echo",
        "pool": {"min_size": 2, "max_size": 2, "split_over_seconds": 60, "split_piece_seconds": 30, **pool},
    }


def sent_jobs(rig: Rig) -> list[tuple[str, Message]]:
    return [(w, m) for w, m in rig.jobs_sent()]


def plan(rig: Rig, worker: str, job_id: str, cuts: list[int], total: int) -> None:
    """The worker's VAD pass: one SEGMENT per piece (all with speech), then its RESULT."""
    edges = [0, *cuts, total]
    for start, end in itertools.pairwise(edges):
        cut = "end" if end == total else "pause"
        rig.from_worker(
            worker, MsgType.SEGMENT, job_id, {"start": start * S, "end": end * S, "speech": True, "cut": cut}
        )
    rig.from_worker(worker, MsgType.RESULT, job_id, {"pieces": len(edges) - 1})


def answer(rig: Rig, worker: str, job_id: str, text: str) -> None:
    body: dict[str, Any] = {"text": text, "segments": [{"start": 1.0, "end": 2.0, "text": text}], "language": "en"}
    rig.from_worker(worker, MsgType.RESULT, job_id, body)


def test_the_plan_runs_first_then_each_piece_on_any_worker_and_the_answer_is_stitched() -> None:
    rig = Rig({"echo": echo()})
    rig.start()
    request = rig.transcribe(seconds=70)
    ((worker, first),) = sent_jobs(rig)
    assert first.body["plan"] == {"piece": 30 * S} and first.body["audio"]["samples"] == 70 * S
    plan(rig, worker, first.id, [28, 50], 70)
    pieces = sent_jobs(rig)[1:]
    assert [w for w, _ in pieces] == ["echo-2", "echo-1"]  # the idle worker at once, then the plan's own
    assert [m.body["audio"]["samples"] for _, m in pieces] == [28 * S, 22 * S]
    assert [len(m.payload or b"") for _, m in pieces] == [28 * S * 4, 22 * S * 4]  # inline: its slice of the payload
    for (w, m), text in zip(pieces, ("one", "two"), strict=True):
        answer(rig, w, m.id, text)
    assert rig.answers(request) == []  # the third piece waits in the queue
    ((w, third),) = sent_jobs(rig)[3:]
    answer(rig, w, third.id, "three")
    ((kind, body),) = rig.answers(request)
    assert kind is MsgType.RESULT and body["text"] == "one two three" and body["extra"] == {"pieces": 3}
    assert [s["start"] for s in body["segments"]] == [1.0, 29.0, 51.0] and body["duration"] == 70.0
    figures = rig.metrics.summary("echo", rig.t, 2)
    assert (figures.pieces, figures.succeeded, figures.requests) == (3, 1, 1)


def test_a_piece_whose_worker_dies_is_retried_and_counted_once() -> None:
    rig = Rig({"echo": echo()})
    rig.start()
    request = rig.transcribe(seconds=70)
    ((worker, first),) = sent_jobs(rig)
    plan(rig, worker, first.id, [35], 70)
    (w1, piece1), (w2, piece2) = sent_jobs(rig)[1:]
    rig.die(w1)
    rig.tick()
    answer(rig, w2, piece2.id, "two")
    ((w3, again),) = sent_jobs(rig)[3:]
    assert again.id == piece1.id and again.body["audio"] == piece1.body["audio"] and w3 != w1
    answer(rig, w3, again.id, "one")
    ((kind, body),) = rig.answers(request)
    assert kind is MsgType.RESULT and body["text"] == "one two"


def test_short_requests_are_not_split_and_split_false_keeps_a_long_one_whole() -> None:
    rig = Rig({"echo": echo()})
    rig.start()
    rig.transcribe(seconds=60)
    rig.transcribe(seconds=90, split=False)
    assert [("plan" in m.body, m.body["audio"]["samples"]) for _, m in sent_jobs(rig)] == [
        (False, 60 * S),
        (False, 90 * S),
    ]
    rig.transcribe(seconds=90, split="no")
    assert rig.error_of("r3") == "BAD_REQUEST"


def test_the_clients_deadline_fails_the_request_once_and_empties_the_queue() -> None:
    rig = Rig({"echo": echo(min_size=1, max_size=1)})
    rig.start()
    request = rig.transcribe(seconds=100, timeout=20)
    ((worker, first),) = sent_jobs(rig)
    plan(rig, worker, first.id, [30, 60, 90], 100)
    rig.run(25)
    assert [rig.error_of(request)] == ["ACQUIRE_TIMEOUT"] and len(rig.answers(request)) == 1
    assert rig.farm.jobs.queued("echo") == 0 and rig.farm.in_flight == 0


def test_a_client_that_gives_up_has_the_pieces_its_workers_hold_called_back() -> None:
    """With max_batch 2 each worker holds a piece beside the one it decodes; the client gives up: every piece
    on a worker is called back (CANCEL: a held one leaves its batch), no queued one is sent, and answers that
    still come go nowhere."""
    rig = Rig({"echo": echo(min_size=2, max_size=2, max_batch=2)})
    rig.start()
    request = rig.transcribe(seconds=130)
    ((worker, first),) = sent_jobs(rig)
    plan(rig, worker, first.id, [30, 60, 90, 120], 130)
    pieces = sent_jobs(rig)[1:]
    assert len(pieces) == 4 and rig.farm.jobs.queued("echo") == 1  # two on each worker, the fifth waits
    rig.farm.cancel(b"client-1", request, rig.t)
    called_back = [(w, m.id) for w, m in rig.io.sent if m.type is MsgType.CANCEL]
    assert sorted(called_back) == sorted((w, m.id) for w, m in pieces)
    assert rig.farm.jobs.queued("echo") == 0 and len(sent_jobs(rig)) == 5  # the queued piece never goes out
    for w, m in pieces:
        answer(rig, w, m.id, "too late")
    assert rig.answers(request) == []  # the client gave up: nothing goes to it
    assert rig.farm.in_flight == 0
