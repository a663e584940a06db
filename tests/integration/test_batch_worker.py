"""A real echo worker process holding several jobs, driven from a ROUTER socket the way the supervisor
drives it: the batch it announces (BATCH), each job's own answer, a job cancelled before its batch
started, and a held job's bad options failing that job alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from hub import protocol
from hub.protocol import Message, MsgType, WorkerSpec
from workers.echo import echo_text

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Worker:
    sock: zmq.Socket
    proc: subprocess.Popen[bytes]
    id: str
    batches: list[list[str]] = field(default_factory=list)  # the BATCH messages seen, each its job ids

    def job(self, job_id: str, pcm: np.ndarray, **options: Any) -> None:
        body = {"audio": {"samples": int(pcm.size)}, "options": options, "stream": False}
        self.sock.send_multipart([self.id.encode(), *protocol.build(MsgType.JOB, job_id, body, pcm.tobytes())])

    def cancel(self, job_id: str) -> None:
        self.sock.send_multipart([self.id.encode(), *protocol.build(MsgType.CANCEL, job_id)])

    def next(self, timeout: float = 20.0) -> Message:
        """The worker's next message on its job socket (heartbeats come on another identity and are skipped)."""
        deadline = time.monotonic() + timeout
        while self.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            identity, *frames = self.sock.recv_multipart()
            if identity == self.id.encode():
                return protocol.parse(frames)
            if time.monotonic() > deadline:
                break
        raise TimeoutError("the worker sent nothing")

    def answers(self, count: int) -> dict[str, Message]:
        """The next ``count`` RESULT or ERROR messages by job id (BATCH messages before them are kept apart)."""
        got: dict[str, Message] = {}
        while len(got) < count:
            msg = self.next()
            if msg.type in (MsgType.RESULT, MsgType.ERROR):
                got[msg.id] = msg
            elif msg.type is MsgType.BATCH:
                self.batches.append(list(msg.body["jobs"]))
        return got


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[Any]:
    ctx = zmq.Context()
    started: list[Worker] = []
    sockets: list[zmq.Socket] = []

    def start(max_batch: int, batch_wait_ms: float) -> Worker:
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sockets.append(sock)
        endpoint = f"ipc://{tmp_path}/backend-{len(started)}"
        sock.bind(endpoint)
        spec = WorkerSpec(
            id="echo-1",
            provider="echo",
            type="echo",
            model="",
            device="cpu",
            compute_type="auto",
            cpu_threads=1,
            backend=endpoint,
            shm_prefix="asrhubtest",
            heartbeat_interval=1.0,
            options={},
            max_batch=max_batch,
            batch_wait_ms=batch_wait_ms,
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "workers", "--spec", spec.to_json()], env=env, cwd=ROOT)
        worker = Worker(sock, proc, spec.id)
        started.append(worker)
        assert worker.next().type is MsgType.READY
        return worker

    yield start
    for worker in started:
        worker.sock.send_multipart([worker.id.encode(), *protocol.build(MsgType.STOP, worker.id)])
        try:
            worker.proc.wait(5)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            worker.proc.wait()
    for sock in sockets:
        sock.close()
    ctx.term()


def _pcm(level: float, seconds: float = 0.5) -> np.ndarray:
    return np.full(int(seconds * 16000), level, dtype=np.float32)


def test_held_jobs_decode_in_one_batch_each_answering_its_own_text(worker_factory: Any) -> None:
    worker = worker_factory(max_batch=4, batch_wait_ms=300)
    clips = {f"j{i}": _pcm(0.1 * (i + 1)) for i in range(3)}
    for job_id, pcm in clips.items():
        worker.job(job_id, pcm)
    answers = worker.answers(3)
    assert worker.batches == [["j0", "j1", "j2"]]  # fewer than max_batch: they waited batch_wait_ms, then went together
    assert {job_id: msg.body["text"] for job_id, msg in answers.items()} == {j: echo_text(p) for j, p in clips.items()}


def test_a_full_batch_starts_at_once_and_the_next_jobs_form_the_next_batch(worker_factory: Any) -> None:
    worker = worker_factory(max_batch=2, batch_wait_ms=1000)
    started = time.monotonic()
    for i in range(4):
        worker.job(f"j{i}", _pcm(0.1))
    worker.answers(4)
    assert worker.batches == [["j0", "j1"], ["j2", "j3"]]
    assert time.monotonic() - started < 1.0  # neither full batch waited its batch_wait_ms


def test_bad_options_and_a_failing_job_fail_alone(worker_factory: Any) -> None:
    worker = worker_factory(max_batch=4, batch_wait_ms=300)
    worker.job("good", _pcm(0.1))
    worker.job("unknown-option", _pcm(0.1), beam_size=5)
    worker.job("fails", _pcm(0.1), fail="this job only")
    worker.job("good-too", _pcm(0.2))
    answers = worker.answers(4)
    assert worker.batches == [["good", "fails", "good-too"]]  # the refused job never joined the batch
    assert answers["unknown-option"].body["code"] == "BAD_REQUEST"
    assert answers["fails"].body["code"] == "INFERENCE_FAILED" and "this job only" in answers["fails"].body["message"]
    assert answers["good"].type is MsgType.RESULT and answers["good-too"].body["text"] == echo_text(_pcm(0.2))


def test_a_cancelled_job_not_started_leaves_and_a_started_one_still_answers(worker_factory: Any) -> None:
    worker = worker_factory(max_batch=1, batch_wait_ms=0)
    worker.job("running", _pcm(0.1), sleep=0.8)
    first = worker.next()
    assert first.type is MsgType.BATCH and first.body["jobs"] == ["running"]
    worker.job("held", _pcm(0.1))  # arrives while the first batch decodes: held, not started
    worker.cancel("held")
    worker.cancel("running")  # already decoding: it finishes (the supervisor drops its answer)
    answers = worker.answers(2)
    assert (
        answers["held"].body["code"] == "JOB_TIMEOUT" and "before its batch started" in answers["held"].body["message"]
    )
    assert answers["running"].type is MsgType.RESULT
    assert worker.batches == []  # "held" was never part of a batch


def test_one_jobs_exit_ends_the_worker_mid_batch(worker_factory: Any) -> None:
    worker = worker_factory(max_batch=3, batch_wait_ms=200)
    worker.job("a", _pcm(0.1))
    worker.job("crash", _pcm(0.1), exit=3)
    worker.job("b", _pcm(0.1))
    assert worker.proc.wait(10) == 3  # the whole batch's worker is gone: the supervisor retries all three
    seen = []
    while worker.sock.poll(200):
        identity, *frames = worker.sock.recv_multipart()
        seen.append(protocol.parse(frames).type)
    assert MsgType.RESULT not in seen and MsgType.ERROR not in seen  # not even the jobs before the crashing one
