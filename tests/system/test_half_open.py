"""1,000 connections that send half a request and then nothing, against every listener the project owns: the
supervisor's probe port, the gateway's HTTP port and its Wyoming port. Each is closed within its deadline, the
process's threads and descriptors go back to their baseline, and probes and real transcriptions keep answering
throughout (tiny.en, on loopback)."""

from __future__ import annotations

import os
import resource
import selectors
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from hub.audio import decode_file
from tests.conftest import DATA, Hub, free_port, reference, wait_for, word_error_rate
from tests.gateway_support import WHISPER, serving

pytestmark = pytest.mark.timeout(240)

FLOOD = 1000
DEADLINE = 10.0  # the short header deadline (and Wyoming idle timeout) these tests configure: half of it is
# what a flood of FLOOD connections gets to be held at once (5 s was once too little for the Wyoming port under CI)
SLACK = 3.0  # a loaded two-core machine may take this much longer to notice and close
CLIP = "hello"


@pytest.fixture(autouse=True)
def descriptors_for_the_flood() -> None:
    """This process holds the flood's client sockets, the server under test its ends: both need the room."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * FLOOD + 512
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"ulimit -n allows {hard} descriptors; {FLOOD} half-open connections need {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


@dataclass(frozen=True)
class Usage:
    fds: int
    threads: int


def usage(pid: int) -> Usage:
    return Usage(len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task")))


@dataclass
class Traffic:
    """Probes and transcriptions sent in a loop from a thread while the flood is on; every failure is kept."""

    answers: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    quiet: threading.Lock = field(default_factory=threading.Lock)  # held: no request in flight (for a measurement)


@contextmanager
def traffic(one: Callable[[], None]) -> Iterator[Traffic]:
    seen = Traffic()

    def loop() -> None:
        while not seen.stop.is_set():
            with seen.quiet:
                try:
                    one()
                    seen.answers += 1
                except Exception as exc:  # noqa: BLE001 - every failure is the finding
                    seen.failures.append(repr(exc))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        seen.stop.set()
        thread.join(60)
        assert not thread.is_alive(), "the traffic thread hung"


def flood(port: int, half: bytes) -> tuple[list[socket.socket], float]:
    """FLOOD connections, each sent ``half`` (a request cut off before its end); returns them and when the last opened."""
    sockets = []
    for _ in range(FLOOD):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(half)
        sockets.append(sock)
    return sockets, time.monotonic()


def closed_by_server(sockets: list[socket.socket], within: float) -> list[bytes]:
    """Wait until the server has closed every socket (end of file), at most ``within`` s; return what each received."""
    received = {sock: b"" for sock in sockets}
    with selectors.DefaultSelector() as selector:
        for sock in sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + within
        while selector.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                sock = key.fileobj
                try:
                    data = sock.recv(4096)  # type: ignore[union-attr]
                except ConnectionResetError:
                    data = b""
                received[sock] += data  # type: ignore[index]
                if not data:
                    selector.unregister(sock)
        still_open = len(selector.get_map())
    for sock in sockets:
        sock.close()
    assert still_open == 0, (
        f"{still_open} of {len(sockets)} half-open connections still open {within:.0f} s after the last one opened"
    )
    return list(received.values())


def check_flood(pid: int, port: int, half: bytes, deadline: float, reply: bytes, one: Callable[[], None]) -> None:
    """The whole scenario against one listener of process ``pid``."""
    with traffic(one) as seen:
        # the first answer started whatever threads and sockets the process (and the client's thread) keep
        wait_for(lambda: seen.answers or seen.failures, 60, "a first answer")
        with seen.quiet:
            baseline = usage(pid)
        sockets, last_opened = flood(port, half)
        # (nearly) all of them held at once: a listener accepts its backlog at its own pace, and the first ones may
        # already meet their deadline while the last are accepted, so allow it half the deadline and 10 % short
        wait_for(
            lambda: usage(pid).fds >= baseline.fds + 0.9 * FLOOD,
            deadline / 2,
            f"the flood to take hold: {baseline} -> {usage(pid)}",
        )
        held = usage(pid)
        answers_held = seen.answers
        replies = closed_by_server(sockets, within=deadline + SLACK - (time.monotonic() - last_opened))
        answers_closed = seen.answers
        peak_threads = max(held.threads, usage(pid).threads)
        wait_for(lambda: seen.answers > answers_closed, 60, "an answer after the flood")
    assert not seen.failures, seen.failures[:5]
    assert answers_closed > answers_held, "nothing was answered while the half-open connections were held"
    assert peak_threads <= baseline.threads, f"threads grew with connections: {baseline.threads} -> {peak_threads}"
    assert all(r.startswith(reply) for r in replies), {r[:60] for r in replies if not r.startswith(reply)}
    time.sleep(3)
    wait_for(lambda: usage(pid).fds <= baseline.fds, 10, f"descriptors back to {baseline.fds}: {usage(pid)}")


def test_half_open_connections_to_the_probe_port(hub_factory: Callable[..., Hub]) -> None:
    port = free_port()
    settings = {"metrics_port": port, "metrics_header_timeout": DEADLINE, "metrics_max_connections": 2 * FLOOD}
    hub = hub_factory({"whisper": {"model": "tiny.en"}}, hub=settings)
    pcm = decode_file(DATA / f"{CLIP}.wav")

    with hub.client() as client:

        def probe_and_transcribe() -> None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
                assert answer.read() == b"ok\n"
            text = client.transcribe(pcm, timeout=30).text
            assert word_error_rate(reference(CLIP), text) <= 0.1, text

        check_flood(
            hub.proc.pid,
            port,
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n",
            DEADLINE,
            b"HTTP/1.1 408 ",
            probe_and_transcribe,
        )


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, int]]:
    """A gateway with short deadlines: its pid, HTTP port and Wyoming port."""
    settings = {"header_timeout": DEADLINE, "wyoming_idle_timeout": DEADLINE, "max_connections": 2 * FLOOD}
    with serving(tmp_path_factory.mktemp("half-open"), {"whisper": WHISPER}, **settings) as gw:
        pid = gw.hub.status()["gateway"]["pid"]
        yield pid, gw.port, gw.wyoming_port


def _sdk_and_probe(port: int) -> Callable[[], None]:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
    clip = Path(DATA / f"{CLIP}.wav")

    def one() -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            assert answer.read() == b"ok\n"
        with open(clip, "rb") as audio:
            text = client.audio.transcriptions.create(model="whisper-1", file=audio).text
        assert word_error_rate(reference(CLIP), text) <= 0.1, text

    return one


def test_half_open_connections_to_the_gateway_http_port(gateway: tuple[int, int, int]) -> None:
    pid, port, _ = gateway
    half = b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; bound"
    check_flood(pid, port, half, DEADLINE, b"HTTP/1.1 408 ", _sdk_and_probe(port))


def test_half_open_connections_to_the_gateway_wyoming_port(gateway: tuple[int, int, int]) -> None:
    pid, port, wyoming_port = gateway
    check_flood(pid, wyoming_port, b'{"type": "describe", "da', DEADLINE, b'{"type": "error"', _sdk_and_probe(port))


def test_at_the_gateway_cap_the_oldest_half_open_connection_makes_room(tmp_path: Path) -> None:
    """A cap of 20 and a long deadline: 50 half-open connections hold no more than 20 descriptors, each new one
    displaces the one waiting longest (told 408), and a probe and a transcription still get in."""
    with serving(tmp_path, {"whisper": WHISPER}, header_timeout=60, max_connections=20) as gw:
        pid = gw.hub.status()["gateway"]["pid"]
        one = _sdk_and_probe(gw.port)
        one()
        baseline = usage(pid)
        sockets = []
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            sockets.append(sock)
        try:
            displaced = [sock.recv(64) for sock in sockets[:30]]  # the 20 newer ones each displaced one of these
            assert all(reply.startswith(b"HTTP/1.1 408 ") for reply in displaced), displaced
            # a displaced connection's descriptor is freed once its 408 is written: wait for that, briefly
            wait_for(lambda: usage(pid).fds <= baseline.fds + 20, 5, f"at most 20 held: {baseline} -> {usage(pid)}")
            assert usage(pid).threads == baseline.threads, (baseline, usage(pid))
            one()
        finally:
            for sock in sockets:
                sock.close()
