"""``HubClient`` and ``AsyncHubClient`` against one table of cases: the same calls give the same answers and the
same errors, on a real hub. Each case is written once against ``Driver``; ``Sync`` and ``Async`` are the two
clients behind it (the async one on an event loop of its own thread, as a service would run it)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pytest
import zmq

from hub import shm
from hub.client import AsyncHubClient, HubClient
from hub.client.call import ProbeLease
from hub.errors import (
    BadRequest,
    HubUnreachable,
    InvalidAudio,
    JobTimeout,
    UnknownProvider,
)
from hub.results import Segment, Transcript
from tests.conftest import Hub, echo_provider, free_port, start_hub
from workers.echo import echo_text

pytestmark = pytest.mark.timeout(120)

TONE = (0.1 * np.sin(np.linspace(0, 2000, 16000))).astype(np.float32)
STEPS = np.concatenate([np.full(8000, 0.01 * (i + 1), dtype=np.float32) for i in range(6)])
RUN_TIMEOUT = 60.0  # no single step of a case may take longer


class Driver(Protocol):
    """The calls the cases make, the same for both clients; a session is an opaque handle."""

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any: ...
    def stream(self, *args: Any, **kwargs: Any) -> tuple[list[Segment | Transcript], Transcript | None]: ...
    def abandon_stream(self, *args: Any, **kwargs: Any) -> Segment | Transcript: ...
    def together(self, count: int, name: str, *args: Any) -> list[Any]: ...
    def open(self, **kwargs: Any) -> Any: ...
    def send(self, session: Any, pcm: np.ndarray) -> None: ...
    def results(self, session: Any) -> list[Any]: ...
    def end(self, session: Any) -> Transcript: ...
    def close(self) -> None: ...
    def finish(self) -> None: ...


class Sync:
    def __init__(self, endpoint: str, **kwargs: Any) -> None:
        self.client = HubClient(endpoint, **kwargs)

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.client, name)(*args, **kwargs)

    def stream(self, *args: Any, **kwargs: Any) -> tuple[list[Segment | Transcript], Transcript | None]:
        stream = self.client.transcribe_stream(*args, **kwargs)
        return list(stream.events()), stream.transcript

    def abandon_stream(self, *args: Any, **kwargs: Any) -> Segment | Transcript:
        events = self.client.transcribe_stream(*args, **kwargs).events()
        first = next(events)
        events.close()
        return first

    def together(self, count: int, name: str, *args: Any) -> list[Any]:
        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(lambda _: self.call(name, *args), range(count)))

    def open(self, **kwargs: Any) -> Any:
        return self.client.open_stream(**kwargs)

    def send(self, session: Any, pcm: np.ndarray) -> None:
        session.send(pcm)

    def results(self, session: Any) -> list[Any]:
        return list(session.results())

    def end(self, session: Any) -> Transcript:
        return session.close()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.client.close()

    def finish(self) -> None:
        """Nothing to stop: the blocking client has no loop."""


class Async:
    def __init__(self, endpoint: str, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make() -> AsyncHubClient:
            return AsyncHubClient(endpoint, **kwargs)

        self.client = self.run(make())

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(RUN_TIMEOUT)

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.run(getattr(self.client, name)(*args, **kwargs))

    def stream(self, *args: Any, **kwargs: Any) -> tuple[list[Segment | Transcript], Transcript | None]:
        async def go() -> tuple[list[Segment | Transcript], Transcript | None]:
            stream = self.client.transcribe_stream(*args, **kwargs)
            return [event async for event in stream], stream.transcript

        return self.run(go())  # type: ignore[no-any-return]

    def abandon_stream(self, *args: Any, **kwargs: Any) -> Segment | Transcript:
        async def go() -> Segment | Transcript:
            stream = self.client.transcribe_stream(*args, **kwargs)
            first = await anext(stream)
            await stream.aclose()
            return first

        return self.run(go())  # type: ignore[no-any-return]

    def together(self, count: int, name: str, *args: Any) -> list[Any]:
        async def go() -> list[Any]:
            return await asyncio.gather(*(getattr(self.client, name)(*args) for _ in range(count)))

        return self.run(go())  # type: ignore[no-any-return]

    def open(self, **kwargs: Any) -> Any:
        return self.run(self.client.open_stream(**kwargs))

    def send(self, session: Any, pcm: np.ndarray) -> None:
        self.run(session.send(pcm))

    def results(self, session: Any) -> list[Any]:
        async def go() -> list[Any]:
            return [event async for event in session.results()]

        return self.run(go())  # type: ignore[no-any-return]

    def end(self, session: Any) -> Transcript:
        return self.run(session.close())  # type: ignore[no-any-return]

    def close(self) -> None:
        self.run(self.client.close())

    def finish(self) -> None:
        """Stop the client's loop (after ``close``)."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


