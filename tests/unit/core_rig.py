"""The supervisor core (Workforce, Sessions, Farm) without processes or sockets: a ``WorkerIO`` double that
records every message and plays the workers' part, and a clock the test moves by hand."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hub import protocol
from hub.config import HubConfig, ProviderConfig, parse_config
from hub.errors import HubError
from hub.protocol import Message, MsgType, WorkerSpec
from hub.supervisor.cards import Cards
from hub.supervisor.farm import Farm
from hub.supervisor.gpus import Card
from hub.supervisor.jobs import Jobs
from hub.supervisor.metrics import Metrics
from hub.supervisor.pool import WorkerState
from hub.supervisor.release.rollout import Rollout
from hub.supervisor.sessions import Sessions
from hub.supervisor.workforce import Workforce

PREFIX = "asrhub-unit"
CLIENT = b"client-1"


@dataclass
class FakeProc:
    pid: int
    code: int | None = None
    signals: list[str] = field(default_factory=list)

    def poll(self) -> int | None:
        return self.code


class FakeIO:
    """Processes that exist only as records; messages to workers are kept, parsed, in ``sent``."""

    def __init__(self) -> None:
        self.procs: dict[str, FakeProc] = {}
        self.sent: list[tuple[str, Message]] = []
        self.unreachable: set[str] = set()

    def spawn(self, spec: WorkerSpec, provider: ProviderConfig, card: Card | None) -> FakeProc:
        proc = FakeProc(pid=10_000 + len(self.procs))
        self.procs[spec.id] = proc
        return proc

    def send(self, worker_id: str, frames: list[bytes]) -> Exception | None:
        if worker_id in self.unreachable or worker_id not in self.procs:
            return ConnectionError(f"{worker_id} is gone")
        self.sent.append((worker_id, protocol.parse(frames)))
        return None

    def terminate(self, proc: FakeProc) -> None:  # type: ignore[override]
        proc.signals.append("TERM")

    def kill(self, proc: FakeProc) -> None:  # type: ignore[override]
        proc.signals.append("KILL")
        proc.code = -9

    def rss_mb(self, pid: int) -> float:
        return 150.0

    def stop_all(self, procs: list[FakeProc], grace: float) -> None:  # type: ignore[override]
        for proc in procs:
            proc.code = 0


class Rig:
    """One hub's core on a fake clock: ``t`` is now; ``tick`` runs the timer work; ``answer`` plays a worker."""

    def __init__(self, providers: dict[str, Any], **hub: Any) -> None:
        self.config: HubConfig = parse_config({"hub": hub, "providers": providers}, check_paths=False)
        self.t = 1000.0
        self.io = FakeIO()
        self.replies: list[tuple[bytes, MsgType, str, dict[str, Any]]] = []
        self.metrics = Metrics()
        self.workforce = Workforce(self.config, self.io, Cards(), Path("/nonexistent/backend.sock"), PREFIX)
        jobs = Jobs()
        self.sessions = Sessions(jobs, self.workforce, self.reply, self.metrics)
        self.farm = Farm(
            self.config,
            jobs,
            self.workforce,
            self.sessions,
            self.reply,
            self.metrics,
            Rollout(self.config.routes, self.metrics),
        )
        self.next_request = 0

    def reply(self, client: bytes, msg_type: MsgType, request_id: str, body: dict[str, Any]) -> None:
        self.replies.append((client, msg_type, request_id, body))

    # --- time and workers --------------------------------------------------------------

    def tick(self, seconds: float = 0.0) -> None:
        self.t += seconds
        self.farm.tick(self.t, sample=False)

    def start(self) -> list[str]:
        """Tick until every pool has started its floor, then make every started worker ready; their ids."""
        self.tick()
        ready = []
        for pool in self.workforce.pools.values():
            for worker in list(pool.workers.values()):
                if worker.state is WorkerState.STARTING:
                    self.from_worker(worker.id, MsgType.READY, "ready", {"device": "cpu"})
                    ready.append(worker.id)
        return ready

    def from_worker(self, worker_id: str, msg_type: MsgType, msg_id: str, body: dict[str, Any] | None = None) -> None:
        self.farm.on_worker(worker_id.encode(), Message(msg_type, msg_id, body or {}), self.t)

    def run(self, seconds: float, step: float = 1.0) -> None:
        """Let ``seconds`` pass a ``step`` at a time, every worker beating its heart and the loop ticking."""
        end = self.t + seconds
        while self.t < end:
            self.t = min(end, self.t + step)
            self.heartbeat()
            self.tick()

    def stream(self, request_id: str, seconds: float) -> None:
        """The client sends ``seconds`` of inline audio to its live session."""
        pcm = np.zeros(int(seconds * protocol.SAMPLE_RATE), np.float32).tobytes()
        self.sessions.data(CLIENT, Message(MsgType.STREAM_DATA, request_id, {}, pcm), self.t)

    def heartbeat(self) -> None:
        for pool in self.workforce.pools.values():
            for worker_id in pool.workers:
                self.from_worker(worker_id + ".hb", MsgType.HEARTBEAT, worker_id, {"busy": 0.0})

    def die(self, worker_id: str, code: int = -9) -> None:
        """The worker's process exits; the next tick reaps it."""
        self.io.procs[worker_id].code = code

    def state(self, worker_id: str) -> WorkerState:
        return self.workforce.worker(worker_id).state  # type: ignore[union-attr]

    # --- clients -----------------------------------------------------------------------

    def transcribe(
        self, provider: str = "echo", seconds: float = 1.0, timeout: float | None = None, **body: Any
    ) -> str:
        """A client's TRANSCRIBE with inline PCM; returns its request id. Refusals land in ``replies``."""
        self.next_request += 1
        request_id = f"r{self.next_request}"
        pcm = np.zeros(int(seconds * protocol.SAMPLE_RATE), np.float32).tobytes()
        msg_body = {"provider": provider, "audio": {"samples": len(pcm) // 4}, "options": {}, **body}
        if timeout is not None:
            msg_body["timeout"] = timeout
        self._client(Message(MsgType.TRANSCRIBE, request_id, msg_body, pcm))
        return request_id

    def open_session(self, provider: str = "echo") -> str:
        self.next_request += 1
        request_id = f"s{self.next_request}"
        self._client(Message(MsgType.STREAM_OPEN, request_id, {"provider": provider, "options": {}}))
        return request_id

    def _client(self, msg: Message) -> None:
        try:
            self.farm.admit(CLIENT, msg, self.t)
        except HubError as exc:  # the supervisor's loop answers a refusal with the error
            self.replies.append((CLIENT, MsgType.ERROR, msg.id, exc.to_dict()))

    def jobs_sent(self, worker_id: str | None = None) -> list[tuple[str, Message]]:
        """JOB and STREAM_OPEN messages sent, in order (optionally to one worker)."""
        kinds = (MsgType.JOB, MsgType.STREAM_OPEN)
        return [(w, m) for w, m in self.io.sent if m.type in kinds and (worker_id is None or w == worker_id)]

    def job_of(self, request_id: str) -> tuple[str, str]:
        """(worker id, job id) of the last job sent for ``request_id``."""
        job = self.farm.jobs.of_request(CLIENT, request_id)
        assert job is not None and job.worker is not None, f"request {request_id} is on no worker"
        return job.worker, job.id

    def finish(self, request_id: str, text: str = "ok") -> None:
        worker, job_id = self.job_of(request_id)
        self.from_worker(
            worker, MsgType.RESULT, job_id, {"text": text, "segments": [], "language": "en", "duration": 1.0}
        )

    def answers(self, request_id: str) -> list[tuple[MsgType, dict[str, Any]]]:
        return [(t, b) for c, t, r, b in self.replies if r == request_id]

    def error_of(self, request_id: str) -> str | None:
        errors = [b.get("code") for t, b in self.answers(request_id) if t is MsgType.ERROR]
        return errors[-1] if errors else None
