"""Long requests split across the pool: their plan and their pieces as jobs of their own.

A one-shot request longer than its provider's ``pool.split_over_seconds`` (unless the client sent
``split: false``) becomes a request in the ``SPLIT`` state that owns its parts:

1. a PLAN job: a worker reads the request's audio and runs the VAD over it (``workers.cutting``),
   sending each piece (where it starts and ends, whether it holds speech) as soon as its end is known;
2. a PIECE job for each piece with speech, queued as it arrives: an offset and a length into the
   request's one audio buffer (its shared-memory segment; an inline request's payload, sliced), so the
   audio is never copied per piece. Pieces go to any worker of the provider, are retried on a worker's
   death like any job, and take turns with other requests in the queue (``hub.supervisor.jobs.JobQueue``);
3. the request ends when every piece has: answered with the pieces stitched in order
   (``hub.supervisor.split``), or failed with the first error of a part that failed for good. Its
   other parts are then dropped: queued ones at once, running ones abandoned (their answers go nowhere).

Why the plan runs on a worker: the Silero VAD costs about 0.8 s per 5 minutes of audio on one core
(measured here), which must not stall the supervisor's loop; the client would need onnxruntime and
faster-whisper in every SDK, gateway and remote host and the supervisor would have to trust its plan;
a worker already maps the audio and has the VAD (it ships with faster-whisper), and sending each piece
as soon as it is planned lets the first pieces decode while the rest is still being planned.

``Pieces`` does the bookkeeping; it calls back into the farm for what only the farm does (placing a
job, answering or failing the client's request), so it is tested with plain callables.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from hub.config import PoolConfig
from hub.errors import HubError, InternalError
from hub.protocol import SAMPLE_RATE, AudioRef, Message, MsgType
from hub.supervisor.jobs import Job, JobKind, Jobs, JobState
from hub.supervisor.metrics import Metrics
from hub.supervisor.split import Split

log = logging.getLogger("hub.supervisor")

Place = Callable[[Job, float], None]  # give a job a worker or queue it (the farm's ``place``)
Fail = Callable[[Job, HubError, float], None]  # end the client's request with an error
Answer = Callable[[Job, dict[str, Any], float], None]  # the client's request's stitched RESULT body
Segment = Callable[[Job, dict[str, Any]], None]  # one SEGMENT to the client of the request
Abandon = Callable[[Job], None]  # give up a job on a worker: called back if it is held, its answer dropped


def wants_split(samples: int, pool: PoolConfig, asked: bool) -> bool:
    """Whether a one-shot request of ``samples`` is cut into pieces: longer than ``split_over_seconds``
    (0: never), and its client did not send ``split: false``."""
    return asked and pool.split_over_seconds > 0 and samples > pool.split_over_seconds * SAMPLE_RATE


class Pieces:
    """The split requests of a farm, by the request's job id."""

    def __init__(
        self,
        jobs: Jobs,
        metrics: Metrics,
        place: Place,
        fail: Fail,
        answer: Answer,
        segment: Segment,
        abandon: Abandon,
    ) -> None:
        self.jobs = jobs
        self.metrics = metrics
        self.place = place
        self.fail = fail
        self.answer = answer
        self.segment = segment
        self.abandon = abandon
        self.splits: dict[str, Split] = {}

    def start(self, request: Job, pool: PoolConfig, now: float) -> None:
        """Take ``request`` in as split and queue its plan; raises (POOL_BUSY) and keeps nothing when the
        provider's queue has no room for one more request."""
        piece = int(pool.split_piece_seconds * SAMPLE_RATE)
        plan = self._part(request, JobKind.PLAN, request.audio, request.payload, {"piece": piece}, -1, now)
        plan.acquire_deadline = request.acquire_deadline
        self.jobs.split(request)
        self.splits[request.id] = Split(request.audio.samples, request.stream)
        try:
            self.place(plan, now)
        except HubError:
            del self.splits[request.id]
            self.jobs.finish(request)
            raise

    # --- what the farm calls for a part (a job with an ``owner``) -----------------------

    def started(self, part: Job, now: float) -> None:
        """A part went to a worker: the request's wait ends with its first part's."""
        owner = self.jobs.get(part.owner)
        if owner is not None and not owner.started_at:
            owner.started_at = now

    def on_segment(self, part: Job, body: dict[str, Any], now: float) -> None:
        """A PLAN's next piece, or a PIECE's decoded segment."""
        owner, split = self._of(part)
        if owner is None or split is None:
            return
        if part.kind is JobKind.PIECE:
            for segment in split.segment(part.index, body):
                self.segment(owner, segment)
            return
        try:
            index = split.plan_piece(int(body["start"]), int(body["end"]), bool(body["speech"]), str(body["cut"]))
        except (KeyError, TypeError, ValueError) as exc:
            self._end(
                owner, InternalError(f"the plan of request {owner.request_id} is broken ({exc}); please report it"), now
            )
            return
        if index is None:
            return
        if split.planned:
            log.info(
                "request %s (job %s): %.1f s split into %s",
                owner.request_id,
                owner.id,
                owner.audio.seconds,
                split.describe(),
            )
            self.metrics.split(owner.provider, len(split.pieces))
        if split.pieces[index].speech:
            self.place(self._piece(owner, split, index, now), now)
        else:
            self._deliver(owner, split, split.done(index, None), now)

    def on_answer(self, part: Job, msg: Message, worker: str, now: float) -> None:
        """A part's RESULT or ERROR; the part is done."""
        owner, split = self._of(part)
        self.jobs.finish(part)
        if owner is None or split is None:
            return
        if msg.type is MsgType.ERROR:
            self._end(owner, HubError.from_dict(msg.body), now)
        elif part.kind is JobKind.PIECE:
            self._deliver(owner, split, split.done(part.index, msg.body, worker), now)
        elif not split.planned:
            self._end(
                owner,
                InternalError(f"the plan of request {owner.request_id} ended before the audio did; please report it"),
                now,
            )

    def failed(self, part: Job, error: HubError, now: float) -> None:
        """A part failed for good (its retries used up, its deadline passed, the hub stopping): so does its request.
        A part already dropped with its request (several expire at once) has nothing left to fail."""
        if part.state is JobState.DONE:
            return
        owner, _ = self._of(part)
        self.jobs.finish(part)
        if owner is not None:
            self._end(owner, error, now)

    def wanted(self, part: Job) -> bool:
        """Whether a part's request still waits for it (a part whose worker died is retried only then)."""
        return part.owner in self.splits and part.state is not JobState.ABANDONED

    def retrying(self, part: Job) -> None:
        """A part goes back to the queue, its worker gone: it starts over, and nothing it sent is sent twice."""
        split = self.splits.get(part.owner)
        if split is not None:
            split.retry(part.index) if part.kind is JobKind.PIECE else split.replan()

    def cancel(self, request: Job) -> None:
        """The client gave up on a split request: no part of it runs again, and it is over."""
        self.splits.pop(request.id, None)
        self._drop_parts(request)
        self.jobs.finish(request)

    # --- inside ------------------------------------------------------------------------

    def _of(self, part: Job) -> tuple[Job | None, Split | None]:
        split, owner = self.splits.get(part.owner), self.jobs.get(part.owner)
        if split is None or owner is None or part.state is JobState.ABANDONED:
            return None, None
        return owner, split

    def _deliver(self, owner: Job, split: Split, segments: list[dict[str, Any]], now: float) -> None:
        """Send what may go now; answer the request once every piece is done."""
        for segment in segments:
            self.segment(owner, segment)
        if split.complete:
            del self.splits[owner.id]
            self._drop_parts(owner)  # a plan that has not answered yet after its last piece
            self.answer(owner, split.result(), now)

    def _end(self, owner: Job, error: HubError, now: float) -> None:
        self.splits.pop(owner.id, None)
        self._drop_parts(owner)
        self.fail(owner, error, now)

    def _drop_parts(self, owner: Job) -> None:
        for part in self.jobs.owned(owner.id):
            if part.state is JobState.QUEUED:
                self.jobs.finish(part)
            elif part.state is JobState.RUNNING:
                self.abandon(part)

    def _piece(self, owner: Job, split: Split, index: int, now: float) -> Job:
        """The PIECE job of piece ``index``: its part of the request's segment (or of the inline payload)."""
        piece = split.pieces[index]
        samples = piece.end - piece.start
        if owner.audio.shm is not None:
            audio, payload = AudioRef(samples=samples, shm=owner.audio.shm, offset=piece.start), None
        else:
            audio, payload = AudioRef(samples=samples), (owner.payload or b"")[piece.start * 4 : piece.end * 4]
        job = self._part(owner, JobKind.PIECE, audio, payload, owner.options, index, now)
        piece.job = job.id
        return job

    def _part(
        self,
        owner: Job,
        kind: JobKind,
        audio: AudioRef,
        payload: bytes | None,
        options: dict[str, Any],
        index: int,
        now: float,
    ) -> Job:
        """A job ``owner`` owns; a piece may wait in the queue as long as the request's client waits."""
        deadline = owner.received_at + owner.client_timeout if owner.client_timeout else float("inf")
        return Job(
            id=self.jobs.new_id(kind),
            kind=kind,
            client=b"",
            request_id="",
            provider=owner.provider,
            audio=audio,
            payload=payload,
            options=options,
            stream=owner.stream and kind is JobKind.PIECE,
            received_at=now,
            acquire_deadline=deadline,
            client_timeout=owner.client_timeout,
            owner=owner.id,
            index=index,
        )