DRIVERS: dict[str, Callable[..., Driver]] = {"sync": Sync, "async": Async}


# --- the cases: each is run once with each client ------------------------------------------------------


def transcribes_every_input_kind(c: Driver, hub: Hub) -> None:
    assert c.call("transcribe", TONE).text == echo_text(TONE)
    ints = (TONE * 32767).astype(np.int16)
    assert c.call("transcribe", ints.tobytes()).duration == pytest.approx(1.0)
    assert c.call("transcribe", TONE[::2], sample_rate=8000).duration == pytest.approx(1.0, abs=0.01)


def streams_segments_then_the_transcript(c: Driver, hub: Hub) -> None:
    events, transcript = c.stream(TONE, segments=3)
    assert [type(e) for e in events] == [Segment] * 3 + [Transcript]
    assert transcript is events[-1] and transcript.segments == tuple(events[:3])
    assert [e.start for e in events[:3]] == sorted(e.start for e in events[:3])


def an_abandoned_stream_leaves_the_client_working(c: Driver, hub: Hub) -> None:
    assert isinstance(c.abandon_stream(TONE, segments=3), Segment)
    assert c.call("transcribe", TONE).text == echo_text(TONE)


def answers_status_scale_and_wait_ready(c: Driver, hub: Hub) -> None:
    assert c.call("status")["hub"]["ready"]
    assert c.call("wait_ready", timeout=10)["hub"]["ready"]
    assert c.call("scale", "echo", 2) == {"provider": "echo", "size": 2}


def refuses_with_the_hubs_typed_errors(c: Driver, hub: Hub) -> None:
    with pytest.raises(UnknownProvider):
        c.call("transcribe", TONE, "nope")
    with pytest.raises(BadRequest):
        c.call("transcribe", TONE, foo=1)
    with pytest.raises(BadRequest):
        c.call("scale", "echo", 99)
    with pytest.raises(InvalidAudio):
        c.call("transcribe", np.array([], dtype=np.float32))
    with pytest.raises(UnknownProvider):
        c.open(provider="nope")


def times_out_with_job_timeout_and_serves_on(c: Driver, hub: Hub) -> None:
    started = time.monotonic()
    with pytest.raises(JobTimeout, match="client's timeout"):
        c.call("transcribe", TONE, sleep=3.0, timeout=0.5)
    assert time.monotonic() - started < 2.0
    assert c.call("transcribe", TONE).text == echo_text(TONE)


def says_hello_once_for_concurrent_first_calls(c: Driver, hub: Hub) -> None:
    statuses = c.together(6, "status")
    assert all(s["hub"]["ready"] for s in statuses)


def a_closed_client_refuses_every_call(c: Driver, hub: Hub) -> None:
    assert c.call("status")["hub"]["ready"]
    c.close()
    for name, args in (("transcribe", (TONE,)), ("status", ()), ("open_stream", ())):
        with pytest.raises(RuntimeError, match="is closed"):
            c.call(name, *args)
    c.close()  # twice is fine


def a_live_session_gives_its_transcript(c: Driver, hub: Hub) -> None:
    session = c.open()
    assert session.worker is not None
    for start in range(0, STEPS.size, 4000):
        c.send(session, STEPS[start : start + 4000])
    transcript = c.end(session)
    assert transcript.duration == pytest.approx(STEPS.size / 16000, abs=0.01)
    finals = [e.text for e in c.results(session) if e.kind == "final"]
    assert transcript.text == " ".join(finals) and finals
    assert c.end(session) == transcript  # closing twice gives the same answer


def closing_the_client_ends_its_sessions(c: Driver, hub: Hub) -> None:
    session = c.open()
    c.send(session, TONE)
    c.close()
    with pytest.raises(RuntimeError, match="session is closed"):
        c.send(session, TONE)


