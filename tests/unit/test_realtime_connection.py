"""One Realtime connection's tasks against a fake socket and a fake hub session, without processes or
sockets: a client that never reads is held back (the connection stops reading it once its outbox is full,
and loses nothing), and the hub's events (finals, and the VAD's speech boundaries with their ``at``) come
out as the API's items, in order, through the connection's own tasks."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from hub.client import StreamEvent
from hub.gateway.live import QUEUE_PIECES
from hub.gateway.realtime import OUTBOX_EVENTS, Connection
from hub.gateway.realtime_events import RATE, Dialect, SessionConfig
from hub.gateway.sockets import ClientGone
from hub.results import Transcript


class FakeSocket:
    """The client: messages to hand the connection, and a gate that holds every send while closed (a client
    that does not read)."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: list[dict[str, Any]] = []
        self.reads = 0
        self.reading = asyncio.Event()
        self.reading.set()

    def say(self, body: dict[str, Any] | str) -> None:
        self.incoming.put_nowait(
            {"type": "websocket.receive", "text": body if isinstance(body, str) else json.dumps(body)}
        )

    def leave(self) -> None:
        self.incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})

    async def receive(self) -> dict[str, Any]:
        message = await self.incoming.get()
        self.reads += 1
        return message

    async def send_text(self, text: str) -> None:
        await self.reading.wait()
        self.sent.append(json.loads(text))


class FakeSession:
    """A hub live session: what it was sent, events the test pushes, and events its close flushes."""

    def __init__(self, on_close: list[StreamEvent], chatty: bool = False) -> None:
        self.events: asyncio.Queue[StreamEvent | None] = asyncio.Queue()
        self.on_close = on_close
        self.chatty = chatty  # a final for every chunk sent, as a hub decoding all the time would
        self.samples = 0
        self.closed = False

    async def send(self, pcm: bytes, rate: int) -> None:
        assert rate == RATE
        self.samples += len(pcm) // 2
        if self.chatty:
            self.events.put_nowait(StreamEvent("final", f"w{self.samples}"))

    async def results(self) -> AsyncIterator[StreamEvent]:
        while (event := await self.events.get()) is not None:
            yield event

    async def close(self) -> Transcript:
        if not self.closed:
            self.closed = True
            for event in self.on_close:
                self.events.put_nowait(event)
            self.events.put_nowait(None)
        return Transcript(text="")


def fake_gateway(sessions: list[FakeSession]) -> Any:
    opened: list[dict[str, Any]] = []

    async def open_stream(provider: str | None, **options: Any) -> FakeSession:
        opened.append({"provider": provider, **options})
        return sessions[len(opened) - 1]

    section = SimpleNamespace(request_timeout=5.0)
    return SimpleNamespace(
        client=SimpleNamespace(open_stream=open_stream),
        provider_for=lambda model: None if model == "whisper-1" else model,
        settings=SimpleNamespace(section=section),
        opened=opened,
    )


async def gone(task: asyncio.Task[None]) -> None:
    """The connection ends when its client leaves, as ``ClientGone`` (which the endpoint takes as the normal end)."""
    with pytest.raises(ClientGone):
        await asyncio.wait_for(task, 5)


def run(test: Any) -> None:
    asyncio.run(asyncio.wait_for(test, 60))


async def settle(check: Any = None, limit: int = 100_000) -> None:
    """Let the tasks run until nothing changes for a while (no clock: only the loop's turns)."""
    quiet, last = 0, None
    for _ in range(limit):
        await asyncio.sleep(0)
        now = check() if check else None
        quiet = quiet + 1 if now == last else 0
        last = now
        if quiet > 200:
            return


def audio(seconds: float) -> str:
    pcm = (np.sin(np.arange(int(RATE * seconds)) / 10) * 8000).astype("<i2").tobytes()
    return base64.b64encode(pcm).decode()


def test_a_client_that_never_reads_is_held_back_and_loses_nothing() -> None:
    run(_a_client_that_never_reads_is_held_back_and_loses_nothing())


async def _a_client_that_never_reads_is_held_back_and_loses_nothing() -> None:
    socket = FakeSocket()
    socket.reading.clear()  # the client reads nothing
    messages = 20 * OUTBOX_EVENTS
    for i in range(messages):
        socket.say({"type": "no.such.event", "event_id": f"e{i}"})
    connection = Connection(socket, fake_gateway([]), SessionConfig(), Dialect.GA)  # type: ignore[arg-type]
    task = asyncio.create_task(connection.run())
    await settle(lambda: socket.reads)
    # the outbox is full (64 events, one more stuck in the send): the connection stopped reading the client
    assert OUTBOX_EVENTS - 2 <= socket.reads <= OUTBOX_EVENTS + 2, socket.reads
    assert socket.incoming.qsize() == messages - socket.reads
    socket.reading.set()
    await settle(lambda: len(socket.sent))
    assert socket.sent[0]["type"] == "session.created"
    errors = socket.sent[1:]
    assert [e["error"]["event_id"] for e in errors] == [f"e{i}" for i in range(messages)]
    assert {e["error"]["code"] for e in errors} == {"unknown_event_type"}
    assert len({e["event_id"] for e in socket.sent}) == len(socket.sent)  # every server event has its own id
    socket.leave()
    await gone(task)


def test_a_client_that_sends_audio_but_never_reads_stops_being_read() -> None:
    run(_a_client_that_sends_audio_but_never_reads_stops_being_read())