CASES: list[Callable[[Driver, Hub], None]] = [
    transcribes_every_input_kind,
    streams_segments_then_the_transcript,
    an_abandoned_stream_leaves_the_client_working,
    answers_status_scale_and_wait_ready,
    refuses_with_the_hubs_typed_errors,
    times_out_with_job_timeout_and_serves_on,
    says_hello_once_for_concurrent_first_calls,
    a_closed_client_refuses_every_call,
    a_live_session_gives_its_transcript,
    closing_the_client_ends_its_sessions,
]


@dataclass
class Hellos:
    """How many HELLOs the clients of a test said: each opens one shared-memory probe."""

    count: int = 0


@pytest.fixture
def hellos(monkeypatch: pytest.MonkeyPatch) -> Hellos:
    seen = Hellos()
    opened = ProbeLease.open

    def counting(self: ProbeLease, body: dict[str, Any]) -> bytes | None:
        seen.count += 1
        return opened(self, body)

    monkeypatch.setattr(ProbeLease, "open", counting)
    return seen


@pytest.fixture(scope="module")
def echo_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    started = start_hub(tmp_path_factory.mktemp("clients"), {"echo": echo_provider(min_size=2, max_size=2)})
    yield started
    started.finish()


@pytest.mark.parametrize("kind", DRIVERS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__)
def test_both_clients(case: Callable[[Driver, Hub], None], kind: str, echo_hub: Hub, hellos: Hellos) -> None:
    client = DRIVERS[kind](echo_hub.endpoint, timeout=20.0)
    try:
        case(client, echo_hub)
    finally:
        client.close()
        client.finish()
    assert hellos.count == 1, "a client says HELLO once, whatever its threads or tasks do"


@pytest.mark.parametrize("kind", DRIVERS)
def test_no_hub_is_hub_unreachable_within_the_timeout(kind: str) -> None:
    client = DRIVERS[kind](f"tcp://127.0.0.1:{free_port()}", timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(HubUnreachable, match="no ASR Hub answered"):
            client.call("status")
        with pytest.raises(HubUnreachable):
            client.call("transcribe", TONE)
        assert time.monotonic() - started < 3.0
    finally:
        client.close()
        client.finish()


@pytest.mark.parametrize("kind", DRIVERS)
def test_a_full_ring_raises_the_same_job_timeout(kind: str, hub_factory: Callable[..., Hub]) -> None:
    """The worker decodes slowly (echo's sleep) and the sender sends 31 s at once: the ring holds 30 s, so the
    last send waits for the session's timeout and then raises, with the same error on both clients."""
    hub = hub_factory({"echo": echo_provider()}, hub={"drain_timeout": 1})
    client = DRIVERS[kind](hub.endpoint, timeout=20.0)
    try:
        session = client.open(sleep=3.0, timeout=1.0)
        second = np.full(16000, 0.05, dtype=np.float32)
        for _ in range(30):
            client.send(session, second)
        started = time.monotonic()
        with pytest.raises(JobTimeout, match="fell more than 30 s of audio behind for 1 s"):
            client.send(session, second)
        assert time.monotonic() - started >= 0.9
    finally:
        client.close()
        client.finish()


def test_close_ends_though_a_socket_was_made_and_never_recorded() -> None:
    """A Ctrl-C can cut a socket's setup short between its creation and the client's record of it (the CLI's
    first contact under load): ``close`` must still end, where a context ``term`` would wait for it for ever."""
    for client in (HubClient(f"tcp://127.0.0.1:{free_port()}"), AsyncHubClient(f"tcp://127.0.0.1:{free_port()}")):
        stray = client._ctx.socket(zmq.DEALER)
        stray.connect(client.endpoint)
        closer = threading.Thread(
            target=client.close if isinstance(client, HubClient) else lambda c=client: asyncio.run(c.close()),
            daemon=True,
        )
        closer.start()
        closer.join(10)
        assert not closer.is_alive(), f"{type(client).__name__}.close() is still waiting"
        assert stray.closed


def test_a_segment_whose_creation_is_interrupted_is_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A KeyboardInterrupt after the segment exists but before its maker holds it leaves nothing in /dev/shm."""

    def ours() -> list[str]:  # other test processes make segments meanwhile under make test
        return [name for name in shm.list_segments() if shm.owner_pid(name) == os.getpid()]

    before = ours()

    def interrupted(self: shm.PcmSegment) -> memoryview:
        raise KeyboardInterrupt

    monkeypatch.setattr(shm.PcmSegment, "buf", property(interrupted))
    with pytest.raises(KeyboardInterrupt):
        shm.create_probe()
    assert ours() == before