async def _a_client_that_sends_audio_but_never_reads_stops_being_read() -> None:
    """Appends make no event themselves: the connection must stop reading them once the hub's events for the
    client pile up, or the hub session would keep decoding (and its events queueing) for nobody."""
    session = FakeSession(on_close=[], chatty=True)
    socket = FakeSocket()
    socket.reading.clear()
    messages = 4 * OUTBOX_EVENTS
    for _ in range(messages):
        socket.say({"type": "input_audio_buffer.append", "audio": audio(0.02)})
    connection = Connection(socket, fake_gateway([session]), SessionConfig(), Dialect.GA)  # type: ignore[arg-type]
    task = asyncio.create_task(connection.run())
    await settle(lambda: socket.reads)
    assert socket.reads <= OUTBOX_EVENTS + QUEUE_PIECES + 4, socket.reads
    socket.reading.set()
    await settle(lambda: len(socket.sent))
    deltas = [e for e in socket.sent if e["type"].endswith(".delta")]
    assert len(deltas) == messages  # a final for every append, none lost
    socket.leave()
    await gone(task)


def test_manual_commits_through_the_connections_tasks() -> None:
    run(_manual_commits_through_the_connections_tasks())


async def _manual_commits_through_the_connections_tasks() -> None:
    first = FakeSession(on_close=[StreamEvent("final", " world.")])
    second = FakeSession(on_close=[StreamEvent("final", " Again.")])
    gateway = fake_gateway([first, second])
    socket = FakeSocket()
    connection = Connection(socket, gateway, SessionConfig(), Dialect.GA)  # type: ignore[arg-type]
    task = asyncio.create_task(connection.run())
    socket.say(
        {
            "type": "session.update",
            "session": {
                "type": "transcription",
                "audio": {"input": {"turn_detection": None, "transcription": {"language": "en", "prompt": "Hi"}}},
            },
        }
    )
    socket.say({"type": "input_audio_buffer.commit", "event_id": "too-soon"})
    socket.say({"type": "input_audio_buffer.append", "audio": audio(0.5)})
    await settle(lambda: first.samples)
    first.events.put_nowait(StreamEvent("final", " Hello"))
    socket.say({"type": "input_audio_buffer.commit"})
    socket.say({"type": "input_audio_buffer.append", "audio": audio(0.25)})
    socket.say({"type": "input_audio_buffer.commit"})
    await settle(lambda: len(socket.sent))
    socket.leave()
    await gone(task)

    assert gateway.opened == [{"provider": None, "language": "en", "timeout": 5.0, "initial_prompt": "Hi"}] * 2
    assert (first.samples, second.samples) == (RATE // 2, RATE // 4)
    assert first.closed and second.closed
    said = [(e["type"], e.get("item_id"), e.get("delta") or e.get("transcript")) for e in socket.sent]
    created, updated, refused = said[:3]
    assert (created[0], updated[0], refused[0]) == ("session.created", "session.updated", "error")
    assert socket.sent[2]["error"]["code"] == "input_audio_buffer_commit_empty"
    assert socket.sent[2]["error"]["event_id"] == "too-soon"
    one, two = socket.sent[3]["item_id"], socket.sent[-1]["item_id"]
    assert one != two
    prefix = "conversation.item.input_audio_transcription"
    assert said[3:] == [
        (f"{prefix}.delta", one, "Hello"),
        ("input_audio_buffer.committed", one, None),
        (f"{prefix}.delta", one, " world."),
        (f"{prefix}.completed", one, "Hello world."),
        ("input_audio_buffer.committed", two, None),
        (f"{prefix}.delta", two, "Again."),
        (f"{prefix}.completed", two, "Again."),
    ]
    assert socket.sent[-3]["previous_item_id"] == one


def test_server_vad_events_through_the_connection() -> None:
    run(_server_vad_events_through_the_connection())


async def _server_vad_events_through_the_connection() -> None:
    session = FakeSession(on_close=[])
    socket = FakeSocket()
    connection = Connection(socket, fake_gateway([session]), SessionConfig(), Dialect.BETA)  # type: ignore[arg-type]
    task = asyncio.create_task(connection.run())
    socket.say({"type": "input_audio_buffer.append", "audio": audio(2.0)})
    await settle(lambda: session.samples)
    for event in (
        StreamEvent("speech_started", "", at=0.4),
        StreamEvent("speech_stopped", "", at=1.6),
        StreamEvent("final", "Good morning."),
        StreamEvent("utterance", "Good morning.", at=1.6),
    ):
        session.events.put_nowait(event)
    await settle(lambda: len(socket.sent))
    socket.leave()
    await gone(task)
    assert [e["type"] for e in socket.sent] == [
        "transcription_session.created",
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.delta",
        "conversation.item.input_audio_transcription.completed",
    ]
    assert (socket.sent[1]["audio_start_ms"], socket.sent[2]["audio_end_ms"]) == (400, 1600)
    assert socket.sent[-1]["transcript"] == "Good morning."
    assert session.closed  # the client left: its hub session is closed, not left to time out


def test_a_session_opened_after_its_client_left_is_closed() -> None:
    run(_a_session_opened_after_its_client_left_is_closed())


async def _a_session_opened_after_its_client_left_is_closed() -> None:
    session = FakeSession(on_close=[])
    placed = asyncio.Event()

    async def slow_open(provider: str | None, **options: Any) -> FakeSession:
        await placed.wait()  # the hub is still placing the session
        return session

    gateway = fake_gateway([])
    gateway.client.open_stream = slow_open
    socket = FakeSocket()
    task = asyncio.create_task(Connection(socket, gateway, SessionConfig(), Dialect.GA).run())
    socket.say({"type": "input_audio_buffer.append", "audio": audio(0.1)})
    await settle(lambda: socket.reads)
    socket.leave()
    await gone(task)
    assert not session.closed
    placed.set()
    await settle(lambda: session.closed)
    assert session.closed and session.samples == 0
